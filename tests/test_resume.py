"""Resume: a run killed at any point continues from its last checkpoint with no lost or repeated
step in metrics.jsonl — including a real ``kill -9`` of a training subprocess."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdft.checkpoints import read_checkpoints
from sdft.config import load_config
from sdft.loop import RunDirectoryError, learning_rate_at, prepare_output_dir, train
from sdft.rundir import remove_outputs
from sdft.runlog import RunLog
from support import Recorder, RecordingService, RecordingTrainer, local_service, write_config

BENCH = [{"name": "val", "path": "data/val", "run_every": 2, "metrics": ["pass@1"]}]


def step_counts(output_dir: Path) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    for row in RunLog(output_dir).read_metrics():
        counts.setdefault(row["split"], Counter())[row["step"]] += 1
    return counts


def assert_each_step_once(output_dir: Path, max_steps: int, val_steps: list[int]) -> None:
    counts = step_counts(output_dir)
    assert counts["train"] == Counter(range(1, max_steps + 1))
    assert counts.get("val", Counter()) == Counter(val_steps)


class Crash(RuntimeError):
    pass


class CrashingTrainer(RecordingTrainer):
    """Raises on the ``crash_at``-th optim_step: a failure in the middle of a step."""

    def __init__(self, inner: Any, recorder: Recorder, crash_at: int) -> None:
        super().__init__(inner, recorder)
        self.crash_at = crash_at

    def optim_step(self, *args, **kwargs):
        self.recorder.optim_steps = getattr(self.recorder, "optim_steps", 0) + 1
        if self.recorder.optim_steps == self.crash_at:
            raise Crash(f"simulated crash at optimizer step {self.crash_at}")
        return super().optim_step(*args, **kwargs)


class CrashingService(RecordingService):
    def __init__(self, inner: Any, recorder: Recorder, crash_at: int) -> None:
        super().__init__(inner, recorder)
        self.crash_at = crash_at

    def _training(self, method: str, *args, **kwargs):
        future = super()._training(method, *args, **kwargs)
        future.wrap = lambda client: CrashingTrainer(client, self.recorder, self.crash_at)
        return future


def training_prompts(recorder: Recorder) -> list[list[int]]:
    """The student's on-policy rollout prompts in order (evaluations sample greedily)."""
    return [
        s["prompt"].to_ints()
        for s in recorder.samples
        if s["role"] == "student" and s["sampling_params"].temperature == 1.0
    ]


def test_crash_mid_step_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    params = {"max_steps": 5, "save_every": 2}
    reference_path = write_config(tmp_path, params=params, benchmarks=BENCH, output_dir="ref")
    reference = Recorder()
    config = load_config(reference_path)
    train(config, service_client=RecordingService(local_service(config), reference), progress=False)

    config = load_config(write_config(tmp_path, params=params, benchmarks=BENCH))
    first = Recorder()
    # Optimizer steps 1-3 succeed; the 4th (step 4) fails after its rollouts were sampled.
    with pytest.raises(Crash):
        train(
            config,
            service_client=CrashingService(local_service(config), first, crash_at=4),
            progress=False,
        )
    out = config.output_dir
    assert "- Status: **failed**" in (out / "summary.md").read_text()
    assert [r.step for r in read_checkpoints(out)] == [2]
    assert step_counts(out)["train"] == Counter(
        {1: 1, 2: 1, 3: 1}
    )  # step 3 ran past the checkpoint

    second = Recorder()
    result = train(
        config,
        resume=True,
        service_client=RecordingService(local_service(config), second),
        progress=False,
    )
    assert result.status == "completed" and result.steps_completed == 5
    assert_each_step_once(out, 5, [0, 2, 4, 5])
    assert (
        next(m for m, _, _ in second.created) == "create_training_client_from_state_with_optimizer"
    )

    # Batch i is the same batch: the resumed steps 3-5 roll out on the reference's prompts.
    assert training_prompts(second) == training_prompts(reference)[4:]
    # Weights and optimizer state come back exactly, and sampling is seeded per step: the resumed
    # steps reproduce the uninterrupted run's losses.
    ref_rows = {
        r["step"]: r for r in RunLog(tmp_path / "ref").read_metrics() if r["split"] == "train"
    }
    rows = {r["step"]: r for r in RunLog(out).read_metrics() if r["split"] == "train"}
    for step in range(1, 6):
        assert math.isclose(
            rows[step]["metrics"]["train/loss_sum"],
            ref_rows[step]["metrics"]["train/loss_sum"],
            rel_tol=1e-4,
        ), step


@pytest.mark.parametrize(
    "teacher",
    [{"mode": "ema", "ema_alpha": 0.5}, {"mode": "sync", "sync_every": 2}],
    ids=["ema", "sync"],
)
def test_a_following_teacher_is_restored_on_resume(tmp_path: Path, teacher: dict) -> None:
    """The EMA teacher's average is saved with the state checkpoint, the synced teacher's path
    with the checkpoint row: after a resume the teacher scores like the uninterrupted run's (an
    EMA teacher used to restart from the resumed student's weights)."""
    params = {"max_steps": 4, "save_every": 2, "learning_rate": 2e-2, "teacher": teacher}
    reference = load_config(write_config(tmp_path, params=params, output_dir="ref", benchmarks=[]))
    train(reference, service_client=local_service(reference), progress=False)

    short = load_config(
        write_config(tmp_path, params={**params, "max_steps": 2}, benchmarks=[], name="short.yaml")
    )
    train(short, service_client=local_service(short), progress=False)
    resumed = load_config(write_config(tmp_path, params=params, benchmarks=[]))
    assert resumed.output_dir == short.output_dir
    train(resumed, resume=True, service_client=local_service(resumed), progress=False)

    def teacher_metrics(output_dir: Path) -> dict[int, tuple[float, float]]:
        return {
            r["step"]: (r["metrics"]["train/teacher_entropy"], r["metrics"]["train/loss_sum"])
            for r in RunLog(output_dir).read_metrics()
            if r["split"] == "train"
        }

    expected, got = teacher_metrics(tmp_path / "ref"), teacher_metrics(resumed.output_dir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for a, b in zip(got[step], expected[step], strict=True):
            assert math.isclose(a, b, rel_tol=1e-4), (step, got[step], expected[step])


def test_resume_without_any_checkpoint_starts_over_once(tmp_path: Path) -> None:
    config = load_config(
        write_config(tmp_path, params={"max_steps": 3, "save_every": 5}, benchmarks=BENCH)
    )
    with pytest.raises(Crash):
        train(
            config,
            service_client=CrashingService(local_service(config), Recorder(), crash_at=2),
            progress=False,
        )
    assert step_counts(config.output_dir) == {"val": Counter({0: 1}), "train": Counter({1: 1})}
    result = train(config, resume=True, service_client=local_service(config), progress=False)
    assert result.steps_completed == 3
    assert_each_step_once(config.output_dir, 3, [0, 2, 3])


def test_resume_of_a_finished_run_changes_nothing_and_longer_runs_continue(tmp_path: Path) -> None:
    config = load_config(
        write_config(tmp_path, params={"max_steps": 2, "save_every": 1}, benchmarks=BENCH)
    )
    train(config, service_client=local_service(config), progress=False)
    before = (config.output_dir / "metrics.jsonl").read_text()
    again = train(config, resume=True, service_client=local_service(config), progress=False)
    assert again.status == "completed" and again.steps_completed == 2
    assert (config.output_dir / "metrics.jsonl").read_text() == before
    assert again.benchmark_metrics.keys() == {"val/val/pass@1"}

    config.algorithm.params.max_steps = 4
    longer = train(config, resume=True, service_client=local_service(config), progress=False)
    assert longer.steps_completed == 4
    assert_each_step_once(config.output_dir, 4, [0, 2, 4])


def _wait_for_train_step(
    output_dir: Path, step: int, process: subprocess.Popen, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early with {process.returncode}")
        counts = step_counts(output_dir) if (output_dir / "metrics.jsonl").exists() else {}
        if max(counts.get("train", {0: 0}), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"no train row for step {step} within {timeout} s")


def test_kill_9_mid_run_then_resume(tmp_path: Path) -> None:
    max_steps = 10
    config_path = write_config(
        tmp_path, params={"max_steps": max_steps, "save_every": 3}, benchmarks=BENCH
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sdft.cli", "train", str(config_path), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for kill_after in (2, 6):
        args = command + (["--resume"] if kill_after != 2 else [])
        process = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            _wait_for_train_step(out, kill_after, process, timeout=240)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == -signal.SIGKILL
        counts = step_counts(out)["train"]
        assert max(counts) >= kill_after and set(counts.values()) == {1}
        assert "- Status: **running**" in (out / "summary.md").read_text()

    finished = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stderr
    assert "Status:    completed" in finished.stdout
    assert "Steps:     10/10" in finished.stdout
    assert_each_step_once(out, max_steps, [0, 2, 4, 6, 8, 10])
    records = read_checkpoints(out)
    assert records[-1].step == max_steps and records[-1].final
    assert [r.step for r in records] == sorted({r.step for r in records})
    assert "- Status: **completed**" in (out / "summary.md").read_text()


# --- the run directory: overwrite, resume rules (issue 10) -----------------------------------


def _with_run_outputs(config) -> Path:
    """``output_dir`` holding what a run writes (without training)."""
    prepare_output_dir(config, resume=False, overwrite=False)
    out = config.output_dir
    (out / "metrics.jsonl").write_text('{"step": 1, "split": "train", "metrics": {}}\n')
    (out / "summary.md").write_text("old summary")
    (out / "plot.png").write_bytes(b"png")
    (out / "predictions").mkdir()
    (out / "predictions" / "val.jsonl").write_text("{}\n")
    (out / "checkpoints.jsonl").write_text("")
    return out


def _with_checkpoint_root(config_path: Path, root: str) -> Path:
    raw = yaml.safe_load(config_path.read_text())
    raw["backend"]["checkpoint_root"] = root
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config_path


def test_overwrite_keeps_a_symlinked_checkpoints_dir_and_everything_behind_it(
    tmp_path: Path,
) -> None:
    config = load_config(write_config(tmp_path, params={"max_steps": 1}, benchmarks=[]))
    out = _with_run_outputs(config)
    elsewhere = tmp_path / "big-disk"
    (elsewhere / "000001").mkdir(parents=True)
    (elsewhere / "000001" / "weights.bin").write_bytes(b"weights")
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    prepare_output_dir(config, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.resolved.yaml"]
    assert (out / "checkpoints").is_symlink()
    assert (elsewhere / "000001" / "weights.bin").read_bytes() == b"weights"


def test_overwrite_leaves_output_dir_checkpoints_when_the_checkpoint_root_is_elsewhere(
    tmp_path: Path,
) -> None:
    config = load_config(
        _with_checkpoint_root(
            write_config(tmp_path, params={"max_steps": 1}, benchmarks=[]), "shared-root"
        )
    )
    out = _with_run_outputs(config)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "notes.txt").write_text("not this run's")
    prepare_output_dir(config, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.resolved.yaml"]
    assert (out / "checkpoints" / "notes.txt").read_text() == "not this run's"


def test_overwrite_removes_the_eval_results_of_the_deleted_run(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, params={"max_steps": 1}, benchmarks=[]))
    out = _with_run_outputs(config)
    (out / "eval" / "000001" / "predictions").mkdir(parents=True)
    (out / "eval" / "000001" / "metrics.jsonl").write_text("")
    prepare_output_dir(config, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.yaml"]


def test_a_base_model_evaluation_alone_does_not_block_a_new_run(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, params={"max_steps": 1}, benchmarks=[]))
    base = config.output_dir / "eval" / "base"
    base.mkdir(parents=True)
    (base / "metrics.jsonl").write_text("")
    assert prepare_output_dir(config, resume=False, overwrite=False) is None
    assert (base / "metrics.jsonl").exists()


def test_overwrite_that_cannot_remove_an_entry_deletes_nothing(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, params={"max_steps": 1}, benchmarks=[]))
    out = _with_run_outputs(config)
    before = sorted(p.name for p in out.iterdir())
    missing = out / "gone.jsonl"
    with pytest.raises(
        RunDirectoryError, match=r"gone.jsonl for --overwrite .*nothing was deleted"
    ):
        remove_outputs(out, [out / "metrics.jsonl", out / "summary.md", missing])
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "summary.md").read_text() == "old summary"


def test_resume_without_the_resolved_config_is_refused(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, params={"max_steps": 1}, benchmarks=[]))
    out = _with_run_outputs(config)
    (out / "config.resolved.yaml").unlink()
    changed = load_config(
        write_config(tmp_path, params={"max_steps": 1, "learning_rate": 0.5}, benchmarks=[])
    )
    with pytest.raises(
        RunDirectoryError,
        match=r"cannot resume .*: config.resolved.yaml is missing, so the config the run started "
        r"with cannot be compared with this one",
    ):
        prepare_output_dir(changed, resume=True, overwrite=False)
    assert (out / "metrics.jsonl").read_text() != ""


def test_resume_refuses_to_rebase_a_decaying_lr_schedule(tmp_path: Path) -> None:
    """The schedule spans the max_steps a run started with: extending a linear schedule on resume
    would make the learning rate jump up, so only a constant schedule may change max_steps."""
    params = {"max_steps": 4, "lr_schedule": "linear", "learning_rate": 1.0}
    config = load_config(write_config(tmp_path, params=params, benchmarks=[]))
    prepare_output_dir(config, resume=False, overwrite=False)
    assert learning_rate_at(config, 4) == 0.25
    config.algorithm.params.max_steps = 6
    with pytest.raises(
        RunDirectoryError,
        match=r"with max_steps 6: lr_schedule linear decays over the max_steps the run started "
        r"with \(4\), and changing it would re-base the learning rate mid-run; keep max_steps 4",
    ):
        prepare_output_dir(config, resume=True, overwrite=False)
    config.algorithm.params.max_steps = 4
    assert prepare_output_dir(config, resume=True, overwrite=False) is None
    constant = load_config(write_config(tmp_path, params={"max_steps": 6}, benchmarks=[]))
    with pytest.raises(RunDirectoryError, match=r"the config changed .*lr_schedule"):
        prepare_output_dir(constant, resume=True, overwrite=False)


def test_a_failed_data_load_leaves_no_run_directory(tmp_path: Path) -> None:
    path = write_config(tmp_path, params={"max_steps": 1, "save_every": None}, benchmarks=[])
    good = (tmp_path / "data" / "train.jsonl").read_text()
    (tmp_path / "data" / "train.jsonl").write_text('{"inputs": {"question": "q"}}\n')
    config = load_config(path)
    with pytest.raises(ValueError, match=r"train\.jsonl:1"):
        train(config, service_client=local_service(config), progress=False)
    assert not config.output_dir.exists()
    (tmp_path / "data" / "train.jsonl").write_text(good)
    result = train(config, service_client=local_service(config), progress=False)
    assert result.status == "completed" and result.steps_completed == 1


def test_resume_refuses_a_foreign_checkpoint(tmp_path: Path) -> None:
    """checkpoints.jsonl names a checkpoint of another run (LoRA rank 8) while the run's config
    says rank 4: resuming must refuse instead of training the foreign weights."""
    configs = {}
    for name, rank in (("a", 8), ("b", 4)):
        path = write_config(
            tmp_path,
            params={"max_steps": 1, "save_every": 1, "lora_rank": rank},
            benchmarks=[],
            name=f"{name}.yaml",
            output_dir=name,
        )
        configs[name] = load_config(_with_checkpoint_root(path, "shared-root"))
        train(configs[name], service_client=local_service(configs[name]), progress=False)
    foreign = read_checkpoints(tmp_path / "a")[-1].state_path
    index = tmp_path / "b" / "checkpoints.jsonl"
    row = json.loads(index.read_text())
    row["state_path"] = foreign
    index.write_text(json.dumps(row) + "\n")
    summary = (tmp_path / "b" / "summary.md").read_text()
    config = configs["b"]
    config.algorithm.params.max_steps = 2
    with pytest.raises(
        RunDirectoryError,
        match=rf"cannot resume .* from checkpoint 000001 \({re.escape(foreign)}\): its LoRA rank is 8, "
        "the config says 4",
    ):
        train(config, resume=True, service_client=local_service(config), progress=False)
    assert (tmp_path / "b" / "summary.md").read_text() == summary


def test_a_torn_checkpoint_row_is_replaced_by_the_next_one(tmp_path: Path) -> None:
    config = load_config(
        write_config(tmp_path, params={"max_steps": 3, "save_every": 1}, benchmarks=[])
    )
    train(config, service_client=local_service(config), progress=False)
    index = config.output_dir / "checkpoints.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])  # a kill in the middle of a write
    assert [r.step for r in read_checkpoints(config.output_dir)] == [1, 2]
    first = train(config, resume=True, service_client=local_service(config), progress=False)
    second = train(config, resume=True, service_client=local_service(config), progress=False)
    assert first.steps_completed == second.steps_completed == 3
    assert [r.step for r in read_checkpoints(config.output_dir)] == [1, 2, 3]
    assert all(json.loads(line) for line in index.read_text().splitlines())
    assert_each_step_once(config.output_dir, 3, [])


def test_sigterm_ends_the_run_as_interrupted_and_resume_continues(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, params={"max_steps": 6, "save_every": 2}, benchmarks=[])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sdft.cli", "train", str(config_path), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_train_step(out, 3, process, timeout=240)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert stderr.endswith("sdft: interrupted\n")
    assert "- Status: **interrupted**" in (out / "summary.md").read_text()
    steps = [r.step for r in read_checkpoints(out)]
    assert steps and steps == sorted(set(steps)) and steps[-1] >= 2
    config = load_config(config_path)
    result = train(config, resume=True, service_client=local_service(config), progress=False)
    assert result.status == "completed" and result.steps_completed == 6
    assert_each_step_once(out, 6, [])
