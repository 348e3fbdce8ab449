"""Evaluation: benchmarks see the student's prompt, verifiers score the final answer, and
``sdft eval`` writes only where an evaluation may write (issue 10 #2, #10, #14)."""

from __future__ import annotations

import json
from pathlib import Path

from sdft import data as sdft_data
from sdft.cli import main
from sdft.config import BenchmarkSection, load_config
from sdft.evals import benchmark_from_rows
from sdft.evaluation import evaluate_checkpoint, final_answer, scored_on_final_answers
from sdft.models import load_tokenizer
from sdft.runlog import RunLog
from support import TINY, Recorder, RecordingService, local_service, write_config


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_benchmarks_render_prompts_like_training(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path,
            params={"user_template": "Q: {question}\nA:", "system_prompt": "Be brief."},
            benchmarks=[
                {"name": "val", "path": "data/val"},
                {"name": "final", "path": "data/final", "user_template": "{question} One word."},
            ],
        )
    )
    recorder = Recorder()
    service = RecordingService(local_service(config), recorder)
    evaluate_checkpoint(config, service_client=service, progress=False)
    tokenizer = load_tokenizer(TINY)

    def student(question: str, template: str) -> list[int]:
        return sdft_data.build_student_prompt(
            question=question,
            tokenizer=tokenizer,
            user_template=template,
            system_prompt="Be brief.",
        ).to_ints()

    assert [s["prompt"].to_ints() for s in recorder.samples] == [
        student("Capital of France?", "Q: {question}\nA:"),
        student("Capital of Japan?", "Q: {question}\nA:"),
        student("Capital of Italy?", "{question} One word."),
    ]


def test_verifiers_score_the_text_after_the_last_think_marker() -> None:
    benchmark = benchmark_from_rows(
        "b",
        [
            {
                "task_id": "t",
                "instruction": "Capital of France?",
                "verifier": {"kind": "in_process", "fn_name": "exact", "expected": "Paris"},
            }
        ],
    )
    task = scored_on_final_answers(benchmark, BenchmarkSection(name="b", path=Path("x"))).tasks[0]
    assert task.verify("<think>Lyon? No, Paris.</think>\n\nParis")
    assert not task.verify("<think>Paris</think>Lyon")
    assert task.verify("Paris")  # no marker: the whole response is the answer
    whole = BenchmarkSection(name="b", path=Path("x"), answer_after=None)
    assert not scored_on_final_answers(benchmark, whole).tasks[0].verify("<think>x</think>Paris")
    assert final_answer("a</think>b</think> c", "</think>") == " c"


def test_eval_output_into_a_run_dir_keeps_its_metrics_and_summary(tmp_path: Path, capsys) -> None:
    config = write_config(
        tmp_path,
        params={"max_steps": 1, "save_every": 1},
        benchmarks=[{"name": "val", "path": "data/val"}],
    )
    assert run(capsys, "train", str(config), "--no-progress")[0] == 0
    out = tmp_path / "out"
    metrics, summary = (out / "metrics.jsonl").read_text(), (out / "summary.md").read_text()
    code, _, err = run(capsys, "eval", str(config), "--output", str(out), "--no-progress")
    assert (code, err) == (
        2,
        f"sdft: error: {out} holds a training run (config.resolved.yaml, checkpoints.jsonl, "
        "checkpoints); an evaluation would overwrite its metrics.jsonl and summary.md: choose "
        "another --output\n",
    )
    assert (out / "metrics.jsonl").read_text() == metrics
    assert (out / "summary.md").read_text() == summary

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "metrics.jsonl").write_text("mine\n")
    code, _, err = run(capsys, "eval", str(config), "--output", str(stray), "--no-progress")
    assert code == 2 and "holds metrics.jsonl that no evaluation wrote" in err
    assert (stray / "metrics.jsonl").read_text() == "mine\n"

    # An evaluation's own directory is replaced by the next evaluation, rows not duplicated.
    again = tmp_path / "again"
    for _ in range(2):
        assert run(capsys, "eval", str(config), "--output", str(again), "--no-progress")[0] == 0
    assert [(r["step"], r["split"]) for r in RunLog(again).read_metrics()] == [(0, "val")]
    marker = json.loads((again / "evaluation.json").read_text())
    assert marker == {"label": "base", "step": 0, "model": TINY, "checkpoint": None}


def test_paths_from_the_checkpoint_index_stay_inside_the_run(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path, params={"max_steps": 1})
    out = tmp_path / "out"
    out.mkdir()
    index = out / "checkpoints.jsonl"
    index.write_text(
        '{"name": "../../victim", "batch": 1, "sampler_path": "local://r/sampler_weights/x"}\n'
    )
    code, _, err = run(capsys, "eval", str(config), "--checkpoint", "last", "--no-progress")
    assert code == 2
    assert f"{index}:1: checkpoint name '../../victim' is not a plain name" in err
    assert not (tmp_path.parent / "victim").exists() and not (out / "victim").exists()

    for path in ("/etc", "checkpoints/../../victim", str(out / "checkpoints" / ".." / "..")):
        index.write_text(json.dumps({"name": "000001", "batch": 1, "sampler_path": path}) + "\n")
        code, _, err = run(capsys, "eval", str(config), "--checkpoint", "last", "--no-progress")
        assert (code, err) == (
            2,
            f"sdft: error: checkpoint 000001: sampler_path {path!r} is not a service path or an "
            f"absolute path inside the run's checkpoint root {out / 'checkpoints'}\n",
        )
    index.write_text('{"name": "1", "batch": 1, "sampler_path": "local://r/sampler_weights/.."}\n')
    code, _, err = run(capsys, "eval", str(config), "--checkpoint", "last", "--no-progress")
    assert code == 2 and "has '.' or '..' segments" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints.jsonl"]


def test_a_drift_benchmark_is_scored_in_the_loop_and_by_sdft_eval_alike(
    tmp_path: Path, capsys
) -> None:
    prompts = ["Tell me a joke.", "Name a fruit.", "What is rain?"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "drift.jsonl").write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": text}) + "\n" for i, text in enumerate(prompts)
        )
    )
    drift = {
        "name": "drift",
        "kind": "drift",
        "path": "data/drift.jsonl",
        "run_every": 2,
        "metrics": ["kl", "kl_full"],
        "max_tokens": 6,
    }
    config = write_config(
        tmp_path,
        params={"max_steps": 2, "save_every": 2, "learning_rate": 5e-2},
        benchmarks=[drift],
    )
    code, out, _ = run(capsys, "validate", str(config))
    assert code == 0
    assert (
        f"drift from the base model, 3 prompts, kl, kl_full, every 2 steps "
        f"({tmp_path / 'data' / 'drift.jsonl'})" in out
    )
    assert run(capsys, "train", str(config), "--no-progress")[0] == 0
    rows = [r for r in RunLog(tmp_path / "out").read_metrics() if r["split"] == "val"]
    assert [r["step"] for r in rows] == [0, 2]
    assert set(rows[0]["metrics"]) == {"val/drift/kl", "val/drift/kl_full"}
    # before training the student is the base model: both estimates are exactly 0
    assert rows[0]["metrics"] == {"val/drift/kl": 0.0, "val/drift/kl_full": 0.0}
    trained = rows[1]["metrics"]
    assert trained["val/drift/kl_full"] > 0.01
    predictions = [
        json.loads(line)
        for line in (tmp_path / "out" / "predictions" / "drift.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 3
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"- `val/drift/kl_full`: {trained['val/drift/kl_full']:.4f} (step 2)" in summary

    # `sdft eval` of the final checkpoint samples with the same seed: the same numbers
    target = tmp_path / "eval_last"
    code = run(capsys, "eval", str(config), "--checkpoint", "last", "--output", str(target))[0]
    assert code == 0
    (row,) = RunLog(target).read_metrics()
    assert row["step"] == 2 and row["metrics"] == trained
    target = tmp_path / "eval_base"
    assert run(capsys, "eval", str(config), "--output", str(target), "--no-progress")[0] == 0
    (row,) = RunLog(target).read_metrics()
    assert row["metrics"] == {"val/drift/kl": 0.0, "val/drift/kl_full": 0.0}
