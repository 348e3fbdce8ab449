"""Continual-learning experiments end to end on the tiny random model: chaining of stages, the
results files, ``--parallel``, resume after ``kill -9``, and the experiment file's errors."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdft.checkpoints import read_checkpoints
from sdft.continual import ExperimentError, ExperimentFailed, load_experiment, run_experiment
from sdft.continual.report import Stat, build_table, exceeds_spread, reading
from sdft.continual.runner import ExperimentRunner
from sdft.runlog import RunLog

TINY = "sdft/tiny-random"
CAPITALS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
]
COLOURS = [
    ("What colour is the sky?", "Blue"),
    ("What colour is grass?", "Green"),
    ("What colour is snow?", "White"),
]


def write_experiment(
    root: Path, *, max_steps: int = 2, extra: dict[str, Any] | None = None
) -> Path:
    """2 stages (capitals, colours) × methods sft and sdft × lr 1e-3, 1e-2 × seeds 0, 1 on the tiny
    model (LoRA rank 4); stage benchmarks b1, b2 and a drift benchmark scored after every stage."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("s1.jsonl", CAPITALS), ("s2.jsonl", COLOURS)):
        (data / name).write_text(
            "".join(
                json.dumps({"inputs": {"question": q}, "expected": f"It is {a}."}) + "\n"
                for q, a in rows
            )
        )
    for name, rows in (("b1", CAPITALS[:2]), ("b2", COLOURS[:2])):
        (data / name).mkdir(exist_ok=True)
        (data / name / "tasks.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "task_id": f"{name}_{i}",
                        "instruction": q,
                        "verifier": {"kind": "in_process", "fn_name": "contains", "expected": a},
                    }
                )
                + "\n"
                for i, (q, a) in enumerate(rows)
            )
        )
    (data / "drift.jsonl").write_text(
        json.dumps({"prompt": "Tell me a joke."}) + "\n" + json.dumps({"prompt": "Name a fruit."})
    )
    base = {
        "model": {"name": TINY},
        "backend": {"kind": "local", "device": "cpu"},
        "algorithm": {
            "kind": "sdft",
            "params": {
                "learning_rate": 1e-3,
                "max_steps": 3,
                "batch_size": 2,
                "lora_rank": 4,
                "topk": 5,
                "skip_first_n": 1,
                "max_tokens": 6,
                "max_context_length": 256,
                "save_every": 1,
            },
        },
        "data": {"path": "data/s1.jsonl"},
        "output_dir": "unused",
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    experiment = {
        "base_config": "base.yaml",
        "output_dir": "out",
        "methods": [{"name": "sft", "overrides": {"algorithm.kind": "sft"}}, {"name": "sdft"}],
        "learning_rates": [1e-3, 1e-2],
        "seeds": [0, 1],
        "stages": [
            {
                "name": "capitals",
                "data": {"path": "data/s1.jsonl"},
                "max_steps": max_steps,
                "benchmarks": [{"name": "b1", "path": "data/b1"}],
            },
            {
                "name": "colours",
                "data": {"path": "data/s2.jsonl"},
                "max_steps": max_steps,
                "benchmarks": [{"name": "b2", "path": "data/b2"}],
            },
        ],
        "benchmarks": [
            {
                "name": "drift",
                "kind": "drift",
                "path": "data/drift.jsonl",
                "max_tokens": 4,
                "metrics": ["kl", "kl_full"],
            }
        ],
    }
    experiment.update(extra or {})
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


class RecordingService:
    """Records which checkpoints new training clients and samplers were created from."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.from_state: list[str] = []
        self.samplers: list[str | None] = []

    def create_training_client_from_state(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self.from_state.append(path)
        return self.inner.create_training_client_from_state(path, *args, **kwargs)

    def create_sampling_client(self, model_path: str | None = None, **kwargs: Any) -> Any:
        self.samplers.append(model_path)
        return self.inner.create_sampling_client(model_path=model_path, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 2-stage × 2-method × 2-lr × 2-seed experiment, run once with ``parallel=2``."""
    from sdft.backends.local import LocalServiceClient

    root = tmp_path_factory.mktemp("continual")
    experiment = load_experiment(write_experiment(root))
    service = RecordingService(
        LocalServiceClient(
            checkpoint_root=experiment.output_dir / "checkpoints", device="cpu", dtype="float32"
        )
    )
    log: list[str] = []
    started = time.perf_counter()
    result = run_experiment(experiment, parallel=2, service_client=service, log=log.append)
    return {
        "experiment": experiment,
        "result": result,
        "service": service,
        "log": log,
        "seconds": time.perf_counter() - started,
    }


def results(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]


def result_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (
        row["method"],
        row["learning_rate"],
        row["seed"],
        row["stage"],
        row["benchmark"],
        row["metric"],
    )


def test_stage_two_starts_from_stage_one_of_the_same_chain(finished: dict[str, Any]) -> None:
    experiment = finished["experiment"]
    service = finished["service"]
    assert len(experiment.chains) == 8
    expected_states, expected_teachers = [], []
    for chain in experiment.chains:
        first, second = experiment.stage_runs(chain)
        final = read_checkpoints(first.output_dir)[-1]
        assert final.step == 2 and final.final
        start = json.loads((second.output_dir / "start.json").read_text())
        assert start == {
            "stage": 2,
            "from": "checkpoint",
            "state_path": final.state_path,
            "sampler_path": final.sampler_path,
            "teacher": final.sampler_path,
        }
        assert json.loads((first.output_dir / "start.json").read_text())["from"] == "base"
        expected_states.append(final.state_path)
        if chain.method == "sdft":
            expected_teachers.append(final.sampler_path)
        # every chain's checkpoints are its own
        assert final.state_path not in [
            read_checkpoints(experiment.stage_runs(other)[0].output_dir)[-1].state_path
            for other in experiment.chains
            if other != chain
        ]
    # each stage 2 (8 of them) created its student from exactly its chain's stage-1 state
    assert sorted(service.from_state) == sorted(expected_states)
    # SDFT's stage-2 teacher is the stage-1 model of the chain (SFT has no teacher)
    for path in expected_teachers:
        assert service.samplers.count(path) >= 2  # the teacher, and the stage-1 scoring


def test_results_jsonl_has_every_score_exactly_once(finished: dict[str, Any]) -> None:
    experiment = finished["experiment"]
    rows = results(experiment.output_dir)
    keys = Counter(result_key(row) for row in rows)
    assert set(keys.values()) == {1}
    # base: b1, b2 pass@1 + drift kl, kl_full; then 8 chains × 2 stages × 4 values
    assert len(rows) == 4 + 8 * 2 * 4
    base = {(r["benchmark"], r["metric"]): r["value"] for r in rows if r["stage"] == 0}
    assert base[("drift", "kl")] == 0.0 and base[("drift", "kl_full")] == 0.0
    for row in rows:
        scores = (
            experiment.output_dir / "base"
            if row["stage"] == 0
            else experiment.runs[
                (
                    next(
                        c
                        for c in experiment.chains
                        if (c.method, c.learning_rate, c.seed)
                        == (row["method"], row["learning_rate"], row["seed"])
                    ),
                    row["stage"],
                )
            ].output_dir
        )
        stored = json.loads((scores / "scores.json").read_text())
        assert stored["metrics"][row["benchmark"]][row["metric"]] == row["value"]


def test_each_run_trained_its_steps_once(finished: dict[str, Any]) -> None:
    experiment = finished["experiment"]
    for run in experiment.runs.values():
        steps = Counter(
            row["step"] for row in RunLog(run.output_dir).read_metrics() if row["split"] == "train"
        )
        assert steps == Counter({1: 1, 2: 1})


def test_parallel_runs_chains_concurrently(finished: dict[str, Any]) -> None:
    log = finished["log"]
    starts = [i for i, line in enumerate(log) if line.endswith(": training 2 steps")]
    ends = [i for i, line in enumerate(log) if ": trained (" in line]
    assert len(starts) == len(ends) == 16
    # with parallel 2 the second chain starts before the first chain's first run has finished
    assert starts[1] < ends[0]


def test_results_md_tables_are_the_arithmetic_of_results_jsonl(finished: dict[str, Any]) -> None:
    experiment = finished["experiment"]
    rows = results(experiment.output_dir)
    text = (experiment.output_dir / "results.md").read_text()
    base_b2 = next(r["value"] for r in rows if r["stage"] == 0 and r["benchmark"] == "b2")
    for method in ("sft", "sdft"):
        for lr in (1e-3, 1e-2):
            values = [
                r["value"]
                for r in rows
                if (r["method"], r["learning_rate"], r["stage"], r["benchmark"], r["metric"])
                == (method, lr, 2, "b2", "pass@1")
            ]
            drift = [
                r["value"]
                for r in rows
                if (r["method"], r["learning_rate"], r["stage"], r["benchmark"], r["metric"])
                == (method, lr, 2, "drift", "kl")
            ]
            mean, std = statistics.fmean(values), statistics.stdev(values)
            cell = f"{mean:.3f} ± {std:.3f} ({mean - base_b2:+.3f})"
            drift_cell = f"{statistics.fmean(drift):.3f} ± {statistics.stdev(drift):.3f}"
            assert f"| {method} | {lr:g} | " in text
            line = next(
                ln
                for ln in text.split("## Stage 2")[1].splitlines()
                if ln.startswith(f"| {method} | {lr:g} | ")
            )
            assert line.split(" | ")[3] == cell
            assert line.split(" | ")[4].rstrip(" |") == drift_cell
    for name in ("tradeoff.png", "stages.png"):
        assert (experiment.output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_md_of_an_unfinished_experiment_says_so(finished: dict[str, Any]) -> None:
    from sdft.continual.report import render_markdown

    experiment = finished["experiment"]
    rows = results(experiment.output_dir)
    complete = render_markdown(experiment, rows)
    assert "Incomplete" not in complete and "[n=" not in complete
    missing = [
        r
        for r in rows
        if (r["method"], r["learning_rate"], r["seed"], r["stage"]) != ("sft", 1e-2, 1, 2)
    ]
    text = render_markdown(experiment, missing)
    assert (
        "**Incomplete:** 15 of 16 stage runs are scored so far. A cell marked [n=k] holds k of "
        "the 2 seeds; a cell without seeds shows –." in text
    )
    line = next(
        ln for ln in text.split("## Stage 2")[1].splitlines() if ln.startswith("| sft | 0.01 | ")
    )
    assert all(cell.endswith("[n=1]") for cell in line.strip(" |").split(" | ")[2:])
    assert text.rstrip().endswith(
        "3 more comparisons have a single seed on one side and are not judged."
    )


def test_rerun_of_a_finished_experiment_trains_nothing(finished: dict[str, Any]) -> None:
    experiment = finished["experiment"]
    before = (experiment.output_dir / "results.jsonl").read_text()
    result = run_experiment(experiment, service_client=finished["service"], log=lambda _: None)
    assert result.trained == [] and result.scored == []
    assert len(result.skipped) == 17
    assert (experiment.output_dir / "results.jsonl").read_text() == before


# --- table arithmetic on hand-made rows ------------------------------------------------------


def hand_rows() -> list[dict[str, Any]]:
    def row(method, lr, seed, stage, benchmark, value):
        return {
            "method": method,
            "learning_rate": lr,
            "seed": seed,
            "stage": stage,
            "stage_name": f"s{stage}",
            "benchmark": benchmark,
            "metric": "pass@1",
            "value": value,
        }

    rows = [row("base", None, None, 0, "a", 0.2), row("base", None, None, 0, "b", 0.5)]
    values = {
        # (method, stage, benchmark): per-seed values for seeds 0, 1, 2
        ("sft", 1, "a"): [0.8, 0.9, 1.0],
        ("sft", 2, "a"): [0.4, 0.45, 0.5],
        ("sft", 1, "b"): [0.3, 0.3, 0.3],
        ("sft", 2, "b"): [0.9, 0.9, 0.9],
        ("sdft", 1, "a"): [0.6, 0.7, 0.8],
        ("sdft", 2, "a"): [0.6, 0.7, 0.8],
        ("sdft", 1, "b"): [0.5, 0.5, 0.5],
        ("sdft", 2, "b"): [0.8, 0.9, 1.0],
    }
    for (method, stage, benchmark), seeds in values.items():
        rows += [row(method, 5e-4, s, stage, benchmark, v) for s, v in enumerate(seeds)]
    return rows


def test_table_mean_std_delta_and_retention_are_exact() -> None:
    table = build_table(hand_rows(), {"a": "pass@1", "b": "pass@1"}, ["s1", "s2"])
    cell = table.cell("sft", 5e-4, 1, "a")
    assert cell is not None and cell.mean == pytest.approx(0.9, abs=1e-15)
    assert cell.std == pytest.approx(0.1, abs=1e-15)
    delta = table.delta("sft", 5e-4, 1, "a")
    assert delta is not None and delta.mean == pytest.approx(0.7, abs=1e-15)
    change = table.change("sft", 5e-4, 2, "b")
    assert change is not None and change.values == pytest.approx((0.6, 0.6, 0.6))
    kept = table.retention("sft", 5e-4, 2, 1, "a")
    assert kept is not None and kept.values == pytest.approx((0.5, 0.5, 0.5))
    kept = table.retention("sdft", 5e-4, 2, 1, "a")
    assert kept is not None and kept.mean == pytest.approx(1.0) and kept.std == 0.0
    # stage 1 score 0 makes retention undefined for that seed
    rows = hand_rows()
    for row in rows:
        if (row["method"], row["stage"], row["benchmark"], row["seed"]) == ("sft", 1, "a", 0):
            row["value"] = 0.0
    table = build_table(rows, {"a": "pass@1", "b": "pass@1"}, ["s1", "s2"])
    kept = table.retention("sft", 5e-4, 2, 1, "a")
    assert kept is not None and kept.values == pytest.approx((0.45 / 0.9, 0.5))


def test_reading_states_only_differences_beyond_the_seed_spread() -> None:
    table = build_table(hand_rows(), {"a": "pass@1", "b": "pass@1"}, ["s1", "s2"])
    assert exceeds_spread(Stat((0.8, 0.9, 1.0)), Stat((0.3, 0.3, 0.3)))
    assert not exceeds_spread(Stat((0.8, 0.9, 1.0)), Stat((0.6, 0.7, 0.8)))  # 0.2 = 0.1 + 0.1
    assert not exceeds_spread(Stat((0.9,)), Stat((0.1,)))  # one seed: no spread known
    text = reading(table, ["s1", "s2"])
    assert text.startswith("Of 4 method-vs-method comparisons")
    assert "2 differ by more than the seed spread" in text
    assert "after stage 1 (s1) at lr 0.0005, b is 0.200 higher with sdft than with sft" in text
    assert "after stage 2 (s2) at lr 0.0005, a is 0.250 higher with sdft than with sft" in text
    one_seed = [r for r in hand_rows() if r["seed"] in (None, 0)]
    assert reading(build_table(one_seed, {"a": "pass@1"}, ["s1", "s2"]), ["s1", "s2"]).startswith(
        "With one seed per cell"
    )
    # a cell with one seed is not compared with anything: the reading counts it apart
    lopsided = [r for r in hand_rows() if r["method"] != "sdft" or r["seed"] == 0]
    assert reading(
        build_table(lopsided, {"a": "pass@1", "b": "pass@1"}, ["s1", "s2"]), ["s1", "s2"]
    ) == (
        "No method-vs-method comparison (same stage, benchmark and learning rate) has two or more "
        "seeds on each side yet, so no difference between methods is claimed. 4 more comparisons "
        "have a single seed on one side and are not judged."
    )
    partly = [
        r for r in hand_rows() if not (r["method"] == "sdft" and r["stage"] == 2 and r["seed"])
    ]
    text = reading(build_table(partly, {"a": "pass@1", "b": "pass@1"}, ["s1", "s2"]), ["s1", "s2"])
    assert text.startswith("Of 2 method-vs-method comparisons with two or more seeds on each side")
    assert text.endswith(
        "Every other difference is within the seed spread and is not a finding. 2 more "
        "comparisons have a single seed on one side and are not judged."
    )


# --- resume after kill -9 ----------------------------------------------------------------------


def _interrupted_run(output_dir: Path, max_steps: int) -> Path | None:
    """A run directory whose training has a checkpoint but has not finished."""
    for index in sorted(output_dir.glob("runs/*/*/*/stage*/checkpoints.jsonl")):
        records = read_checkpoints(index.parent)
        if records and records[-1].step < max_steps:
            return index.parent
    return None


def test_a_claim_is_held_by_one_holder_and_dropped_when_its_process_dies(tmp_path: Path) -> None:
    from sdft.continual.claims import Claim

    first, second = Claim(tmp_path, "chain"), Claim(tmp_path, "chain")
    assert first.take()
    assert not second.take()
    assert second.holder() == f"pid {os.getpid()}"
    first.release()
    assert second.take()
    second.release()

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from sdft.continual.claims import Claim;"
            f"c = Claim(Path({str(tmp_path)!r}), 'chain'); assert c.take(); print('held', "
            "flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waiting = Claim(tmp_path, "chain")
        assert not waiting.take() and waiting.holder() == f"pid {holder.pid}"
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait(timeout=60)
        assert waiting.take()
        waiting.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=60)


def test_two_processes_on_one_experiment_share_its_chains(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, max_steps=1)
    experiment = load_experiment(path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sdft.cli", "continual", str(path)]
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    trained = [
        {line.split(": ")[0] for line in err.splitlines() if line.endswith(": training 1 steps")}
        for _, err in outputs
    ]
    # every run trained by exactly one of the two, and both did some of the work
    assert not trained[0] & trained[1]
    assert trained[0] | trained[1] == {run.label for run in experiment.runs.values()}
    assert trained[0] and trained[1]
    assert any("run by pid " in err and "; left to it" in err for _, err in outputs)
    rows = results(experiment.output_dir)
    assert set(Counter(result_key(row) for row in rows).values()) == {1}
    assert len(rows) == 4 + 8 * 2 * 4
    # the process that finished last wrote the complete reports
    assert "Incomplete" not in (experiment.output_dir / "results.md").read_text()


def test_kill_9_mid_experiment_then_resume_counts_each_run_once(tmp_path: Path) -> None:
    path = write_experiment(
        tmp_path, max_steps=3, extra={"methods": [{"name": "sdft"}], "learning_rates": [1e-2]}
    )
    experiment = load_experiment(path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sdft.cli", "continual", str(path), "--parallel", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    interrupted = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            scored = list(experiment.output_dir.glob("runs/*/*/*/stage*/scores.json"))
            interrupted = _interrupted_run(experiment.output_dir, 3)
            if scored and interrupted is not None:
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read() if process.stderr else ""
    assert interrupted is not None
    done_before = {
        run.label for run in experiment.runs.values() if (run.output_dir / "scores.json").exists()
    }
    assert done_before

    result = run_experiment(experiment, parallel=2, log=lambda _: None)
    assert set(result.skipped) >= done_before
    assert not set(result.trained) & done_before
    rows = results(experiment.output_dir)
    assert set(Counter(result_key(row) for row in rows).values()) == {1}
    assert len(rows) == 4 + 2 * 2 * 4
    for run in experiment.runs.values():
        steps = Counter(
            row["step"] for row in RunLog(run.output_dir).read_metrics() if row["split"] == "train"
        )
        assert steps == Counter({1: 1, 2: 1, 3: 1}), run.label
        assert [r.step for r in read_checkpoints(run.output_dir)][-1] == 3


# --- the experiment file's errors --------------------------------------------------------------


def test_bad_experiment_files_answer_file_line_key_message(tmp_path: Path) -> None:
    write_experiment(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(
        "base_config: base.yaml\n"  # 1
        "methods:\n"  # 2
        "  - name: sft\n"  # 3
        "    overrides:\n"  # 4
        "      algorithm.kind: sft\n"  # 5
        "  - name: sdft\n"  # 6
        "    overrides:\n"  # 7
        "      algorithm.params.topk: -1\n"  # 8
        "learning_rates: [1.0e-3]\n"  # 9
        "stages:\n"  # 10
        "  - name: one\n"  # 11
        "    data: {path: data/s1.jsonl}\n"  # 12
        "    max_steps: 2\n"  # 13
    )
    with pytest.raises(ExperimentError) as caught:
        load_experiment(path)
    assert str(caught.value) == (
        f"{path}:8: methods[1].overrides.algorithm.params.topk: must be greater than or equal to 0"
    )

    path.write_text(
        "base_config: base.yaml\n"
        "methods: [{name: sdft, overrides: {algorithm: {params: {topkk: 3}}}}]\n"
        "learning_rates: [1.0e-3, -2]\n"
        "stages: [{name: one, data: {path: data/s1.jsonl}, max_steps: 2}]\n"
        "seeds: [0, 0]\n"
        "stage: 1\n"
    )
    with pytest.raises(ExperimentError) as caught:
        load_experiment(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}:3: learning_rates[1]: must be greater than 0"
    assert lines[1] == f"{path}:5: seeds: seed 0 is listed twice"
    assert lines[2].startswith(f"{path}:6: stage: unknown key (allowed: base_config, benchmarks,")

    path.write_text(
        "base_config: base.yaml\n"
        "methods: [{name: sdft, overrides: {algorithm: {params: {topkk: 3}}}}]\n"
        "learning_rates: [1.0e-3]\n"
        "stages:\n"
        "  - name: one\n"
        "    data: {path: data/s1.jsonl, source_kind: csv}\n"
        "    max_steps: 2\n"
    )
    with pytest.raises(ExperimentError) as caught:
        load_experiment(path)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(
        f"{path}:2: methods[0].overrides.algorithm.params.topkk: unknown key (allowed: "
    )
    assert lines[1].startswith(f"{path}:6: stages[0].data.source_kind: must be one of ")

    base = tmp_path / "base.yaml"
    base.write_text(base.read_text().replace("lora_rank: 4", "lora_rank: -4"))
    path.write_text(
        "base_config: base.yaml\n"
        "methods: [{name: sdft}]\n"
        "learning_rates: [1.0e-3]\n"
        "stages: [{name: one, data: {path: data/s1.jsonl}, max_steps: 2}]\n"
    )
    line = next(
        number
        for number, text in enumerate(base.read_text().splitlines(), start=1)
        if "lora_rank" in text
    )
    with pytest.raises(ExperimentError) as caught:
        load_experiment(path)
    assert str(caught.value) == (
        f"{base}:{line}: algorithm.params.lora_rank: must be greater than or equal to 0"
    )


def test_validate_checks_an_experiment_without_training(tmp_path: Path, capsys: Any) -> None:
    from sdft.cli import main

    path = write_experiment(tmp_path)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[ok  ] experiment           2 methods × 2 learning rates × 2 seeds = 8 chains" in out
    assert "[ok  ] stage 2 data         colours: 3 examples (jsonl)" in out
    assert "[ok  ] benchmark drift      drift, 2 prompts, kl, kl_full" in out
    assert not (tmp_path / "out").exists()
    (tmp_path / "data" / "b2" / "tasks.jsonl").write_text('{"task_id": "x"}\n')
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"[FAIL] benchmark b2         {tmp_path / 'data' / 'b2' / 'tasks.jsonl'}:1: " in out


def test_runner_rejects_parallel_below_one(tmp_path: Path) -> None:
    experiment = load_experiment(write_experiment(tmp_path))
    with pytest.raises(ValueError, match="--parallel must be >= 1, got 0"):
        ExperimentRunner(experiment, parallel=0)


def run_one_chain(tmp_path: Path) -> Path:
    """Run a one-chain experiment (sdft, lr 1e-2, seed 0, one step per stage); its file."""
    one_chain = {
        "methods": [{"name": "sdft"}],
        "learning_rates": [1e-2],
        "seeds": [0],
        "benchmarks": [],
    }
    path = write_experiment(tmp_path, max_steps=1, extra=one_chain)
    run_experiment(load_experiment(path), log=lambda _: None)
    return path


def test_a_scored_stage_whose_config_changed_is_not_silently_reused(tmp_path: Path) -> None:
    path = run_one_chain(tmp_path)
    base = tmp_path / "base.yaml"
    base.write_text(base.read_text().replace("max_tokens: 6", "max_tokens: 7"))
    with pytest.raises(ExperimentFailed) as caught:
        run_experiment(load_experiment(path), log=lambda _: None)
    run_dir = tmp_path / "out" / "runs" / "sdft" / "lr0.01" / "seed0" / "stage1-capitals"
    assert str(caught.value) == (
        "1 chain(s) failed: sdft/lr0.01/seed0: RuntimeError: "
        "sdft/lr0.01/seed0/stage1-capitals was trained and scored with another config "
        f"(algorithm.params.max_tokens changed); delete {run_dir} to redo it or use another "
        "output_dir"
    )


def test_a_stage_scored_before_a_config_key_existed_is_reused_when_the_key_holds_its_default(
    tmp_path: Path,
) -> None:
    path = run_one_chain(tmp_path)
    run_dir = tmp_path / "out" / "runs" / "sdft" / "lr0.01" / "seed0" / "stage1-capitals"
    scores_file = run_dir / "scores.json"
    stored = json.loads(scores_file.read_text())
    # as written before the step schedule keys were added to the config
    del stored["config"]["algorithm"]["params"]["streaming"]
    del stored["config"]["algorithm"]["params"]["overlap_sampling"]
    scores_file.write_text(json.dumps(stored))
    result = run_experiment(load_experiment(path), log=lambda _: None)
    assert result.trained == [] and "sdft/lr0.01/seed0/stage1-capitals" in result.skipped

    base = tmp_path / "base.yaml"
    config = yaml.safe_load(base.read_text())
    config["algorithm"]["params"]["streaming"] = False
    base.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(ExperimentFailed, match=r"\(algorithm\.params\.streaming changed\)"):
        run_experiment(load_experiment(path), log=lambda _: None)


def test_changed_keys_compares_nested_values_and_fills_absent_keys_with_defaults() -> None:
    from sdft.continual.runner import _changed_keys

    new = {"algorithm": {"params": {"streaming": True, "overlap_sampling": False, "lr": 1e-3}}}
    assert _changed_keys(None, new) == []
    assert _changed_keys({"algorithm": {"params": {"lr": 1e-3}}}, new) == []
    assert _changed_keys({"algorithm": {"params": {"lr": 2e-3}}}, new) == ["algorithm.params.lr"]
    overlapping = {"algorithm": {"params": {"lr": 1e-3, "overlap_sampling": True}}}
    assert _changed_keys({"algorithm": {"params": {"lr": 1e-3}}}, overlapping) == [
        "algorithm.params.overlap_sampling"
    ]
    # a stored None is a value like any other, and a key dropped from the config is a change
    assert _changed_keys({"model": {"revision": None}}, {"model": {"revision": "abc"}}) == [
        "model.revision"
    ]
    assert _changed_keys({"model": {"gone": 1}}, {"model": {}}) == ["model.gone"]
    # a key that is not in the config schema has no default to fill in
    assert _changed_keys({}, {"extra": 0}) == ["extra"]


def test_field_default_reads_the_config_schema() -> None:
    from sdft.config import NO_DEFAULT, field_default

    assert field_default(("algorithm", "params", "streaming")) is True
    assert field_default(("algorithm", "params", "overlap_sampling")) is False
    assert field_default(("algorithm", "kind")) == "sdft"
    assert field_default(("seed",)) == 0
    assert field_default(("data",)) is NO_DEFAULT  # required
    assert field_default(("output_dir",)) is NO_DEFAULT
    assert field_default(("algorithm", "params", "nope")) is NO_DEFAULT
    assert field_default(("seed", "deeper")) is NO_DEFAULT
    assert field_default(("teacher",)) is NO_DEFAULT
    section = field_default(("algorithm",))
    assert section["kind"] == "sdft" and section["params"]["streaming"] is True


def test_validate_deep_runs_the_teacher_check_of_every_stage(tmp_path: Path, capsys: Any) -> None:
    from sdft.cli import main

    path = write_experiment(tmp_path)
    assert main(["validate", str(path), "--deep"]) == 0
    out = capsys.readouterr().out
    for stage in (1, 2):
        line = next(ln for ln in out.splitlines() if f"stage {stage} teacher" in ln)
        assert "3 examples: golden-answer NLL/token" in line
        assert "KL(teacher || student)" in line and line.endswith("; base model)")
        assert f"stage {stage} prompts" in out
    assert not (tmp_path / "out" / "runs").exists()


def test_report_only_rebuilds_the_reports_without_training(
    finished: dict[str, Any], capsys: Any
) -> None:
    from sdft.cli import main

    experiment = finished["experiment"]
    output = experiment.output_dir
    before = (output / "results.md").read_text()
    for name in ("results.jsonl", "results.md", "tradeoff.png", "stages.png"):
        (output / name).unlink()
    assert main(["continual", str(experiment.path), "--report-only"]) == 0
    out = capsys.readouterr().out
    assert "Scored:    17 of 17 (base model included)" in out
    assert (output / "results.md").read_text() == before
    assert len(results(output)) == 4 + 8 * 2 * 4
    assert (output / "tradeoff.png").is_file() and (output / "stages.png").is_file()
