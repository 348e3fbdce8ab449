"""Evaluation: benchmarks scored in the training loop, and ``sdft eval`` of the base model or a
checkpoint of a run."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdft import checkpoints as ckpt
from sdft.clients import build_service_client, resolve, sampling_seed
from sdft.config import Config
from sdft.evals import Benchmark, load_benchmark, run_benchmark
from sdft.metricrows import benchmark_metric_key
from sdft.progress import Progress, announce
from sdft.runlog import RunLog


@dataclass
class EvalResult:
    label: str
    step: int
    output_dir: Path
    metrics: dict[str, float]


def load_benchmarks(config: Config) -> dict[str, Benchmark]:
    return {
        entry.name: load_benchmark(entry.path, name=entry.name)
        for entry in config.metadata.benchmark
    }


def due_benchmarks(config: Config, step: int) -> list[str]:
    """The benchmarks scored after ``step`` (0: before training): every ``run_every`` steps and
    at ``max_steps``; a benchmark without ``run_every`` only at ``max_steps``."""
    max_steps = config.params.max_steps
    due = []
    for entry in config.metadata.benchmark:
        if entry.run_every is None:
            if step == max_steps:
                due.append(entry.name)
        elif step == 0 or step % entry.run_every == 0 or step == max_steps:
            due.append(entry.name)
    return due


async def evaluate(
    config: Config,
    benchmarks: dict[str, Benchmark],
    names: Sequence[str],
    sampling_client: Any,
    tokenizer: Any,
    *,
    step: int,
    runlog: RunLog,
    progress: bool,
    log_rows: bool = True,
) -> dict[str, float]:
    """Score the benchmarks ``names`` with ``sampling_client``; write predictions and (when
    ``log_rows``) one metrics row per benchmark at ``step``. Returns ``{metric key: value}``."""
    entries = {entry.name: entry for entry in config.metadata.benchmark}
    params = config.params
    results: dict[str, float] = {}
    for name in names:
        entry = entries[name]
        benchmark = benchmarks[name]
        total = len(benchmark) if entry.limit is None else min(entry.limit, len(benchmark))
        # Without a terminal, one line per task would flood the log: the result line suffices.
        bar = Progress(total, f"eval {name} (step {step})", enabled=progress, lines=False)
        num_samples = entry.num_samples

        def report(done: int, _total: int, bar: Progress = bar) -> None:
            bar.update(done - bar.count)

        result = await asyncio.to_thread(
            run_benchmark,
            sampling_client,
            tokenizer,
            benchmark,
            system_prompt=params.system_prompt,
            max_tokens=entry.max_tokens or params.max_tokens,
            num_samples=num_samples,
            temperature=0.0 if num_samples == 1 else entry.temperature,
            seed=sampling_seed(config.seed, step, 0),
            metrics=entry.metrics,
            enable_thinking=params.enable_thinking,
            limit=entry.limit,
            progress=report,
        )
        bar.close()
        runlog.write_predictions(name, step, result.predictions)
        metrics = {
            benchmark_metric_key(entry.split, name, metric): float(value)
            for metric, value in result.metrics.items()
        }
        if log_rows:
            runlog.log_metrics(step, entry.split, metrics)
        if progress:
            shown = ", ".join(f"{key} = {value:.3f}" for key, value in metrics.items())
            announce(f"step {step}: {shown}")
        results.update(metrics)
    return results


async def evaluate_async(
    config: Config,
    *,
    checkpoint: str | None = None,
    output: Path | None = None,
    service_client: Any = None,
    progress: bool = True,
) -> EvalResult:
    """Score every benchmark on the base model or a checkpoint of the run; write predictions and
    ``metrics.jsonl`` (+ ``summary.md``) into ``output`` (default ``output_dir/eval/<label>``,
    label ``base`` or the checkpoint name)."""
    if not config.metadata.benchmark:
        raise ValueError("the config lists no benchmark (metadata.benchmark)")
    benchmarks = load_benchmarks(config)
    label, model_path, step = "base", None, 0
    if checkpoint is not None:
        record = ckpt.find_checkpoint(config.output_dir, checkpoint)
        if record is not None:
            if record.sampler_path is None:
                raise ValueError(f"checkpoint {record.name} has no sampler_path")
            label, model_path, step = record.name, record.sampler_path, record.step
        else:
            label, model_path = _label_for(checkpoint), checkpoint
            if "://" not in checkpoint and not Path(checkpoint).exists():
                raise FileNotFoundError(
                    f"checkpoint {checkpoint!r} is neither in {ckpt.index_path(config.output_dir)} "
                    "nor a saved sampler path"
                )
    if service_client is None:
        service_client = build_service_client(config)
    if model_path is None:
        sampler = await resolve(service_client.create_sampling_client(base_model=config.model.name))
    else:
        sampler = await resolve(service_client.create_sampling_client(model_path=model_path))
    tokenizer = sampler.get_tokenizer()
    target = output or config.output_dir / "eval" / label
    runlog = RunLog(target)
    if runlog.metrics_path.exists():
        runlog.metrics_path.unlink()
    results = await evaluate(
        config,
        benchmarks,
        [entry.name for entry in config.metadata.benchmark],
        sampler,
        tokenizer,
        step=step,
        runlog=runlog,
        progress=progress,
    )
    runlog.write_summary(
        status="completed",
        steps_completed=step,
        max_steps=config.params.max_steps,
        description=f"evaluation of {label} ({config.model.name}, backend {config.backend.kind})",
    )
    return EvalResult(label=label, step=step, output_dir=target, metrics=results)


def _label_for(path: str) -> str:
    name = path.rstrip("/").split("/")[-1] or "checkpoint"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def evaluate_checkpoint(
    config: Config,
    *,
    checkpoint: str | None = None,
    output: Path | None = None,
    service_client: Any = None,
    progress: bool = True,
) -> EvalResult:
    """Synchronous :func:`evaluate_async`."""
    return asyncio.run(
        evaluate_async(
            config,
            checkpoint=checkpoint,
            output=output,
            service_client=service_client,
            progress=progress,
        )
    )
