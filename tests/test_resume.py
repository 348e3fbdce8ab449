"""Resume: a run killed at any point continues from its last checkpoint with no lost or repeated
step in metrics.jsonl — including a real ``kill -9`` of a training subprocess."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sdft.checkpoints import read_checkpoints
from sdft.config import load_config
from sdft.loop import train
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
