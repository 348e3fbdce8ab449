"""Run outputs: metrics.jsonl, predictions, summary.md, plots, the checkpoints.jsonl index."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest

from sdft import checkpoints as ckpt
from sdft.plots import write_comparison_plot, write_metrics_plot
from sdft.rundir import remove_outputs
from sdft.runlog import (
    RunLog,
    benchmark_series,
    comparison_markdown,
    existing_outputs,
    final_metrics,
    render_summary,
)


def sample_rows() -> list[dict]:
    return [
        {"step": 0, "split": "val", "metrics": {"val/learned/pass@1": 0.25}},
        {"step": 1, "split": "train", "metrics": {"train/mean_loss": 2.0, "train/tokens": 10}},
        {"step": 2, "split": "train", "metrics": {"train/mean_loss": 1.5, "train/tokens": 12}},
        {"step": 2, "split": "val", "metrics": {"val/learned/pass@1": 0.5}},
        {"step": 2, "split": "test", "metrics": {"test/retained/pass@1": 1.0}},
    ]


def test_metrics_rows_append_and_read_back(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    for row in sample_rows():
        log.log_metrics(row["step"], row["split"], row["metrics"])
    assert log.read_metrics() == sample_rows()
    lines = log.metrics_path.read_text().splitlines()
    assert json.loads(lines[1]) == {
        "step": 1,
        "split": "train",
        "metrics": {"train/mean_loss": 2.0, "train/tokens": 10},
    }


def test_non_finite_values_round_trip_instead_of_turning_into_null(tmp_path: Path) -> None:
    """A diverged step must stay visible in the log (issue 10 #6: NaN used to become null)."""
    log = RunLog(tmp_path)
    log.log_metrics(3, "train", {"train/mean_loss": float("nan"), "x": float("inf"), "y": None})
    log.log_metrics(4, "train", {"x": float("-inf")})
    assert json.loads(log.metrics_path.read_text().splitlines()[0]) == {
        "step": 3,
        "split": "train",
        "metrics": {"train/mean_loss": "NaN", "x": "Infinity", "y": None},
    }
    first, second = log.read_metrics()
    assert math.isnan(first["metrics"]["train/mean_loss"])
    assert first["metrics"]["x"] == math.inf and first["metrics"]["y"] is None
    assert second["metrics"] == {"x": -math.inf}
    log.keep_steps_up_to(3)
    assert log.metrics_path.read_text().splitlines() == [
        '{"step": 3, "split": "train", "metrics": {"train/mean_loss": "NaN", "x": "Infinity", '
        '"y": null}}'
    ]


def test_keep_steps_up_to_drops_later_rows_and_a_torn_line(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    for row in sample_rows():
        log.log_metrics(row["step"], row["split"], row["metrics"])
    with open(log.metrics_path, "a") as handle:
        handle.write('{"step": 3, "split": "tra')  # a kill in the middle of a write
    assert log.keep_steps_up_to(1) == 3
    assert log.read_metrics() == sample_rows()[:2]
    assert log.metrics_path.read_text().endswith("\n")
    assert log.keep_steps_up_to(-1) == 2
    assert log.read_metrics() == []
    assert RunLog(tmp_path / "nothing").keep_steps_up_to(5) == 0


def test_malformed_metrics_row_names_file_and_line(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    log.metrics_path.write_text('{"step": 1, "split": "train", "metrics": {}}\n{"step": "x"}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: 'step' must be integer, got string$"):
        log.read_metrics()
    log.metrics_path.write_text('{"step": 1, "split": "train"}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: missing key 'metrics'$"):
        log.read_metrics()


def test_predictions_latest_and_per_step(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    log.write_predictions("learned", 4, [{"task_id": "a", "correct": True}])
    log.write_predictions("learned", 8, [{"task_id": "a", "correct": False}])
    latest = tmp_path / "predictions" / "learned.jsonl"
    assert [json.loads(x) for x in latest.read_text().splitlines()] == [
        {"task_id": "a", "correct": False}
    ]
    step4 = tmp_path / "predictions" / "learned.step4.jsonl"
    assert json.loads(step4.read_text()) == {"task_id": "a", "correct": True}
    assert (tmp_path / "predictions" / "learned.step8.jsonl").read_text() == latest.read_text()


def test_final_metrics_and_series() -> None:
    rows = sample_rows()
    assert final_metrics(rows, "train") == (2, {"train/mean_loss": 1.5, "train/tokens": 12})
    assert final_metrics(rows, "nothing") is None
    assert benchmark_series(rows) == {
        "val/learned/pass@1": [(0, 0.25), (2, 0.5)],
        "test/retained/pass@1": [(2, 1.0)],
    }


def test_summary_content() -> None:
    text = render_summary(
        sample_rows(),
        status="completed",
        steps_completed=2,
        max_steps=2,
        description="sdft on tiny",
        outputs=["`metrics.jsonl`: rows"],
    )
    lines = text.splitlines()
    assert lines[0] == "# sdft run summary"
    assert "- Status: **completed**" in lines
    assert "- Steps: 2 / 2" in lines
    assert "- Run: sdft on tiny" in lines
    assert "| `train/mean_loss` | 1.5 |" in lines
    assert "| `train/tokens` | 12 |" in lines
    assert "- `val/learned/pass@1`: 0.5000 (step 2); step 0: 0.2500, change +0.2500" in lines
    assert "- `test/retained/pass@1`: 1.0000 (step 2)" in lines
    assert "- `metrics.jsonl`: rows" in lines


def test_summary_of_an_empty_failed_run(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    path = log.write_summary(status="failed", steps_completed=0, max_steps=5, error="boom")
    text = path.read_text()
    assert "- Status: **failed**" in text
    assert "- Error: boom" in text
    assert "No training step has completed yet." in text
    assert "No benchmark has been scored yet." in text
    with pytest.raises(ValueError, match="status must be one of running, completed, failed"):
        log.write_summary(status="done", steps_completed=0, max_steps=5)


def test_plots_are_png_files(tmp_path: Path) -> None:
    write_metrics_plot(sample_rows(), tmp_path / "plot.png", title="run")
    image = matplotlib.image.imread(tmp_path / "plot.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    write_comparison_plot(
        {"sdft": sample_rows(), "sft": sample_rows()[:3]}, tmp_path / "cmp.png", title="x"
    )
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))
    log = RunLog(tmp_path / "empty")
    assert log.write_plot() is None


def test_comparison_table() -> None:
    table = comparison_markdown({"sdft": sample_rows(), "sft": sample_rows()[:2]})
    lines = table.splitlines()
    assert lines[0] == (
        "| run | steps | final train/mean_loss | test/retained/pass@1 (start) | "
        "test/retained/pass@1 (end) | val/learned/pass@1 (start) | val/learned/pass@1 (end) |"
    )
    assert lines[2] == (
        "| sdft | 2 | 1.5 | 1.000 (step 2) | 1.000 (step 2) | 0.250 (step 0) | 0.500 (step 2) |"
    )
    assert lines[3] == "| sft | 1 | 2 | - | - | 0.250 (step 0) | 0.250 (step 0) |"


def test_existing_and_removed_outputs_touch_only_run_files(tmp_path: Path) -> None:
    assert existing_outputs(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "a.jsonl").write_text("")
    (tmp_path / "checkpoints.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    assert existing_outputs(tmp_path) == ["metrics.jsonl", "predictions", "checkpoints.jsonl"]
    remove_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --- checkpoints.jsonl ------------------------------------------------------------------------


def test_checkpoint_index_round_trip_and_lookup(tmp_path: Path) -> None:
    first = ckpt.CheckpointRecord("000002", 2, "local://r/weights/000002", "local://r/s/000002")
    sampler_only = ckpt.CheckpointRecord("s3", 3, None, "local://r/sampler_weights/s3")
    last = ckpt.CheckpointRecord(
        "000004", 4, "local://r/weights/000004", "local://r/s/000004", True, {"teacher_path": "t"}
    )
    for record in (first, sampler_only, last):
        ckpt.append_checkpoint(tmp_path, record)
    rows = [json.loads(x) for x in (tmp_path / "checkpoints.jsonl").read_text().splitlines()]
    assert rows[2] == {
        "name": "000004",
        "batch": 4,
        "step": 4,
        "state_path": "local://r/weights/000004",
        "sampler_path": "local://r/s/000004",
        "final": True,
        "teacher_path": "t",
    }
    assert ckpt.read_checkpoints(tmp_path) == [first, sampler_only, last]
    assert ckpt.last_checkpoint(tmp_path) == last
    assert ckpt.find_checkpoint(tmp_path, "000002") == first
    assert ckpt.find_checkpoint(tmp_path, "local://r/s/000004") == last
    assert ckpt.find_checkpoint(tmp_path, "last") == last
    assert ckpt.find_checkpoint(tmp_path, "nope") is None
    with open(tmp_path / "checkpoints.jsonl", "a") as handle:
        handle.write('{"name": "000006", "batch": 6, "state_pa')  # torn by a kill
    assert ckpt.last_checkpoint(tmp_path) == last
    assert ckpt.last_checkpoint(tmp_path / "none") is None


def test_cookbook_rows_without_step_key_are_read(tmp_path: Path) -> None:
    (tmp_path / "checkpoints.jsonl").write_text(
        '{"name": "000020", "batch": 20, "state_path": "tinker://x/weights/000020"}\n'
        '{"name": "final", "batch": 30, "final": true, "sampler_path": "tinker://x/s/final"}\n'
    )
    record = ckpt.last_checkpoint(tmp_path)
    assert (record.name, record.step, record.state_path) == (
        "000020",
        20,
        "tinker://x/weights/000020",
    )
    assert ckpt.last_checkpoint(tmp_path, required_key="sampler_path").name == "final"


def test_bad_checkpoint_rows_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "checkpoints.jsonl").write_text('{"name": "a", "batch": 1}\n{"name": "b"}\n')
    with pytest.raises(
        ValueError, match=r"checkpoints.jsonl:2: checkpoint row needs a non-negative"
    ):
        ckpt.read_checkpoints(tmp_path)


class _Future:
    def __init__(self, value):
        self.value = value

    async def result_async(self):
        return self.value


class _SavingClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def save_state(self, name):
        self.calls.append(("save_state", name))
        return _Future(SimpleNamespace(path=f"local://run/weights/{name}"))

    def save_weights_for_sampler(self, name):
        self.calls.append(("save_weights_for_sampler", name))
        return _Future(SimpleNamespace(path=f"local://run/sampler_weights/{name}"))


def test_save_checkpoint_saves_both_then_indexes(tmp_path: Path) -> None:
    client = _SavingClient()
    record = asyncio.run(ckpt.save_checkpoint(client, tmp_path, 12, extra={"teacher_path": "t"}))
    assert client.calls == [("save_state", "000012"), ("save_weights_for_sampler", "000012")]
    assert record == ckpt.CheckpointRecord(
        "000012",
        12,
        "local://run/weights/000012",
        "local://run/sampler_weights/000012",
        False,
        {"teacher_path": "t"},
    )
    assert ckpt.read_checkpoints(tmp_path) == [record]
