"""The SDFT and SFT training loops, backend-neutral (Tinker or the local backend).

One SDFT step (the paper's algorithm, the cookbook's recipe):

1. the student samples ``group_size`` completions per question, on-policy, from the student
   prompt (``user_template`` through the chat template) — or from the teacher prompt when
   ``generate_from_teacher`` is set; all requests of the batch are in flight at once
   (:class:`sdft.rollouts.SamplingRound`);
2. the teacher prompt shows the golden answer as an in-context demonstration
   (:func:`sdft.data.build_teacher_prompt`);
3. the teacher scores ``teacher_prompt + completion`` (truncated to ``max_context_length``) with
   ``topk_prompt_logprobs = topk``;
4. :func:`sdft.data.build_topk_targets` turns the dense responses into ``(N, K)`` datums and the
   student trains: ``cross_entropy`` (forward KL over the teacher's top-K), ``reverse_kl`` (custom
   loss), ``topk: 0`` (importance-sampling fallback) or ``full_kl`` (local backend: exact
   full-vocabulary KL); ``forward_backward`` and ``optim_step`` are pipelined per substep;
5. the student's sampler is refreshed from the new weights; the teacher is the frozen base model
   (``static``), re-synced from the student every ``sync_every`` steps (``sync``) or an EMA of the
   student (``ema``, local backend).

Steps 1–5 are streamed per question by default (:mod:`sdft.schedules`: a question is scored as
soon as its rollouts arrive, training and the sampler refresh are submitted as soon as they can
be), with the same requests and results as running them phase by phase (``streaming: false``).
``overlap_sampling`` samples batch ``s + 1`` with the sampler of step ``s`` while step ``s``
trains: one step off-policy (``train/off_policy_steps``), as the cookbook's async RL does. A
resumed run samples its first step on-policy.

The SFT baseline (``algorithm.kind: sft``) trains ``cross_entropy`` on the golden answers with the
same config, data, evaluation and logging.

Step ``s`` (1-based) writes its train row, then the benchmark rows due at ``s``, then — when a
checkpoint is due — the checkpoint row with ``batch = s``. A resumed run drops every metrics row
after its last checkpoint and redoes those steps, so no step is lost or repeated.

This module is the algorithm; its parts are objects of their own modules: the teacher policies
(:mod:`sdft.teachers`), one objective per loss (:mod:`sdft.objectives`), the optimizer pipeline
(:mod:`sdft.optimizer`), evaluation (:mod:`sdft.evaluation`) and the run-directory rules
(:mod:`sdft.rundir`). A step whose loss is not finite fails the run (unless ``allow_nan``);
SIGTERM ends a run like Ctrl-C, with status ``interrupted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tinker import types

from sdft import checkpoints as ckpt
from sdft import data as sdft_data
from sdft.clients import build_service_client, resolve, stop_tokens
from sdft.config import Config
from sdft.datasets import SDFTBatch, SimpleSDFTDataset, load_examples
from sdft.evaluation import (
    EvalResult,
    LoadedBenchmark,
    due_benchmarks,
    evaluate,
    evaluate_async,
    evaluate_checkpoint,
    load_benchmarks,
)
from sdft.objectives import Objective, objective_for, weighted_positions
from sdft.optimizer import adam_params, learning_rate_at, split_evenly, train_pipelined
from sdft.progress import Progress
from sdft.rollouts import (
    QuestionPrompts,
    SamplingRound,
    question_prompts,
    student_prompt,
    teacher_prompt,
)
from sdft.rundir import (
    RunDirectoryError,
    RunResult,
    apply_plan,
    check_checkpoint_matches,
    plan_output_dir,
    prepare_output_dir,
    result_from_log,
)
from sdft.runlog import RunLog
from sdft.schedules import StepHooks, schedule_for
from sdft.teachers import TeacherPolicy, teacher_policy


class DivergedError(RuntimeError):
    """A training step produced a non-finite loss (the run stops unless ``allow_nan``)."""


def check_finite_loss(step: int, metrics: dict[str, Any]) -> None:
    loss = metrics.get("train/loss_sum")
    if isinstance(loss, float) and not math.isfinite(loss):
        raise DivergedError(
            f"step {step}: the loss is not finite (train/loss_sum = {loss}); the run stops here "
            "(--allow-nan, or train(..., allow_nan=True), keeps training)"
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


@dataclass
class _Prefetched:
    """The next batch's rollouts, sampled while the current batch trains (``overlap_sampling``):
    ``sampling`` was submitted to a sampler holding the weights after ``weights_step`` steps."""

    step: int
    sampling: SamplingRound
    weights_step: int


class Trainer:
    """Runs one configured training job against a service client (local or Tinker)."""

    def __init__(
        self,
        config: Config,
        service_client: Any,
        *,
        progress: bool = True,
        allow_nan: bool = False,
        teacher_check: int = 0,
    ) -> None:
        self.config = config
        self.allow_nan = allow_nan
        self.teacher_check = teacher_check
        self.params = config.params
        self.service = service_client
        self.progress = progress
        self.runlog = RunLog(config.output_dir)
        self.training_client: Any = None
        self.sampler: Any = None
        self.sampler_stale = True
        self.sampler_weights_step = 0  # optimizer steps in the sampler's weights
        # a refresh submitted and not yet awaited, with the optimizer steps in its weights
        self._pending_sampler: tuple[Any, int] | None = None
        self._prefetched: _Prefetched | None = None
        self.schedule = schedule_for(config.params.streaming)
        self.teacher: TeacherPolicy | None = None
        self.objective: Objective | None = None
        self.tokenizer: Any = None
        self.dataset: SimpleSDFTDataset | None = None
        self.benchmarks: dict[str, LoadedBenchmark] = {}
        self._base_sampler: Any = None  # the base model, for drift benchmarks
        self.step = 0
        self.steps_trained = 0  # optimizer steps whose training has finished

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

    async def create_training_client(self, record: ckpt.CheckpointRecord | None) -> Any:
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

    def _submit_refresh(self, weights_step: int) -> None:
        """Ask for a sampler of the weights as they will be once the requests already submitted
        to the training client have run (it runs them in order): ``weights_step`` steps."""
        if self._pending_sampler is None:
            request = self.training_client.save_weights_and_get_sampling_client()
            self._pending_sampler = (request, weights_step)

    async def _refresh_sampler(self) -> None:
        self._submit_refresh(self.steps_trained)
        assert self._pending_sampler is not None
        (request, weights_step), self._pending_sampler = self._pending_sampler, None
        self.sampler = await resolve(request)
        self.sampler_weights_step = weights_step
        self.sampler_stale = False

    async def _current_sampler(self) -> Any:
        """A sampler of the current weights (SFT refreshes it only when a benchmark needs it)."""
        if self.sampler is None or self.sampler_stale:
            await self._refresh_sampler()
        return self.sampler

    # --- prompts and rollouts -----------------------------------------------------------------

    def _system_prompt(self, example_system: str | None) -> str | None:
        return example_system if example_system is not None else self.params.system_prompt

    def _student_prompt(self, question: str, system: str | None) -> types.ModelInput:
        return student_prompt(question, system, self.params, self.tokenizer)

    def _teacher_prompt(self, question: str, answer: str, system: str | None) -> types.ModelInput:
        return teacher_prompt(question, answer, system, self.params, self.tokenizer)

    def _question_prompts(self, batch: SDFTBatch) -> list[QuestionPrompts]:
        return [question_prompts(e, self.params, self.tokenizer) for e in batch.examples]

    def _sampling_round(self, step: int, batch: SDFTBatch, sampler: Any) -> SamplingRound:
        """The student's completions of ``batch`` for ``step``, every request in flight at once."""
        return SamplingRound(
            sampler,
            self._question_prompts(batch),
            params=self.params,
            seed=self.config.seed,
            step=step,
            stop=stop_tokens(self.tokenizer),
        )

    def _prefetch(self, step: int) -> None:
        """``overlap_sampling``: sample ``step``'s batch now, on the current sampler."""
        if not self.params.overlap_sampling or step > self.params.max_steps:
            return
        assert self.dataset is not None
        sampling = self._sampling_round(step, self.dataset.get_batch(step - 1), self.sampler)
        self._prefetched = _Prefetched(step, sampling.start(), self.sampler_weights_step)

    def _drop_prefetched(self) -> None:
        if self._prefetched is not None:
            self._prefetched.sampling.cancel()
            self._prefetched = None

    # --- one step -----------------------------------------------------------------------------

    async def sdft_step(self, step: int, batch: SDFTBatch) -> dict[str, Any]:
        """Sample on-policy (or take the overlapped rollouts), let the teacher score, train the
        objective; returns the metrics."""
        if self.teacher is None or self.objective is None:
            raise RuntimeError("sdft_step needs the teacher and objective of Trainer.run")
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched.step == step:
            sampling, weights_step = prefetched.sampling, prefetched.weights_step
        else:
            if prefetched is not None:
                prefetched.sampling.cancel()
            sampler = await self._current_sampler()
            sampling, weights_step = (
                self._sampling_round(step, batch, sampler),
                self.sampler_weights_step,
            )
        hooks = StepHooks(
            sampled=lambda: self._prefetch(step + 1),
            training_submitted=lambda: self._submit_refresh(step),
        )
        outcome = await self.schedule.run(
            sampling, self.teacher.client, self.objective, step, hooks
        )
        rollouts, result = outcome.rollouts, outcome.result

        lengths = rollouts.completion_lengths
        metrics = dict(result.metrics)
        metrics.update(
            {
                "train/mean_loss": result.loss_sum / result.distilled if result.distilled else None,
                "train/loss_sum": result.loss_sum,
                "train/distilled_tokens": result.distilled,
                "train/completion_tokens": sum(lengths),
                "train/mean_completion_length": sum(lengths) / len(lengths),
                "train/num_sequences": len(lengths),
                "train/truncated": sum(1 for s in rollouts.slices if s.truncated),
                "train/num_tokens": sum(d.model_input.length for d in rollouts.student_data),
                "train/learning_rate": learning_rate_at(self.config, step),
                "train/off_policy_steps": step - 1 - weights_step,
                "time/sample_s": outcome.sampled_s,
                "time/teacher_s": outcome.scored_s - outcome.sampled_s,
                "time/train_s": outcome.trained_s - outcome.scored_s,
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
        """Cross-entropy on the golden answers (the SFT baseline)."""
        started = time.perf_counter()
        datums = [
            self.sft_datum(e.question, e.golden_answer, self._system_prompt(e.system_prompt))
            for e in batch.examples
        ]
        prepared = time.perf_counter()
        loss_sum = await train_pipelined(
            self.training_client,
            datums,
            lambda chunk: self.training_client.forward_backward(chunk, "cross_entropy"),
            adam_params(self.config, step),
            self.params.num_substeps,
        )
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

    def _checkpoint_due(self, step: int) -> bool:
        every = self.params.save_every
        return step == self.params.max_steps or (every is not None and step % every == 0)

    async def _evaluate(self, step: int) -> None:
        names = due_benchmarks(self.config, step)
        if not names:
            return
        entries = {entry.name: entry for entry in self.config.metadata.benchmark}
        base_sampler = None
        if any(entries[name].kind == "drift" for name in names):
            if self._base_sampler is None:
                self._base_sampler = await resolve(
                    self.service.create_sampling_client(base_model=self.config.model.name)
                )
            base_sampler = self._base_sampler
        await evaluate(
            self.config,
            self.benchmarks,
            names,
            await self._current_sampler(),
            self.tokenizer,
            step=step,
            runlog=self.runlog,
            progress=self.progress,
            base_sampler=base_sampler,
        )

    async def _check_teacher(self) -> None:
        """Step 0: does the teacher know more than the student? (``summary.md`` section)"""
        from sdft.metricrows import TEACHER_CHECK_SPLIT
        from sdft.teacher_check import check_teacher, sample_examples

        assert self.dataset is not None and self.teacher is not None
        check = await check_teacher(
            sample_examples(self.dataset.examples, self.teacher_check, self.config.seed),
            params=self.params,
            tokenizer=self.tokenizer,
            student=await self._current_sampler(),
            teacher=self.teacher.client,
            training_client=self.training_client,
            seed=self.config.seed,
        )
        self.runlog.log_metrics(0, TEACHER_CHECK_SPLIT, check.metrics())

    def write_reports(self, status: str, error: str | None = None) -> None:
        self.runlog.write_summary(
            status=status,
            steps_completed=self.step,
            max_steps=self.params.max_steps,
            description=self.description(),
            error=error,
        )
        self.runlog.write_plot(title=self.description())

    async def prepare(
        self, resume_from: ckpt.CheckpointRecord | None, training_client: Any = None
    ) -> None:
        """The training client (``training_client``, or one created from ``resume_from`` or the
        base model), tokenizer, teacher and objective; the data when not loaded yet."""
        config = self.config
        if self.dataset is None:
            self.dataset = load_dataset(config)
            self.benchmarks = load_benchmarks(config)
        self.step = resume_from.step if resume_from is not None else 0
        self.steps_trained = self.sampler_weights_step = self.step
        self.training_client = training_client or await self.create_training_client(resume_from)
        self.tokenizer = self.training_client.get_tokenizer()
        if config.algorithm.kind == "sdft":
            self.teacher = teacher_policy(self.params.teacher, self.service, config.model.name)
            await self.teacher.create(self.training_client, resume_from)
            self.objective = objective_for(config, self.training_client, self.tokenizer)

    async def train_step(self, step: int) -> dict[str, Any]:
        """Train step ``step`` (1-based) of the data: the SDFT or SFT step, then the sampler
        refresh and teacher update of SDFT; returns the step's metrics (not yet logged)."""
        assert self.dataset is not None
        batch = self.dataset.get_batch(step - 1)
        if self.config.algorithm.kind == "sdft":
            metrics = await self.sdft_step(step, batch)
        else:
            metrics = await self.sft_step(step, batch)
        self.steps_trained = step
        refresh_started = time.perf_counter()
        self.sampler_stale = True
        if self.teacher is not None:
            # SDFT samples on-policy every step (SFT refreshes only for a benchmark).
            await self._refresh_sampler()
            await self.teacher.after_step(step, self.training_client)
        metrics["time/refresh_s"] = time.perf_counter() - refresh_started
        return metrics

    def close(self) -> None:
        """Drop what is still in flight for a step that will not run (overlapped sampling)."""
        self._drop_prefetched()

    async def run(
        self, resume_from: ckpt.CheckpointRecord | None, training_client: Any = None
    ) -> RunResult:
        """sample → score → objective → teacher update → log → evaluate → checkpoint, per step.

        ``training_client``: one already created from ``resume_from`` (default: created here)."""
        config = self.config
        sdft = config.algorithm.kind == "sdft"
        await self.prepare(resume_from, training_client)
        assert self.dataset is not None
        self.write_reports("running")

        max_steps = self.params.max_steps
        if self.step == 0:
            await self._evaluate(0)
            if sdft and self.teacher_check:
                await self._check_teacher()
        bar = Progress(max_steps, "train", enabled=self.progress, initial=self.step)
        try:
            for step in range(self.step + 1, max_steps + 1):
                metrics = await self.train_step(step)
                self.runlog.log_metrics(step, "train", metrics)
                if not self.allow_nan:
                    check_finite_loss(step, metrics)
                loss = metrics.get("train/mean_loss")
                bar.update(1, loss=f"{loss:.4f}" if isinstance(loss, float) else "n/a")
                await self._evaluate(step)
                if self._checkpoint_due(step):
                    extra = self.teacher.checkpoint_extra() if self.teacher is not None else {}
                    await ckpt.save_checkpoint(
                        self.training_client,
                        config.output_dir,
                        step,
                        final=step == max_steps,
                        extra=extra,
                    )
                self.step = step
                self.write_reports("running")
        finally:
            self.close()
            bar.close()
        self.write_reports("completed")
        return result_from_log(config, "completed", self.step)


# --- entry points -----------------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_cancels(task: asyncio.Task[Any] | None) -> Iterator[list[bool]]:
    """While active, SIGTERM cancels ``task`` (like Ctrl-C); the yielded list records whether it
    came. Outside the main thread (no signal handlers there) this does nothing."""
    received: list[bool] = []
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:
        received.append(True)
        if task is not None:
            task.cancel()

    try:
        previous = signal.getsignal(signal.SIGTERM)
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError, ValueError):
        previous = None
        installed = False
    else:
        installed = True
    try:
        yield received
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


async def train_async(
    config: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    service_client: Any = None,
    progress: bool = True,
    allow_nan: bool = False,
    teacher_check: int = 0,
) -> RunResult:
    """Run (or resume) the training job ``config`` describes; see :func:`train`.

    ``teacher_check``: at step 0 of an SDFT run, check the teacher against the student on this
    many training examples (:mod:`sdft.teacher_check`; a section of ``summary.md``)."""
    if service_client is None:
        # First, so that a missing key or an unreachable service fails before anything is written.
        service_client = build_service_client(config)
    trainer = Trainer(
        config, service_client, progress=progress, allow_nan=allow_nan, teacher_check=teacher_check
    )
    # The data and benchmarks load before output_dir is touched: a bad file leaves no run behind.
    trainer.dataset = load_dataset(config)
    trainer.benchmarks = load_benchmarks(config)
    plan = plan_output_dir(config, resume=resume, overwrite=overwrite)
    record = plan.resume_from
    if record is not None and record.step >= config.params.max_steps:
        apply_plan(plan)
        trainer.step = record.step
        trainer.write_reports("completed")
        return result_from_log(config, "completed", record.step)
    training_client = None
    if record is not None:
        training_client = await trainer.create_training_client(record)
        # get_info() answers without a request in Tinker's SDK (get_info_async is deprecated).
        check_checkpoint_matches(config, await resolve(training_client.get_info()), record)
    apply_plan(plan)
    with _sigterm_cancels(asyncio.current_task()) as terminated:
        try:
            return await trainer.run(record, training_client)
        except (KeyboardInterrupt, asyncio.CancelledError):
            trainer.write_reports("interrupted")
            if terminated:
                raise KeyboardInterrupt("terminated by SIGTERM") from None
            raise
        except Exception as exc:
            trainer.write_reports("failed", error=f"{type(exc).__name__}: {exc}")
            raise


def train(
    config: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    service_client: Any = None,
    progress: bool = True,
    allow_nan: bool = False,
    teacher_check: int = 0,
) -> RunResult:
    """Train as configured, writing every output into ``config.output_dir``.

    ``resume`` continues from the last checkpoint in ``output_dir``; ``overwrite`` replaces an
    existing run; ``service_client`` replaces the one ``backend`` would build (tests, wrappers);
    ``allow_nan`` keeps training after a step with a non-finite loss (by default the run stops
    with status ``failed``). SIGTERM, like Ctrl-C, ends the run with status ``interrupted``.
    ``teacher_check``: see :func:`train_async`.
    """
    return asyncio.run(
        train_async(
            config,
            resume=resume,
            overwrite=overwrite,
            service_client=service_client,
            progress=progress,
            allow_nan=allow_nan,
            teacher_check=teacher_check,
        )
    )


__all__ = [
    "DivergedError",
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
    "resolve",
    "split_evenly",
    "train",
    "train_async",
]
