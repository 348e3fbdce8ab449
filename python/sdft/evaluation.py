"""Evaluation: benchmarks scored in the training loop, and ``sdft eval`` of the base model or a
checkpoint of a run.

Benchmarks see the prompt the student trains on: the instruction goes through the student's
``user_template`` (or the benchmark's own), ``system_prompt``, chat template and
``enable_thinking``. Verifiers score the final answer: the text after the last ``answer_after``
marker (``</think>`` by default) when the response has one; predictions keep the whole response.
A ``kind: drift`` benchmark measures the mean per-token KL from the base model on the model's own
samples of its prompts (:mod:`sdft.drift`); its predictions are the per-sequence values.

``sdft eval`` writes into ``output_dir/eval/<label>`` or ``--output``. It replaces only what an
evaluation wrote there (marked by ``evaluation.json``) and refuses a directory that holds a
training run or files of unknown origin.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdft import _atomic
from sdft import checkpoints as ckpt
from sdft.clients import build_service_client, resolve, sampling_seed
from sdft.config import BenchmarkSection, Config
from sdft.drift import DriftPrompt, load_drift_prompts, measure_drift
from sdft.evals import Benchmark, BenchmarkTask, load_benchmark, run_benchmark
from sdft.metricrows import benchmark_metric_key
from sdft.progress import Progress, announce
from sdft.rundir import check_run_path
from sdft.runfiles import (
    CHECKPOINT_INDEX_NAME,
    CHECKPOINTS_DIR,
    EVAL_DIR,
    EVALUATION_NAME,
    METRICS_NAME,
    PLOT_NAME,
    PREDICTIONS_DIR,
    RESOLVED_CONFIG_NAME,
    SUMMARY_NAME,
    confined,
)
from sdft.runlog import RunLog


class EvaluationOutputError(ValueError):
    """The evaluation's output directory holds files that no evaluation wrote."""


@dataclass
class EvalResult:
    label: str
    step: int
    output_dir: Path
    metrics: dict[str, float]


#: What a benchmark entry loads to: the tasks of a ``kind: tasks`` benchmark, the prompts of a
#: ``kind: drift`` one.
LoadedBenchmark = Benchmark | tuple[DriftPrompt, ...]


def load_benchmarks(config: Config) -> dict[str, LoadedBenchmark]:
    loaded: dict[str, LoadedBenchmark] = {}
    for entry in config.metadata.benchmark:
        if entry.kind == "drift":
            loaded[entry.name] = tuple(load_drift_prompts(entry.path, limit=entry.limit))
        else:
            loaded[entry.name] = load_benchmark(entry.path, name=entry.name)
    return loaded


def needs_base_sampler(config: Config) -> bool:
    """Whether any benchmark measures the drift from the base model."""
    return any(entry.kind == "drift" for entry in config.metadata.benchmark)


def final_answer(response: str, marker: str | None) -> str:
    """The text after the last ``marker`` when ``response`` contains it, else ``response``."""
    if marker is None or marker not in response:
        return response
    return response.rsplit(marker, 1)[1]


@dataclass(frozen=True, slots=True)
class FinalAnswerTask(BenchmarkTask):
    """A task whose verifier sees only the final answer of the response (see :func:`final_answer`)."""

    answer_after: str | None = None

    def verify(self, response: str) -> bool:
        return BenchmarkTask.verify(self, final_answer(response, self.answer_after))

    def score(self, response: str) -> tuple[bool, str | None]:
        return BenchmarkTask.score(self, final_answer(response, self.answer_after))


def scored_on_final_answers(benchmark: Benchmark, entry: BenchmarkSection) -> Benchmark:
    """``benchmark`` with every task verifying the text after ``entry.answer_after``."""
    if entry.answer_after is None:
        return benchmark
    tasks = tuple(
        FinalAnswerTask(
            **{f.name: getattr(task, f.name) for f in dataclasses.fields(task)},
            answer_after=entry.answer_after,
        )
        for task in benchmark.tasks
    )
    return dataclasses.replace(benchmark, tasks=tasks)


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
    benchmarks: dict[str, LoadedBenchmark],
    names: Sequence[str],
    sampling_client: Any,
    tokenizer: Any,
    *,
    step: int,
    runlog: RunLog,
    progress: bool,
    log_rows: bool = True,
    base_sampler: Any = None,
) -> list[tuple[str, dict[str, float]]]:
    """Score the benchmarks ``names`` with ``sampling_client`` (drift benchmarks against
    ``base_sampler``, the base model); write predictions and (when ``log_rows``) one metrics row
    per benchmark at ``step``. Returns the rows as ``[(split, {metric key: value}), ...]``, one
    per benchmark."""
    entries = {entry.name: entry for entry in config.metadata.benchmark}
    params = config.params
    rows: list[tuple[str, dict[str, float]]] = []
    for name in names:
        entry = entries[name]
        loaded = benchmarks[name]
        if isinstance(loaded, tuple):
            if base_sampler is None:
                raise ValueError(f"benchmark {name} (kind: drift) needs the base model's sampler")
            drift = await measure_drift(
                sampling_client,
                base_sampler,
                tokenizer,
                loaded,
                max_tokens=entry.max_tokens or params.max_tokens,
                seed=sampling_seed(config.seed, step, 0),
                system_prompt=params.system_prompt,
                enable_thinking=params.enable_thinking,
                full_vocab=True if "kl_full" in entry.metrics else None,
            )
            runlog.write_predictions(name, step, drift.per_sequence)
            rows.append(
                _log_row(entry, step, drift.metrics(entry.metrics), runlog, log_rows, progress)
            )
            continue
        benchmark = scored_on_final_answers(loaded, entry)
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
            user_template=entry.user_template or params.user_template,
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
        rows.append(_log_row(entry, step, result.metrics, runlog, log_rows, progress))
    return rows


def _log_row(
    entry: BenchmarkSection,
    step: int,
    values: dict[str, float],
    runlog: RunLog,
    log_rows: bool,
    progress: bool,
) -> tuple[str, dict[str, float]]:
    metrics = {
        benchmark_metric_key(entry.split, entry.name, metric): float(value)
        for metric, value in values.items()
    }
    if log_rows:
        runlog.log_metrics(step, entry.split, metrics)
    if progress:
        shown = ", ".join(f"{key} = {value:.3f}" for key, value in metrics.items())
        announce(f"step {step}: {shown}")
    return entry.split, metrics


def _check_output(target: Path) -> None:
    """Refuse an output directory that holds a training run or files no evaluation wrote."""
    run_files = [
        name
        for name in (RESOLVED_CONFIG_NAME, CHECKPOINT_INDEX_NAME, CHECKPOINTS_DIR)
        if os.path.lexists(target / name)
    ]
    if run_files:
        raise EvaluationOutputError(
            f"{target} holds a training run ({', '.join(run_files)}); an evaluation would "
            "overwrite its metrics.jsonl and summary.md: choose another --output"
        )
    if (target / EVALUATION_NAME).is_file():
        return
    foreign = [
        name
        for name in (METRICS_NAME, SUMMARY_NAME, PLOT_NAME, PREDICTIONS_DIR)
        if os.path.lexists(target / name)
    ]
    if foreign:
        raise EvaluationOutputError(
            f"{target} holds {', '.join(foreign)} that no evaluation wrote ({EVALUATION_NAME} is "
            "missing); choose an empty directory or one an earlier `sdft eval` wrote"
        )


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
            model_path = check_run_path(
                config, record.sampler_path, f"checkpoint {record.name}: sampler_path"
            )
            label, step = record.name, record.step
        else:
            label, model_path = _label_for(checkpoint), checkpoint
            if "://" not in checkpoint and not Path(checkpoint).exists():
                raise FileNotFoundError(
                    f"checkpoint {checkpoint!r} is neither in {ckpt.index_path(config.output_dir)} "
                    "nor a saved sampler path"
                )
    target = (
        output if output is not None else confined(config.output_dir / EVAL_DIR, label, "label")
    )
    _check_output(target)
    if service_client is None:
        service_client = build_service_client(config)
    if model_path is None:
        sampler = await resolve(service_client.create_sampling_client(base_model=config.model.name))
    else:
        sampler = await resolve(service_client.create_sampling_client(model_path=model_path))
    base_sampler = None
    if needs_base_sampler(config):
        base_sampler = (
            sampler
            if model_path is None
            else await resolve(service_client.create_sampling_client(base_model=config.model.name))
        )
    tokenizer = _tokenizer(config, sampler)
    _atomic.write_json(
        target / EVALUATION_NAME,
        {"label": label, "step": step, "model": config.model.name, "checkpoint": model_path},
    )
    runlog = RunLog(target)
    rows = await evaluate(
        config,
        benchmarks,
        [entry.name for entry in config.metadata.benchmark],
        sampler,
        tokenizer,
        step=step,
        runlog=runlog,
        progress=progress,
        log_rows=False,
        base_sampler=base_sampler,
    )
    runlog.write_metrics({"step": step, "split": split, "metrics": m} for split, m in rows)
    runlog.write_summary(
        status="completed",
        steps_completed=step,
        max_steps=config.params.max_steps,
        description=f"evaluation of {label} ({config.model.name}, backend {config.backend.kind})",
    )
    results = {key: value for _, metrics in rows for key, value in metrics.items()}
    return EvalResult(label=label, step=step, output_dir=target, metrics=results)


def _label_for(path: str) -> str:
    name = path.rstrip("/").split("/")[-1]
    label = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in name)
    return label.lstrip(".-")[:200] or "checkpoint"


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


def _tokenizer(config: Config, sampler: Any) -> Any:
    """The model's tokenizer, resolved offline through ``sdft.models`` when it can be (a Tinker
    ``SamplingClient`` loads it from the Hugging Face hub by base model name), else the sampler's."""
    from sdft.models import ModelNotFoundError, load_tokenizer

    try:
        return load_tokenizer(config.model.name)
    except ModelNotFoundError:
        return sampler.get_tokenizer()
