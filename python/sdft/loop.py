"""The SDFT and SFT training loops, backend-neutral (Tinker or the local backend).

One SDFT step (the paper's algorithm, the cookbook's recipe):

1. the student samples ``group_size`` completions per question, on-policy, from the student
   prompt (``user_template`` through the chat template) — or from the teacher prompt when
   ``generate_from_teacher`` is set; all requests of the batch are in flight at once;
2. the teacher prompt shows the golden answer as an in-context demonstration
   (:func:`sdft.data.build_teacher_prompt`);
3. the teacher scores ``teacher_prompt + completion`` (truncated to ``max_context_length``) with
   ``topk_prompt_logprobs = topk``, all requests at once;
4. :func:`sdft.data.build_topk_targets` turns the dense responses into ``(N, K)`` datums and the
   student trains: ``cross_entropy`` (forward KL over the teacher's top-K), ``reverse_kl`` (custom
   loss), ``topk: 0`` (importance-sampling fallback) or ``full_kl`` (local backend: exact
   full-vocabulary KL); ``forward_backward`` and ``optim_step`` are pipelined per substep;
5. the student's sampler is refreshed from the new weights; the teacher is the frozen base model
   (``static``), re-synced from the student every ``sync_every`` steps (``sync``) or an EMA of the
   student (``ema``, local backend).

The SFT baseline (``algorithm.kind: sft``) trains ``cross_entropy`` on the golden answers with the
same config, data, evaluation and logging.

Step ``s`` (1-based) writes its train row, then the benchmark rows due at ``s``, then — when a
checkpoint is due — the checkpoint row with ``batch = s``. A resumed run drops every metrics row
after its last checkpoint and redoes those steps, so no step is lost or repeated.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tinker import types

from sdft import checkpoints as ckpt
from sdft import data as sdft_data
from sdft.config import RESOLVED_CONFIG_NAME, Config, training_differences, write_resolved_config
from sdft.data import CompletionSlice
from sdft.datasets import SDFTBatch, SimpleSDFTDataset, load_examples
from sdft.evals import Benchmark, load_benchmark, run_benchmark
from sdft.runlog import (
    RunLog,
    benchmark_metric_key,
    benchmark_series,
    existing_outputs,
    remove_outputs,
)


class RunDirectoryError(ValueError):
    """``output_dir`` already holds a run and neither ``--resume`` nor ``--overwrite`` was given,
    or a resumed run's config differs from the one it started with."""


@dataclass
class RunResult:
    status: str
    steps_completed: int
    max_steps: int
    output_dir: Path
    train_metrics: dict[str, Any] = field(default_factory=dict)
    benchmark_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    label: str
    step: int
    output_dir: Path
    metrics: dict[str, float]


# --- small helpers ----------------------------------------------------------------------------


async def resolve(value: Any) -> Any:
    """The value behind a Tinker-style future (``result_async``), an awaitable, or a plain value."""
    if hasattr(value, "result_async"):
        return await value.result_async()
    if inspect.isawaitable(value):
        return await value
    return value


def learning_rate_at(config: Config, step: int) -> float:
    """Learning rate of 1-based ``step`` under ``lr_schedule`` (decaying towards 0 at the end)."""
    params = config.params
    progress = (step - 1) / params.max_steps
    if params.lr_schedule == "linear":
        return params.learning_rate * (1.0 - progress)
    if params.lr_schedule == "cosine":
        return params.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return params.learning_rate


def sampling_seed(seed: int, step: int, index: int) -> int:
    """A distinct, reproducible sampling seed per (run seed, step, request)."""
    return (seed * 1_000_003 + step * 10_007 + index) % (2**31 - 1)


def split_evenly(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` cut into ``min(parts, len(items))`` contiguous chunks of near-equal size."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(list(items[start:end]))
        start = end
    return chunks


def weighted_positions(datums: Sequence[types.Datum]) -> int:
    """Positions that carry a training signal: rows of ``weights`` with any non-zero entry."""
    total = 0
    for datum in datums:
        weights = datum.loss_fn_inputs["weights"].to_numpy()
        rows = weights.reshape(weights.shape[0], -1)
        total += int(np.count_nonzero(np.any(rows != 0, axis=1)))
    return total


def stop_tokens(tokenizer: Any) -> list[int] | None:
    """Stop at the tokenizer's end-of-turn token (chat models: ``<|im_end|>`` and the like)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if isinstance(eos, int) else None


def build_service_client(config: Config) -> Any:
    """The service client ``backend.kind`` selects (local: in-process; tinker: the real SDK)."""
    if config.backend.kind == "tinker":
        from sdft.backends.remote import create_service_client

        return create_service_client(config.backend.base_url)
    from sdft.backends.local import LocalServiceClient

    return LocalServiceClient(
        checkpoint_root=config.checkpoint_root,
        device=config.backend.device,
        dtype=config.backend.dtype,
    )


def load_dataset(config: Config) -> SimpleSDFTDataset:
    """The training data, batched and shuffled per epoch from ``seed``, with enough epochs for
    ``max_steps`` batches (batch ``i`` is the same on every run with the same config)."""
    data = config.data
    examples = load_examples(
        data.path, source_kind=data.source_kind, fields=data.fields, split=data.split
    )
    batch_size = config.params.batch_size
    batches_per_epoch = -(-len(examples) // batch_size)
    epochs = max(1, -(-config.params.max_steps // batches_per_epoch))
    return SimpleSDFTDataset(examples, batch_size=batch_size, num_epochs=epochs, seed=config.seed)


def load_benchmarks(config: Config) -> dict[str, Benchmark]:
    return {
        entry.name: load_benchmark(entry.path, name=entry.name)
        for entry in config.metadata.benchmark
    }


# --- evaluation -------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal; one plain line per update otherwise (logs, subprocesses)."""

    def __init__(
        self, total: int, desc: str, *, enabled: bool, initial: int = 0, lines: bool = True
    ) -> None:
        self.enabled = enabled
        self.total = total
        self.desc = desc
        self.count = initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        elif not lines:
            self.enabled = False

    def update(self, count: int = 1, **postfix: Any) -> None:
        self.count += count
        if not self.enabled:
            return
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(count)
        else:
            details = " ".join(f"{key} {value}" for key, value in postfix.items())
            print(f"{self.desc} {self.count}/{self.total} {details}".rstrip(), file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
            progress=lambda done, _total, bar=bar: bar.update(done - bar.count),
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
            from tqdm import tqdm

            # tqdm.write keeps a training bar on a terminal intact.
            tqdm.write(f"step {step}: {shown}", file=sys.stderr)
        results.update(metrics)
    return results


# --- the trainer ------------------------------------------------------------------------------


@dataclass
class _Rollouts:
    """The student's completions of one batch, with everything the teacher and the loss need."""

    student_data: list[types.Datum]
    slices: list[Any]
    teacher_sequences: list[types.ModelInput | None]
    sampled_logprobs: list[list[float]]
    completion_lengths: list[int]


class Trainer:
    """Runs one configured training job against a service client (local or Tinker)."""

    def __init__(self, config: Config, service_client: Any, *, progress: bool = True) -> None:
        self.config = config
        self.params = config.params
        self.service = service_client
        self.progress = progress
        self.runlog = RunLog(config.output_dir)
        self.training_client: Any = None
        self.sampler: Any = None
        self.sampler_stale = True
        self.teacher: Any = None
        self.teacher_path: str | None = None
        self.tokenizer: Any = None
        self.dataset: SimpleSDFTDataset | None = None
        self.benchmarks: dict[str, Benchmark] = {}
        self.step = 0
        self.last_train_metrics: dict[str, Any] = {}
        self.last_benchmark_metrics: dict[str, float] = {}

    # --- setup -------------------------------------------------------------------------------

    def description(self) -> str:
        config, params = self.config, self.params
        tuning = "full fine-tuning" if params.full_finetune else f"LoRA rank {params.lora_rank}"
        if config.algorithm.kind == "sft":
            method = "sft (cross_entropy on golden answers)"
        else:
            method = f"sdft (loss {params.loss}, topk {params.topk}, teacher {params.teacher.mode})"
        return (
            f"{method} on {config.model.name}, {tuning}, lr {params.learning_rate:g}, "
            f"backend {config.backend.kind}"
        )

    async def _create_training_client(self, record: ckpt.CheckpointRecord | None) -> Any:
        params, name = self.params, self.config.model.name
        if record is not None:
            return await resolve(
                self.service.create_training_client_from_state_with_optimizer(record.state_path)
            )
        if params.full_finetune:
            return await resolve(
                self.service.create_full_training_client(name, seed=self.config.seed)
            )
        return await resolve(
            self.service.create_lora_training_client(
                name, rank=params.lora_rank, seed=self.config.seed
            )
        )

    async def _create_teacher(self, record: ckpt.CheckpointRecord | None) -> None:
        if self.config.algorithm.kind == "sft":
            return
        teacher = self.params.teacher
        if teacher.mode == "ema":
            self.teacher = await resolve(
                self.training_client.create_ema_sampling_client(alpha=teacher.ema_alpha)
            )
            return
        path = record.extra.get("teacher_path") if record is not None else None
        if teacher.mode == "sync" and path:
            self.teacher_path = path
            self.teacher = await resolve(self.service.create_sampling_client(model_path=path))
            return
        self.teacher = await resolve(
            self.service.create_sampling_client(base_model=self.config.model.name)
        )

    async def _refresh_sampler(self) -> None:
        self.sampler = await resolve(self.training_client.save_weights_and_get_sampling_client())
        self.sampler_stale = False

    async def _current_sampler(self) -> Any:
        """A sampler of the current weights (SFT refreshes it only when a benchmark needs it)."""
        if self.sampler is None or self.sampler_stale:
            await self._refresh_sampler()
        return self.sampler

    async def _sync_teacher(self, step: int) -> None:
        """Hard sync: the teacher becomes a saved copy of the student's current weights (the
        saved path goes into later checkpoint rows, so a resumed run restores the same teacher)."""
        saved = await resolve(self.training_client.save_weights_for_sampler(f"teacher-{step:06d}"))
        self.teacher_path = saved.path
        self.teacher = await resolve(self.service.create_sampling_client(model_path=saved.path))

    # --- prompts and rollouts -----------------------------------------------------------------

    def _system_prompt(self, example_system: str | None) -> str | None:
        return example_system if example_system is not None else self.params.system_prompt

    def _student_prompt(self, question: str, system: str | None) -> types.ModelInput:
        return sdft_data.build_student_prompt(
            question=question,
            tokenizer=self.tokenizer,
            user_template=self.params.user_template,
            system_prompt=system,
            enable_thinking=self.params.enable_thinking,
        )

    def _teacher_prompt(self, question: str, answer: str, system: str | None) -> types.ModelInput:
        return sdft_data.build_teacher_prompt(
            question=question,
            golden_answer=answer,
            tokenizer=self.tokenizer,
            system_prompt=system,
            demo_template=self.params.demo_template,
            enable_thinking=self.params.enable_thinking,
        )

    async def _sample_rollouts(
        self,
        step: int,
        student_prompts: list[types.ModelInput],
        teacher_prompts: list[types.ModelInput],
    ) -> _Rollouts:
        params = self.params
        generation_prompts = teacher_prompts if params.generate_from_teacher else student_prompts
        stop = stop_tokens(self.tokenizer)
        sampler = await self._current_sampler()
        requests = [
            sampler.sample(
                prompt,
                num_samples=params.group_size,
                sampling_params=types.SamplingParams(
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    seed=sampling_seed(self.config.seed, step, index),
                    stop=stop,
                ),
            )
            for index, prompt in enumerate(generation_prompts)
        ]
        responses = await asyncio.gather(*(request.result_async() for request in requests))
        rollouts = _Rollouts([], [], [], [], [])
        for prompt_index, response in enumerate(responses):
            teacher_prompt = teacher_prompts[prompt_index]
            for sequence in response.sequences:
                tokens = list(sequence.tokens)
                if not tokens:
                    continue
                datum = sdft_data.student_datum_from_rollout(
                    prompt=student_prompts[prompt_index], completion_tokens=tokens
                )
                completion = sdft_data.extract_completion_tokens(
                    datum, teacher_prompt.length, max_context_length=params.max_context_length
                )
                rollouts.student_data.append(datum)
                rollouts.slices.append(completion)
                rollouts.teacher_sequences.append(
                    sdft_data.build_teacher_forced_sequence(teacher_prompt, completion.tokens)
                    if len(completion.tokens) > 0
                    else None
                )
                rollouts.sampled_logprobs.append(list(sequence.logprobs or []))
                rollouts.completion_lengths.append(len(tokens))
        return rollouts

    async def _score_topk(
        self, sequences: list[types.ModelInput | None], slices: list[CompletionSlice]
    ) -> list[Any]:
        """Teacher top-K prompt log-probs of every teacher-forced sequence, all in flight.

        Only the completion rows are asked for (``prompt_logprobs_last_n``): the teacher prompt's
        own rows are never used, and skipping them saves the output layer on most of the sequence.
        """
        params = types.SamplingParams(max_tokens=1)
        requests = [
            self.teacher.sample(
                sequence,
                num_samples=1,
                sampling_params=params,
                include_prompt_logprobs=True,
                topk_prompt_logprobs=self.params.topk,
                prompt_logprobs_last_n=len(completion.tokens),
            )
            if sequence is not None
            else None
            for sequence, completion in zip(sequences, slices, strict=True)
        ]
        return list(await asyncio.gather(*(_maybe(request) for request in requests)))

    async def _score_logprobs(self, sequences: list[types.ModelInput | None]) -> list[Any]:
        requests = [
            self.teacher.compute_logprobs(sequence) if sequence is not None else None
            for sequence in sequences
        ]
        return list(await asyncio.gather(*(_maybe(request) for request in requests)))

    # --- training -----------------------------------------------------------------------------

    def _adam(self, step: int) -> types.AdamParams:
        params = self.params
        return types.AdamParams(
            learning_rate=learning_rate_at(self.config, step),
            beta1=params.beta1,
            beta2=params.beta2,
            eps=params.eps,
            weight_decay=params.weight_decay,
            grad_clip_norm=params.grad_clip_norm,
        )

    async def _train_pipelined(
        self, datums: list[types.Datum], submit: Callable[[list[types.Datum]], Any], step: int
    ) -> float:
        """The cookbook's ``train_step``: one optimizer step per substep, the next
        forward-backward + optim_step submitted before the current ones are awaited."""
        adam = self._adam(step)
        batches = split_evenly(datums, self.params.num_substeps)

        def enqueue(batch: list[types.Datum]) -> tuple[Any, Any]:
            forward_backward = submit([sdft_data.strip_mask(datum) for datum in batch])
            return forward_backward, self.training_client.optim_step(adam)

        loss_sum = 0.0
        pending = enqueue(batches[0])
        for index in range(len(batches)):
            following = enqueue(batches[index + 1]) if index + 1 < len(batches) else None
            output = await resolve(pending[0])
            await resolve(pending[1])
            loss_sum += float(output.metrics["loss:sum"])
            if following is not None:
                pending = following
        return loss_sum

    def _submit_cross_entropy(self, batch: list[types.Datum]) -> Any:
        return self.training_client.forward_backward(batch, "cross_entropy")

    def _submit_importance_sampling(self, batch: list[types.Datum]) -> Any:
        return self.training_client.forward_backward(batch, "importance_sampling")

    def _submit_reverse_kl(self, batch: list[types.Datum]) -> Any:
        from sdft.losses import reverse_kl_custom_loss

        return self.training_client.forward_backward_custom(batch, reverse_kl_custom_loss)

    async def sdft_step(self, step: int, batch: SDFTBatch) -> dict[str, Any]:
        params = self.params
        started = time.perf_counter()
        student_prompts, teacher_prompts = [], []
        for example in batch.examples:
            system = self._system_prompt(example.system_prompt)
            student_prompts.append(self._student_prompt(example.question, system))
            teacher_prompts.append(
                self._teacher_prompt(example.question, example.golden_answer, system)
            )
        rollouts = await self._sample_rollouts(step, student_prompts, teacher_prompts)
        sampled = time.perf_counter()
        metrics: dict[str, Any] = {}
        if not rollouts.student_data:
            raise RuntimeError(f"step {step}: the student produced no completion tokens")

        skip = params.skip_first_n
        if params.loss == "full_kl":
            teacher_done = sampled
            fb = self.training_client.forward_backward_full_kl(
                rollouts.student_data,
                self.teacher,
                rollouts.teacher_sequences,
                rollouts.slices,
                skip_first_n=skip,
            )
            optim = self.training_client.optim_step(self._adam(step))
            output = await resolve(fb)
            await resolve(optim)
            loss_sum = float(output.metrics["loss:sum"])
            distilled = sum(max(0, len(s.tokens) - skip) for s in rollouts.slices)
            for key, value in output.metrics.items():
                if key != "loss:sum":
                    metrics[f"train/{key}"] = value
        elif params.topk == 0:
            teacher_logprobs = await self._score_logprobs(rollouts.teacher_sequences)
            teacher_done = time.perf_counter()
            datums, is_metrics = sdft_data.build_importance_sampling_datums(
                student_data=rollouts.student_data,
                completion_slices=rollouts.slices,
                teacher_logprobs=teacher_logprobs,
                student_logprobs=rollouts.sampled_logprobs,
                skip_first_n=skip,
            )
            metrics.update(is_metrics)
            distilled = int(is_metrics["sdft/advantage_positions"])
            loss_sum = await self._train_pipelined(datums, self._submit_importance_sampling, step)
        else:
            responses = await self._score_topk(rollouts.teacher_sequences, rollouts.slices)
            teacher_done = time.perf_counter()
            if params.loss == "reverse_kl":
                datums, kernel_metrics = sdft_data.build_reverse_kl_datums(
                    student_data=rollouts.student_data,
                    completion_slices=rollouts.slices,
                    teacher_topk_logprobs=responses,
                    topk=params.topk,
                    vocab_size=len(self.tokenizer),
                    skip_first_n=skip,
                )
                submit = self._submit_reverse_kl
            else:
                datums, kernel_metrics = sdft_data.build_topk_targets(
                    student_data=rollouts.student_data,
                    completion_slices=rollouts.slices,
                    teacher_topk_logprobs=responses,
                    topk=params.topk,
                    vocab_size=len(self.tokenizer),
                    skip_first_n=skip,
                    weight_scale=params.weight_scale,
                )
                submit = self._submit_cross_entropy
            metrics.update(kernel_metrics)
            distilled = int(kernel_metrics["sdft/distilled_positions"])
            metrics["train/teacher_entropy"] = kernel_metrics["sdft/mean_teacher_entropy_distilled"]
            loss_sum = await self._train_pipelined(datums, submit, step)
        trained = time.perf_counter()

        lengths = rollouts.completion_lengths
        metrics.update(
            {
                "train/mean_loss": loss_sum / distilled if distilled else None,
                "train/loss_sum": loss_sum,
                "train/distilled_tokens": distilled,
                "train/completion_tokens": sum(lengths),
                "train/mean_completion_length": sum(lengths) / len(lengths),
                "train/num_sequences": len(lengths),
                "train/truncated": sum(1 for s in rollouts.slices if s.truncated),
                "train/num_tokens": sum(d.model_input.length for d in rollouts.student_data),
                "train/learning_rate": learning_rate_at(self.config, step),
                "time/sample_s": sampled - started,
                "time/teacher_s": teacher_done - sampled,
                "time/train_s": trained - teacher_done,
            }
        )
        return metrics

    def sft_datum(self, question: str, answer: str, system: str | None) -> types.Datum:
        """Student prompt + golden answer tokens + end-of-turn, weight 1 on the answer tokens."""
        prompt = self._student_prompt(question, system)
        answer_tokens = list(self.tokenizer.encode(answer, add_special_tokens=False))
        stop = stop_tokens(self.tokenizer)
        if stop:
            answer_tokens.append(stop[0])
        room = self.params.max_context_length - prompt.length
        if room < 1:
            raise ValueError(
                f"the prompt of {question!r} has {prompt.length} tokens, which leaves no room for "
                f"the answer within max_context_length {self.params.max_context_length}"
            )
        datum = sdft_data.student_datum_from_rollout(
            prompt=prompt, completion_tokens=answer_tokens[:room]
        )
        inputs = datum.loss_fn_inputs
        return types.Datum(
            model_input=datum.model_input,
            loss_fn_inputs={"target_tokens": inputs["target_tokens"], "weights": inputs["mask"]},
        )

    async def sft_step(self, step: int, batch: SDFTBatch) -> dict[str, Any]:
        started = time.perf_counter()
        datums = [
            self.sft_datum(e.question, e.golden_answer, self._system_prompt(e.system_prompt))
            for e in batch.examples
        ]
        prepared = time.perf_counter()
        loss_sum = await self._train_pipelined(datums, self._submit_cross_entropy, step)
        trained = time.perf_counter()
        answer_tokens = weighted_positions(datums)
        return {
            "train/mean_loss": loss_sum / answer_tokens if answer_tokens else None,
            "train/loss_sum": loss_sum,
            "train/distilled_tokens": answer_tokens,
            "train/num_sequences": len(datums),
            "train/num_tokens": sum(d.model_input.length for d in datums),
            "train/learning_rate": learning_rate_at(self.config, step),
            "time/sample_s": 0.0,
            "time/teacher_s": 0.0,
            "time/prepare_s": prepared - started,
            "time/train_s": trained - prepared,
        }

    # --- the run ------------------------------------------------------------------------------

    def _due_benchmarks(self, step: int) -> list[str]:
        max_steps = self.params.max_steps
        due = []
        for entry in self.config.metadata.benchmark:
            if entry.run_every is None:
                if step == max_steps:
                    due.append(entry.name)
            elif step == 0 or step % entry.run_every == 0 or step == max_steps:
                due.append(entry.name)
        return due

    def _checkpoint_due(self, step: int) -> bool:
        every = self.params.save_every
        return step == self.params.max_steps or (every is not None and step % every == 0)

    async def _evaluate(self, step: int) -> None:
        names = self._due_benchmarks(step)
        if not names:
            return
        results = await evaluate(
            self.config,
            self.benchmarks,
            names,
            await self._current_sampler(),
            self.tokenizer,
            step=step,
            runlog=self.runlog,
            progress=self.progress,
        )
        self.last_benchmark_metrics.update(results)

    def _write_reports(self, status: str, error: str | None = None) -> None:
        self.runlog.write_summary(
            status=status,
            steps_completed=self.step,
            max_steps=self.params.max_steps,
            description=self.description(),
            error=error,
        )
        self.runlog.write_plot(title=self.description())

    async def run(self, resume_from: ckpt.CheckpointRecord | None) -> RunResult:
        config = self.config
        self.dataset = load_dataset(config)
        self.benchmarks = load_benchmarks(config)
        self.step = resume_from.step if resume_from is not None else 0
        self.training_client = await self._create_training_client(resume_from)
        self.tokenizer = self.training_client.get_tokenizer()
        await self._create_teacher(resume_from)
        self._write_reports("running")

        max_steps = self.params.max_steps
        if self.step == 0:
            await self._evaluate(0)
        bar = Progress(max_steps, "train", enabled=self.progress, initial=self.step)
        try:
            for step in range(self.step + 1, max_steps + 1):
                batch = self.dataset.get_batch(step - 1)
                if config.algorithm.kind == "sft":
                    metrics = await self.sft_step(step, batch)
                else:
                    metrics = await self.sdft_step(step, batch)
                refresh_started = time.perf_counter()
                self.sampler_stale = True
                if config.algorithm.kind == "sdft":
                    await self._refresh_sampler()
                teacher = self.params.teacher
                if (
                    config.algorithm.kind == "sdft"
                    and teacher.mode == "sync"
                    and step % teacher.sync_every == 0  # type: ignore[operator]
                ):
                    await self._sync_teacher(step)
                metrics["time/refresh_s"] = time.perf_counter() - refresh_started
                self.runlog.log_metrics(step, "train", metrics)
                self.last_train_metrics = metrics
                loss = metrics.get("train/mean_loss")
                bar.update(1, loss=f"{loss:.4f}" if isinstance(loss, float) else "n/a")
                await self._evaluate(step)
                if self._checkpoint_due(step):
                    extra = {"teacher_path": self.teacher_path} if self.teacher_path else {}
                    await ckpt.save_checkpoint(
                        self.training_client,
                        config.output_dir,
                        step,
                        final=step == max_steps,
                        extra=extra,
                    )
                self.step = step
                self._write_reports("running")
        finally:
            bar.close()
        self._write_reports("completed")
        return result_from_log(config, "completed", self.step)


def result_from_log(config: Config, status: str, steps_completed: int) -> RunResult:
    """A :class:`RunResult` rebuilt from ``metrics.jsonl`` (last train row, latest benchmark values)."""
    rows = RunLog(config.output_dir).read_metrics()
    train_rows = [row for row in rows if row["split"] == "train"]
    latest: dict[str, float] = {}
    for key, points in benchmark_series(rows).items():
        latest[key] = points[-1][1]
    return RunResult(
        status=status,
        steps_completed=steps_completed,
        max_steps=config.params.max_steps,
        output_dir=config.output_dir,
        train_metrics=dict(train_rows[-1]["metrics"]) if train_rows else {},
        benchmark_metrics=latest,
    )


async def _maybe(request: Any) -> Any:
    return None if request is None else await resolve(request)


# --- entry points -----------------------------------------------------------------------------


def prepare_output_dir(
    config: Config, *, resume: bool, overwrite: bool
) -> ckpt.CheckpointRecord | None:
    """Check ``output_dir`` against the requested mode; returns the checkpoint to resume from.

    Without ``resume`` an existing run is refused unless ``overwrite`` (which deletes exactly the
    files a run writes). With ``resume`` the config must match the one the run started with
    (``max_steps``, ``save_every``, benchmarks and the device may change), and metrics rows after
    the last checkpoint are dropped because those steps will run again.
    """
    output_dir = config.output_dir
    present = existing_outputs(output_dir)
    if resume and overwrite:
        raise RunDirectoryError("--resume and --overwrite exclude each other")
    if not resume:
        if present and not overwrite:
            raise RunDirectoryError(
                f"output_dir {output_dir} already holds a run ({', '.join(present)}); pass "
                "--resume to continue it or --overwrite to delete it and start over"
            )
        if present:
            remove_outputs(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(config)
        return None

    resolved = output_dir / RESOLVED_CONFIG_NAME
    if resolved.is_file():
        previous = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
        changed = training_differences(previous, config.resolved_dict())
        if changed:
            raise RunDirectoryError(
                f"cannot resume {output_dir}: the config changed since the run started "
                f"({', '.join(changed)}); start a new run (another output_dir or --overwrite)"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    record = ckpt.last_checkpoint(output_dir)
    runlog = RunLog(output_dir)
    runlog.keep_steps_up_to(record.step if record is not None else -1)
    write_resolved_config(config)
    return record


async def train_async(
    config: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    service_client: Any = None,
    progress: bool = True,
) -> RunResult:
    """Run (or resume) the training job ``config`` describes; see :func:`train`."""
    if service_client is None:
        # First, so that a missing key or an unreachable service fails before anything is written.
        service_client = build_service_client(config)
    record = prepare_output_dir(config, resume=resume, overwrite=overwrite)
    if record is not None and record.step >= config.params.max_steps:
        trainer = Trainer(config, service_client, progress=progress)
        trainer.step = record.step
        trainer._write_reports("completed")
        return result_from_log(config, "completed", record.step)
    trainer = Trainer(config, service_client, progress=progress)
    try:
        return await trainer.run(record)
    except (KeyboardInterrupt, asyncio.CancelledError):
        trainer._write_reports("interrupted")
        raise
    except Exception as exc:
        trainer._write_reports("failed", error=f"{type(exc).__name__}: {exc}")
        raise


def train(
    config: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    service_client: Any = None,
    progress: bool = True,
) -> RunResult:
    """Train as configured, writing every output into ``config.output_dir``.

    ``resume`` continues from the last checkpoint in ``output_dir``; ``overwrite`` replaces an
    existing run; ``service_client`` replaces the one ``backend`` would build (tests, wrappers).
    """
    return asyncio.run(
        train_async(
            config,
            resume=resume,
            overwrite=overwrite,
            service_client=service_client,
            progress=progress,
        )
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


__all__ = [
    "EvalResult",
    "RunDirectoryError",
    "RunResult",
    "Trainer",
    "build_service_client",
    "evaluate_async",
    "evaluate_checkpoint",
    "learning_rate_at",
    "load_benchmarks",
    "load_dataset",
    "prepare_output_dir",
    "train",
    "train_async",
]
