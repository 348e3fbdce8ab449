"""What a run writes into its ``output_dir``: metrics, predictions, summary, plot.

- ``metrics.jsonl``: one row per step and split, ``{"step", "split", "metrics"}``. Train rows carry
  ``train/mean_loss`` and friends (``split: "train"``); benchmark rows carry
  ``<split>/<benchmark>/pass@K`` with the split named in the benchmark entry.
- ``predictions/<name>.jsonl``: the latest evaluation of each benchmark, plus a per-step copy
  ``predictions/<name>.step<N>.jsonl``.
- ``summary.md``: status (running, completed, failed, interrupted), steps, final train metrics,
  one line per benchmark metric, the list of outputs.
- ``plot.png``: loss and every benchmark metric over steps (:mod:`sdft.plots`).

Every file is written atomically (:mod:`sdft._atomic`); ``metrics.jsonl`` is appended line by line
and rewritten atomically when a resumed run drops the rows of steps it will redo. Non-finite
metric values are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (JSON has no
such numbers) and read back as floats. File names come from :mod:`sdft.runfiles`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sdft import _atomic
from sdft.metricrows import (
    TEACHER_CHECK_SPLIT,
    benchmark_metric_key,
    benchmark_series,
    final_metrics,
)
from sdft.plots import write_metrics_plot
from sdft.redact import redact
from sdft.runfiles import (
    CHECKPOINT_INDEX_NAME,
    CHECKPOINTS_DIR,
    METRICS_NAME,
    PLOT_NAME,
    PREDICTIONS_DIR,
    RESOLVED_CONFIG_NAME,
    RUN_OUTPUTS,
    SUMMARY_NAME,
    existing_outputs,
)

STATUSES = ("running", "completed", "failed", "interrupted")


# JSON has no NaN or infinity: they are written as these strings (what JavaScript's Number()
# parses) and read back as floats, so a diverged step stays visible instead of turning into null.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _read_number(value: Any) -> Any:
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


class RunLog:
    """Writer and reader of one run's output directory."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_NAME

    @property
    def summary_path(self) -> Path:
        return self.output_dir / SUMMARY_NAME

    @property
    def plot_path(self) -> Path:
        return self.output_dir / PLOT_NAME

    @property
    def predictions_dir(self) -> Path:
        return self.output_dir / PREDICTIONS_DIR

    # --- metrics -----------------------------------------------------------------------------

    def log_metrics(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = self._row(step, split, metrics)
        _atomic.append_line(self.metrics_path, json.dumps(row, sort_keys=False))
        return row

    def read_metrics(self) -> list[dict[str, Any]]:
        rows = _atomic.read_jsonl(
            self.metrics_path, required_keys={"step": int, "split": str, "metrics": dict}
        )
        for row in rows:
            row["metrics"] = {key: _read_number(value) for key, value in row["metrics"].items()}
        return rows

    def keep_steps_up_to(self, step: int) -> int:
        """Drop every metrics row with a step after ``step`` (a resumed run redoes those steps).

        Also drops a torn last line. Returns the number of rows dropped.
        """
        if not self.metrics_path.exists():
            return 0
        rows = self.read_metrics()
        kept = [row for row in rows if row["step"] <= step]
        self.write_metrics(kept)
        return len(rows) - len(kept)

    def write_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` with ``rows``, atomically."""
        text = "".join(
            json.dumps(self._row(row["step"], row["split"], row["metrics"]), sort_keys=False) + "\n"
            for row in rows
        )
        _atomic.write_text(self.metrics_path, text)

    @staticmethod
    def _row(step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "step": int(step),
            "split": split,
            "metrics": {key: _json_number(value) for key, value in metrics.items()},
        }

    # --- predictions -------------------------------------------------------------------------

    def write_predictions(self, name: str, step: int, rows: Iterable[Mapping[str, Any]]) -> Path:
        text = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
        _atomic.write_text(self.predictions_dir / f"{name}.step{step}.jsonl", text)
        latest = self.predictions_dir / f"{name}.jsonl"
        _atomic.write_text(latest, text)
        return latest

    # --- summary and plot --------------------------------------------------------------------

    def write_summary(
        self,
        *,
        status: str,
        steps_completed: int,
        max_steps: int,
        description: str = "",
        error: str | None = None,
    ) -> Path:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        rows = self.read_metrics() if self.metrics_path.exists() else []
        _atomic.write_text(
            self.summary_path,
            render_summary(
                rows,
                status=status,
                steps_completed=steps_completed,
                max_steps=max_steps,
                description=description,
                error=redact(error) if error else error,
                outputs=self._outputs_listing(),
            ),
        )
        return self.summary_path

    def write_plot(self, title: str = "") -> Path | None:
        rows = self.read_metrics() if self.metrics_path.exists() else []
        if not rows:
            return None
        write_metrics_plot(rows, self.plot_path, title=title)
        return self.plot_path

    def _outputs_listing(self) -> list[str]:
        listing = []
        descriptions = {
            METRICS_NAME: "per-step metrics rows {step, split, metrics}",
            PREDICTIONS_DIR: "latest predictions per benchmark (+ per-step copies)",
            PLOT_NAME: "loss and benchmark metrics over steps",
            RESOLVED_CONFIG_NAME: "the configuration with defaults and absolute paths",
            CHECKPOINT_INDEX_NAME: "checkpoint index (state_path for --resume, sampler_path)",
            CHECKPOINTS_DIR: "checkpoint files of the local backend",
        }
        for name, text in descriptions.items():
            if (self.output_dir / name).exists() or name == PLOT_NAME:
                listing.append(f"`{name}`: {text}")
        return listing


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def render_summary(
    rows: Sequence[Mapping[str, Any]],
    *,
    status: str,
    steps_completed: int,
    max_steps: int,
    description: str = "",
    error: str | None = None,
    outputs: Sequence[str] = (),
) -> str:
    lines = ["# sdft run summary", ""]
    lines.append(f"- Status: **{status}**")
    lines.append(f"- Steps: {steps_completed} / {max_steps}")
    if description:
        lines.append(f"- Run: {description}")
    lines.append(f"- Updated: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    if error:
        lines.append(f"- Error: {error}")
    lines.append("")

    train = final_metrics(rows, "train")
    lines.append("## Final train metrics")
    lines.append("")
    if train is None:
        lines.append("No training step has completed yet.")
    else:
        step, metrics = train
        lines.append(f"Step {step}.")
        lines.append("")
        lines.append("| metric | value |")
        lines.append("|---|---|")
        for key in sorted(metrics):
            lines.append(f"| `{key}` | {_format_value(metrics[key])} |")
    lines.append("")

    checks = [row for row in rows if row["split"] == TEACHER_CHECK_SPLIT]
    if checks:
        from sdft.teacher_check import check_from_metrics

        check = check_from_metrics(dict(checks[-1]["metrics"]))
        if check is not None:
            lines.extend(check.markdown().splitlines())
            lines.append("")

    lines.append("## Benchmarks")
    lines.append("")
    series = benchmark_series(rows)
    if not series:
        lines.append("No benchmark has been scored yet.")
    for key in sorted(series):
        points = series[key]
        last_step, last_value = points[-1]
        line = f"- `{key}`: {last_value:.4f} (step {last_step})"
        if len(points) > 1:
            first_step, first_value = points[0]
            line += (
                f"; step {first_step}: {first_value:.4f}, change {last_value - first_value:+.4f}"
            )
        lines.append(line)
    lines.append("")

    if outputs:
        lines.append("## Outputs")
        lines.append("")
        lines.extend(f"- {entry}" for entry in outputs)
        lines.append("")
    return "\n".join(lines)


def comparison_markdown(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """A markdown table comparing runs (``{label: metrics rows}``): final train loss and, for
    every benchmark metric, the first and the last value."""
    keys = sorted({key for rows in runs.values() for key in benchmark_series(rows)})
    header = ["run", "steps", "final train/mean_loss"]
    for key in keys:
        header += [f"{key} (start)", f"{key} (end)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rows in runs.items():
        train = final_metrics(rows, "train")
        loss = train[1].get("train/mean_loss") if train else None
        steps = train[0] if train else 0
        cells = [label, str(steps), _format_value(loss) if loss is not None else "-"]
        series = benchmark_series(rows)
        for key in keys:
            points = series.get(key)
            if points:
                cells += [
                    f"{points[0][1]:.3f} (step {points[0][0]})",
                    f"{points[-1][1]:.3f} (step {points[-1][0]})",
                ]
            else:
                cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "RUN_OUTPUTS",
    "STATUSES",
    "RunLog",
    "benchmark_metric_key",
    "benchmark_series",
    "comparison_markdown",
    "existing_outputs",
    "final_metrics",
    "render_summary",
]
