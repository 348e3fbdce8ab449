"""Scoring one model (the base model or a stage's final checkpoint) on an experiment's benchmarks.

``kind: tasks`` benchmarks give ``pass@k`` (greedy for ``pass@1`` with one sample), ``kind: drift``
benchmarks give the KL from the base model (:mod:`sdft.drift`). Every benchmark is scored with the
same evaluation settings for every model (the base config's ``system_prompt``, ``max_tokens``,
``enable_thinking``), so the numbers compare across methods.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sdft.config import Config
from sdft.continual.spec import BenchmarkSpec
from sdft.drift import load_drift_prompts, measure_drift
from sdft.evals import Benchmark, benchmark_from_rows, load_benchmark, run_benchmark


@dataclass(frozen=True)
class LoadedTasks:
    """A tasks benchmark, split into groups that share a system prompt (rows of the paper's
    science set carry their own)."""

    name: str
    groups: list[tuple[str | None, Benchmark]]

    def __len__(self) -> int:
        return sum(len(b) for _, b in self.groups)


def load_tasks(spec: BenchmarkSpec) -> LoadedTasks:
    """The tasks of a ``kind: tasks`` benchmark (``tasks.jsonl`` or a data source + verifier)."""
    if spec.kind != "tasks":
        raise ValueError(f"benchmark {spec.name} is kind: {spec.kind}, not tasks")
    if spec.source_kind == "tasks":
        benchmark = load_benchmark(spec.path, name=spec.name)
        if spec.limit is not None:
            benchmark = Benchmark(benchmark.name, benchmark.tasks[: spec.limit], benchmark.path)
        return LoadedTasks(spec.name, [(spec.system_prompt, benchmark)])
    from sdft.datasets import load_examples

    examples = load_examples(
        spec.path, source_kind=spec.source_kind, fields=spec.fields, split=spec.split
    )
    if spec.limit is not None:
        examples = examples[: spec.limit]
    by_system: dict[str | None, list[dict[str, Any]]] = {}
    for example in examples:
        system = example.system_prompt if example.system_prompt is not None else spec.system_prompt
        by_system.setdefault(system, []).append(
            {
                "task_id": example.id,
                "instruction": example.question,
                "verifier": {
                    "kind": "in_process",
                    "fn_name": spec.verifier,
                    "expected": example.golden_answer,
                },
            }
        )
    groups = [
        (system, benchmark_from_rows(spec.name, rows, path=spec.path))
        for system, rows in by_system.items()
    ]
    if not groups:
        raise ValueError(f"{spec.path}: benchmark {spec.name} has no rows")
    return LoadedTasks(spec.name, groups)


@dataclass
class Scores:
    """``metrics[benchmark][metric]`` and the per-task / per-sequence rows behind them."""

    metrics: dict[str, dict[str, float]]
    predictions: dict[str, list[dict[str, Any]]]


async def score_model(
    sampler: Any,
    base_sampler: Any,
    tokenizer: Any,
    benchmarks: Sequence[BenchmarkSpec],
    eval_config: Config,
    *,
    seed: int = 0,
    loaded: dict[str, LoadedTasks] | None = None,
) -> Scores:
    """Score ``sampler`` on every benchmark (drift against ``base_sampler``)."""
    params = eval_config.params
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    for spec in benchmarks:
        max_tokens = spec.max_tokens or params.max_tokens
        if spec.kind == "drift":
            prompts = load_drift_prompts(spec.path, limit=spec.limit)
            drift = await measure_drift(
                sampler,
                base_sampler,
                tokenizer,
                prompts,
                max_tokens=max_tokens,
                num_samples=spec.num_samples,
                seed=seed,
                system_prompt=spec.system_prompt or params.system_prompt,
                enable_thinking=params.enable_thinking,
                full_vocab=True if "kl_full" in spec.metric_names else None,
            )
            metrics[spec.name] = drift.metrics(spec.metric_names)
            predictions[spec.name] = drift.per_sequence
            continue
        tasks = (loaded or {}).get(spec.name) or load_tasks(spec)
        totals = dict.fromkeys(spec.metric_names, 0.0)
        rows: list[dict[str, Any]] = []
        for system, benchmark in tasks.groups:
            result = await asyncio.to_thread(
                run_benchmark,
                sampler,
                tokenizer,
                benchmark,
                system_prompt=system if system is not None else params.system_prompt,
                max_tokens=max_tokens,
                num_samples=spec.num_samples,
                temperature=0.0 if spec.num_samples == 1 else spec.temperature,
                seed=seed,
                metrics=spec.metric_names,
                enable_thinking=params.enable_thinking,
            )
            for metric, value in result.metrics.items():
                totals[metric] += value * len(benchmark)
            rows.extend(result.predictions)
        if len(tasks.groups) == 1:
            metrics[spec.name] = dict(result.metrics)
        else:
            count = len(tasks)
            metrics[spec.name] = {metric: total / count for metric, total in totals.items()}
        predictions[spec.name] = rows
    return Scores(metrics, predictions)


__all__ = ["LoadedTasks", "Scores", "load_tasks", "score_model"]
