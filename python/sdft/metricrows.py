"""Queries over ``metrics.jsonl`` rows (``{"step", "split", "metrics"}``), shared by the summary,
the plots, the comparison table and the run result. A leaf module: plain data in, plain data out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

LOSS_KEY = "train/mean_loss"
KL_KEY = "train/teacher_student_kl"
TRAIN_SPLIT = "train"
TEACHER_CHECK_SPLIT = "teacher_check"


def benchmark_metric_key(split: str, name: str, metric: str) -> str:
    return f"{split}/{name}/{metric}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def final_metrics(
    rows: Sequence[Mapping[str, Any]], split: str
) -> tuple[int, dict[str, Any]] | None:
    """The step and merged metrics of the last step that has rows of ``split``."""
    steps = [row["step"] for row in rows if row["split"] == split]
    if not steps:
        return None
    last = max(steps)
    merged: dict[str, Any] = {}
    for row in rows:
        if row["split"] == split and row["step"] == last:
            merged.update(row["metrics"])
    return last, merged


def benchmark_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{metric key: [(step, value), ...]}`` for every non-train metric, steps ascending."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["split"] in (TRAIN_SPLIT, TEACHER_CHECK_SPLIT):
            continue
        for key, value in row["metrics"].items():
            if _is_number(value):
                series.setdefault(key, []).append((row["step"], float(value)))
    for points in series.values():
        points.sort(key=lambda point: point[0])
    return series


def loss_series(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """``[(step, train/mean_loss), ...]`` of the train rows that have a numeric loss."""
    points = [
        (row["step"], float(row["metrics"][LOSS_KEY]))
        for row in rows
        if row["split"] == TRAIN_SPLIT and _is_number(row["metrics"].get(LOSS_KEY))
    ]
    return sorted(points)


def training_signal(rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, float]]]:
    """What the plots show for training: ``train/teacher_student_kl`` when the run logs it (SDFT's
    top-K cross-entropy minus the teacher's entropy, which goes to 0 as the student matches the
    teacher), else ``train/mean_loss``."""
    points = sorted(
        (row["step"], float(row["metrics"][KL_KEY]))
        for row in rows
        if row["split"] == TRAIN_SPLIT and _is_number(row["metrics"].get(KL_KEY))
    )
    return (KL_KEY, points) if points else (LOSS_KEY, loss_series(rows))


def last_train_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The metrics of the last train row (``{}`` before the first step)."""
    train_rows = [row for row in rows if row["split"] == TRAIN_SPLIT]
    return dict(train_rows[-1]["metrics"]) if train_rows else {}


def latest_benchmark_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``{metric key: value at its latest step}`` for every benchmark metric."""
    return {key: points[-1][1] for key, points in benchmark_series(rows).items()}
