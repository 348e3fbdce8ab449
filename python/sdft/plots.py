"""PNG plots of a run (loss and benchmark metrics over steps) and of several runs side by side.

Figures are built with matplotlib's object API (``Figure``, rendered by the Agg canvas: no
display, no global pyplot state), rendered into memory and written atomically, so a reader never
sees a half-written PNG.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sdft import _atomic
from sdft.metricrows import LOSS_KEY, benchmark_series, loss_series, training_signal


def _title(figure: Figure, title: str) -> None:
    if title:
        figure.suptitle(textwrap.fill(title, width=110), fontsize="medium", y=1.02)


def save_figure(figure: Figure, path: str | Path) -> None:
    """Render ``figure`` to PNG in memory and write it to ``path`` atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _atomic.write_bytes(path, buffer.getvalue())


def write_metrics_plot(
    rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = ""
) -> None:
    """Loss over steps (left) and every benchmark metric over steps (right)."""
    figure = Figure(figsize=(11, 4))
    loss_axis, bench_axis = figure.subplots(1, 2)
    signal, loss = training_signal(rows)
    if loss:
        loss_axis.plot([p[0] for p in loss], [p[1] for p in loss], marker=".", color="tab:blue")
    else:
        loss_axis.text(0.5, 0.5, "no training step yet", ha="center", va="center")
    loss_axis.set_title(signal)
    loss_axis.set_xlabel("step")
    loss_axis.grid(alpha=0.3)

    series = benchmark_series(rows)
    for key in sorted(series):
        points = series[key]
        bench_axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    if series:
        bench_axis.legend(fontsize="small")
        bench_axis.set_ylim(-0.02, 1.02)
    else:
        bench_axis.text(0.5, 0.5, "no benchmark scored yet", ha="center", va="center")
    bench_axis.set_title("benchmarks")
    bench_axis.set_xlabel("step")
    bench_axis.grid(alpha=0.3)
    _title(figure, title)
    save_figure(figure, path)


def write_comparison_plot(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = ""
) -> None:
    """Several runs side by side: one panel for the loss, one per benchmark metric."""
    keys = sorted({key for rows in runs.values() for key in benchmark_series(rows)})
    panels = 1 + len(keys)
    figure = Figure(figsize=(4.2 * panels, 3.8))
    axes = figure.subplots(1, panels, squeeze=False)
    loss_axis = axes[0][0]
    for label, rows in runs.items():
        loss = loss_series(rows)
        if loss:
            loss_axis.plot([p[0] for p in loss], [p[1] for p in loss], marker=".", label=label)
    loss_axis.set_title(LOSS_KEY)
    loss_axis.set_xlabel("step")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend(fontsize="small")
    for axis, key in zip(axes[0][1:], keys, strict=True):
        for label, rows in runs.items():
            points = benchmark_series(rows).get(key, [])
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    _title(figure, title)
    save_figure(figure, path)
