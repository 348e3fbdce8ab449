"""``results.md`` (the cookbook's tables plus a reading of them), ``tradeoff.png``, ``stages.png``.

All numbers come from ``results.jsonl`` rows. A cell is the mean ± sample standard deviation
(n − 1) over seeds of one benchmark's main metric (its first listed metric); its change is measured
from the base model's score. Retention of an earlier stage j after stage k is, per seed,
score after stage k / score after stage j on stage j's own benchmarks, then mean ± std over the
seeds where the stage-j score is not 0.

A difference between two methods at the same learning rate is called out only when it exceeds the
seed spread: |mean₁ − mean₂| > std₁ + std₂, with at least two seeds on each side.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sdft import _atomic
from sdft.continual.spec import Experiment
from sdft.plots import save_figure


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of per-seed values (std 0 for one value)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n >= 2 else 0.0

    def shown(self, digits: int = 3) -> str:
        if self.n >= 2:
            return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"
        return f"{self.mean:.{digits}f}"


def stat(values: Iterable[float]) -> Stat | None:
    collected = tuple(float(v) for v in values)
    return Stat(collected) if collected else None


def exceeds_spread(a: Stat, b: Stat) -> bool:
    """The reading's criterion: two or more seeds each and |Δ mean| > std_a + std_b."""
    return a.n >= 2 and b.n >= 2 and abs(a.mean - b.mean) > a.std + b.std


@dataclass
class ResultTable:
    """``results.jsonl`` rows indexed for the tables: ``base[benchmark]`` and
    ``values[(method, lr, stage, benchmark)][seed]`` of each benchmark's main metric."""

    base: dict[str, float]
    values: dict[tuple[str, float, int, str], dict[int, float]]
    methods: list[str]
    learning_rates: list[float]
    benchmarks: list[str]
    stages: list[str]

    def cell(self, method: str, lr: float, stage: int, benchmark: str) -> Stat | None:
        per_seed = self.values.get((method, lr, stage, benchmark), {})
        return stat(per_seed[seed] for seed in sorted(per_seed))

    def delta(self, method: str, lr: float, stage: int, benchmark: str) -> Stat | None:
        """Per-seed change from the base model."""
        per_seed = self.values.get((method, lr, stage, benchmark), {})
        if benchmark not in self.base:
            return None
        return stat(per_seed[s] - self.base[benchmark] for s in sorted(per_seed))

    def change(self, method: str, lr: float, stage: int, benchmark: str) -> Stat | None:
        """Per-seed change during stage ``stage`` (from the stage's start: the previous stage's
        score of the same seed, or the base model for stage 1)."""
        after = self.values.get((method, lr, stage, benchmark), {})
        if stage == 1:
            if benchmark not in self.base:
                return None
            return stat(after[s] - self.base[benchmark] for s in sorted(after))
        before = self.values.get((method, lr, stage - 1, benchmark), {})
        return stat(after[s] - before[s] for s in sorted(after) if s in before)

    def retention(
        self, method: str, lr: float, stage: int, earlier: int, benchmark: str
    ) -> Stat | None:
        after = self.values.get((method, lr, stage, benchmark), {})
        before = self.values.get((method, lr, earlier, benchmark), {})
        return stat(after[s] / before[s] for s in sorted(after) if s in before and before[s] != 0)


def build_table(
    rows: Sequence[Mapping[str, Any]], main_metrics: Mapping[str, str], stages: Sequence[str]
) -> ResultTable:
    """Index ``results.jsonl`` rows; ``main_metrics`` maps each benchmark to the metric shown."""
    base: dict[str, float] = {}
    values: dict[tuple[str, float, int, str], dict[int, float]] = {}
    methods: list[str] = []
    lrs: list[float] = []
    for row in rows:
        benchmark = row["benchmark"]
        if main_metrics.get(benchmark) != row["metric"]:
            continue
        if row["stage"] == 0:
            base[benchmark] = float(row["value"])
            continue
        method, lr = row["method"], float(row["learning_rate"])
        if method not in methods:
            methods.append(method)
        if lr not in lrs:
            lrs.append(lr)
        key = (method, lr, int(row["stage"]), benchmark)
        values.setdefault(key, {})[int(row["seed"])] = float(row["value"])
    return ResultTable(base, values, methods, lrs, list(main_metrics), list(stages))


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def scored_stage_runs(rows: Sequence[Mapping[str, Any]]) -> set[tuple[Any, ...]]:
    """The (method, lr, seed, stage) of every stage run with a score (the base model excluded)."""
    return {
        (row["method"], row["learning_rate"], row["seed"], row["stage"])
        for row in rows
        if row["stage"] != 0
    }


def _progress_lines(experiment: Experiment, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A status paragraph while the experiment is incomplete (nothing once every run is scored)."""
    spec = experiment.spec
    expected = len(experiment.runs)
    scored = scored_stage_runs(rows)
    if len(scored) >= expected:
        return []
    return [
        f"**Incomplete:** {len(scored)} of {expected} stage runs are scored so far. A cell marked "
        f"[n=k] holds k of the {len(spec.seeds)} seeds; a cell without seeds shows –.",
        "",
    ]


def render_markdown(experiment: Experiment, rows: Sequence[Mapping[str, Any]]) -> str:
    spec = experiment.spec
    main = {b.name: b.main_metric for b in experiment.benchmarks}
    stages = [stage.name for stage in spec.stages]
    table = build_table(rows, main, stages)
    seeds = ", ".join(str(s) for s in spec.seeds)
    lines = [
        f"# Continual learning: {experiment.path.name}",
        "",
        f"Model `{experiment.base_config.model.name}` (backend {experiment.base_config.backend.kind}); "
        f"methods {', '.join(m.name for m in spec.methods)}; learning rates "
        f"{', '.join(f'{lr:g}' for lr in spec.learning_rates)}; seeds {seeds}. "
        f"Stages: {' → '.join(f'{i}. {s.name} ({s.max_steps} steps)' for i, s in enumerate(spec.stages, 1))}.",
        "",
        *_progress_lines(experiment, rows),
        "Cells: mean ± std over seeds (sample std) of each benchmark's metric, then the change from "
        "the base model in brackets (not for drift, which is already measured from the base "
        "model; its sampled estimate can be slightly negative). Benchmarks: "
        + ", ".join(
            f"`{b.name}` ({b.main_metric}"
            + (
                f", stage {experiment.stage_of(b.name)}'s task"
                if experiment.stage_of(b.name)
                else ""
            )
            + (", drift from the base model: lower is closer" if b.kind == "drift" else "")
            + ")"
            for b in experiment.benchmarks
        )
        + ".",
        "",
    ]
    drift_names = {b.name for b in experiment.benchmarks if b.kind == "drift"}
    for index, stage in enumerate(spec.stages, start=1):
        lines += [f"## Stage {index}: {stage.name}", ""]
        header = (
            "| method | lr | " + " | ".join(f"{b} ({main[b]})" for b in table.benchmarks) + " |"
        )
        lines += [header, "|" + "---|" * (2 + len(table.benchmarks))]
        base_cells = [f"{table.base[b]:.3f}" if b in table.base else "–" for b in table.benchmarks]
        lines.append("| base model | – | " + " | ".join(base_cells) + " |")
        for method in table.methods:
            for lr in table.learning_rates:
                cells = []
                for benchmark in table.benchmarks:
                    cell = table.cell(method, lr, index, benchmark)
                    delta = table.delta(method, lr, index, benchmark)
                    if cell is None:
                        cells.append("–")
                        continue
                    text = cell.shown()
                    if delta is not None and benchmark not in drift_names:
                        text += f" ({_signed(delta.mean)})"
                    if cell.n < len(spec.seeds):
                        text += f" [n={cell.n}]"
                    cells.append(text)
                lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
        for earlier in range(1, index):
            own = [b.name for b in spec.stages[earlier - 1].benchmarks if b.kind == "tasks"]
            if not own:
                continue
            lines += [
                f"Retention of stage {earlier} ({spec.stages[earlier - 1].name}) after stage "
                f"{index}: score after stage {index} / score after stage {earlier}.",
                "",
                "| method | lr | " + " | ".join(own) + " |",
                "|" + "---|" * (2 + len(own)),
            ]
            for method in table.methods:
                for lr in table.learning_rates:
                    cells = []
                    for benchmark in own:
                        kept = table.retention(method, lr, index, earlier, benchmark)
                        cells.append(
                            "–"
                            if kept is None
                            else (
                                f"{100 * kept.mean:.0f}% ± {100 * kept.std:.0f}%"
                                if kept.n >= 2
                                else f"{100 * kept.mean:.0f}%"
                            )
                        )
                    lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Reading", "", reading(table, [s.name for s in spec.stages]), ""]
    return "\n".join(lines)


def reading(table: ResultTable, stages: Sequence[str]) -> str:
    """One paragraph that states only the method differences that exceed the seed spread."""
    counts = [
        len(table.values.get((m, lr, s, b), {}))
        for m in table.methods
        for lr in table.learning_rates
        for s in range(1, len(stages) + 1)
        for b in table.benchmarks
    ]
    if not counts or max(counts) == 0:
        return "No stage has been scored yet."
    if max(counts) < 2:
        return (
            "With one seed per cell the seed spread is unknown, so no difference between methods "
            "is claimed; run more seeds to compare them."
        )
    claims = []
    compared = unjudged = 0
    for index, stage in enumerate(stages, start=1):
        for benchmark in table.benchmarks:
            for lr in table.learning_rates:
                for i, first in enumerate(table.methods):
                    for second in table.methods[i + 1 :]:
                        a = table.cell(first, lr, index, benchmark)
                        b = table.cell(second, lr, index, benchmark)
                        if a is None or b is None:
                            continue
                        if a.n < 2 or b.n < 2:
                            unjudged += 1
                            continue
                        compared += 1
                        if exceeds_spread(a, b):
                            high, low, hi_s, lo_s = (
                                (first, second, a, b) if a.mean > b.mean else (second, first, b, a)
                            )
                            claims.append(
                                f"after stage {index} ({stage}) at lr {lr:g}, {benchmark} is "
                                f"{hi_s.mean - lo_s.mean:.3f} higher with {high} than with {low} "
                                f"({hi_s.shown()} vs {lo_s.shown()})"
                            )
    untested = ""
    if unjudged == 1:
        untested = " 1 more comparison has a single seed on one side and is not judged."
    elif unjudged:
        untested = (
            f" {unjudged} more comparisons have a single seed on one side and are not judged."
        )
    if not compared:
        return (
            "No method-vs-method comparison (same stage, benchmark and learning rate) has two or "
            "more seeds on each side yet, so no difference between methods is claimed." + untested
        )
    if not claims:
        return (
            f"None of the {compared} method-vs-method comparisons with two or more seeds on each "
            "side (same stage, benchmark and learning rate) differs by more than the seed spread "
            "(|Δ mean| > std₁ + std₂): at this number of seeds and tasks the results do not "
            "separate the methods." + untested
        )
    return (
        f"Of {compared} method-vs-method comparisons with two or more seeds on each side (same "
        f"stage, benchmark and learning rate), {len(claims)} "
        f"{'differs' if len(claims) == 1 else 'differ'} by more than the seed spread "
        "(|Δ mean| > std₁ + std₂): "
        + "; ".join(claims)
        + ". Every other difference is within the seed spread and is not a finding."
        + untested
    )


# --- plots ------------------------------------------------------------------------------------


def _points(
    table: ResultTable, experiment: Experiment, stage: int
) -> list[tuple[str, float, Stat, Stat | None, Stat | None]]:
    """Per method × lr: (method, lr, new-task gain, change on the other tasks, drift)."""
    spec = experiment.spec
    own = [b.name for b in spec.stages[stage - 1].benchmarks if b.kind == "tasks"]
    others = [b.name for b in experiment.benchmarks if b.kind == "tasks" and b.name not in own]
    drifts = [b.name for b in experiment.benchmarks if b.kind == "drift"]
    out = []
    for method in table.methods:
        for lr in table.learning_rates:
            gain = _mean_over(table, method, lr, stage, own, table.change)
            if gain is None:
                continue
            other = _mean_over(table, method, lr, stage, others, table.change)
            drift = _mean_over(table, method, lr, stage, drifts, table.cell)
            out.append((method, lr, gain, other, drift))
    return out


def _mean_over(
    table: ResultTable, method: str, lr: float, stage: int, names: Sequence[str], get: Any
) -> Stat | None:
    """Per seed, the mean over ``names`` of ``get(...)``'s per-seed values."""
    if not names:
        return None
    per_name = [get(method, lr, stage, name) for name in names]
    if any(value is None for value in per_name):
        return None
    n = min(value.n for value in per_name)
    if n == 0:
        return None
    return Stat(tuple(statistics.fmean(v.values[i] for v in per_name) for i in range(n)))


def write_tradeoff_plot(
    experiment: Experiment, rows: Sequence[Mapping[str, Any]], path: Path
) -> Path | None:
    main = {b.name: b.main_metric for b in experiment.benchmarks}
    table = build_table(rows, main, [s.name for s in experiment.spec.stages])
    stages = [
        index
        for index in range(1, len(experiment.spec.stages) + 1)
        if _points(table, experiment, index)
    ]
    if not stages:
        return None
    has_drift = any(b.kind == "drift" for b in experiment.benchmarks)
    columns = 2 if has_drift else 1
    figure = Figure(figsize=(5.5 * columns, 4.2 * len(stages)))
    axes = figure.subplots(len(stages), columns, squeeze=False)
    markers = "osD^v<>px*"
    for row_index, stage in enumerate(stages):
        points = _points(table, experiment, stage)
        name = experiment.spec.stages[stage - 1].name
        for method_index, method in enumerate(table.methods):
            color = f"C{method_index}"
            for lr_index, lr in enumerate(table.learning_rates):
                for method_, lr_, gain, other, drift in points:
                    if (method_, lr_) != (method, lr):
                        continue
                    for column, y in enumerate((other, drift)[:columns]):
                        if y is None:
                            continue
                        axis = axes[row_index][column]
                        axis.errorbar(
                            gain.mean,
                            y.mean,
                            xerr=gain.std,
                            yerr=y.std,
                            fmt=markers[lr_index % len(markers)],
                            color=color,
                            capsize=3,
                            label=f"{method} lr {lr:g}",
                        )
        axes[row_index][0].set_ylabel("change on the other tasks (from stage start)")
        axes[row_index][0].axhline(0.0, color="grey", linewidth=0.6)
        axes[row_index][0].set_title(f"stage {stage} ({name})")
        if columns == 2:
            axes[row_index][1].set_ylabel("drift from the base model (KL per token)")
            axes[row_index][1].set_title(f"stage {stage} ({name}): drift")
        for axis in axes[row_index]:
            axis.set_xlabel(f"gain on stage {stage}'s task (from stage start)")
            axis.axvline(0.0, color="grey", linewidth=0.6)
            axis.grid(alpha=0.3)
        axes[row_index][0].legend(fontsize=7)
    figure.suptitle("New-task gain vs change on old tasks and drift (mean ± std over seeds)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path)
    return path


def write_stage_plot(
    experiment: Experiment, rows: Sequence[Mapping[str, Any]], path: Path
) -> Path | None:
    """Every benchmark after every stage (stage 0 = the base model), one line per method × lr."""
    main = {b.name: b.main_metric for b in experiment.benchmarks}
    table = build_table(rows, main, [s.name for s in experiment.spec.stages])
    if not table.benchmarks or not table.methods:
        return None
    count = len(table.benchmarks)
    columns = min(3, count)
    lines = math.ceil(count / columns)
    figure = Figure(figsize=(5 * columns, 3.8 * lines))
    axes = figure.subplots(lines, columns, squeeze=False)
    stage_count = len(experiment.spec.stages)
    for index, benchmark in enumerate(table.benchmarks):
        axis = axes[index // columns][index % columns]
        for method_index, method in enumerate(table.methods):
            for lr_index, lr in enumerate(table.learning_rates):
                xs, ys, errs = [], [], []
                if benchmark in table.base:
                    xs.append(0)
                    ys.append(table.base[benchmark])
                    errs.append(0.0)
                for stage in range(1, stage_count + 1):
                    cell = table.cell(method, lr, stage, benchmark)
                    if cell is not None:
                        xs.append(stage)
                        ys.append(cell.mean)
                        errs.append(cell.std)
                if len(xs) > (1 if benchmark in table.base else 0):
                    axis.errorbar(
                        xs,
                        ys,
                        yerr=errs,
                        color=f"C{method_index}",
                        linestyle=["-", "--", ":", "-."][lr_index % 4],
                        marker="o",
                        capsize=3,
                        label=f"{method} lr {lr:g}",
                    )
        axis.set_xticks(range(0, stage_count + 1))
        axis.set_xticklabels(["base"] + [s.name for s in experiment.spec.stages], fontsize=8)
        axis.set_title(f"{benchmark} ({main[benchmark]})")
        axis.grid(alpha=0.3)
    for index in range(count, lines * columns):
        axes[index // columns][index % columns].axis("off")
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Every benchmark after every stage (mean ± std over seeds)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path)
    return path


def write_reports(experiment: Experiment) -> list[Path]:
    """``results.md``, ``tradeoff.png`` and ``stages.png`` from ``results.jsonl``."""
    rows = _atomic.read_jsonl(experiment.output_dir / "results.jsonl")
    written = []
    target = experiment.output_dir / "results.md"
    _atomic.write_text(target, render_markdown(experiment, rows))
    written.append(target)
    for writer, name in ((write_tradeoff_plot, "tradeoff.png"), (write_stage_plot, "stages.png")):
        path = writer(experiment, rows, experiment.output_dir / name)
        if path is not None:
            written.append(path)
    return written


__all__ = [
    "ResultTable",
    "Stat",
    "build_table",
    "exceeds_spread",
    "reading",
    "render_markdown",
    "scored_stage_runs",
    "write_reports",
    "write_stage_plot",
    "write_tradeoff_plot",
]
