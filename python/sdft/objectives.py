"""One object per SDFT loss: how the teacher scores the student's rollouts and how the student
trains on those scores.

- :class:`TopKCrossEntropy` (``loss: cross_entropy``, ``topk > 0``): forward KL towards the
  teacher's renormalized top-K (the paper's and the cookbook's default);
- :class:`TopKReverseKL` (``loss: reverse_kl``): reverse KL over the teacher's top-K, a custom loss;
- :class:`ImportanceSampling` (``topk: 0``): advantage = teacher log-prob − sampled log-prob;
- :class:`FullVocabularyKL` (``loss: full_kl``, local backend): exact full-vocabulary KL, the
  teacher runs inside the training client's forward-backward.

Every objective returns the summed loss, the number of distilled positions and its own metrics;
the trainer adds the metrics every step shares.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tinker import types

from sdft import data as sdft_data
from sdft.clients import resolve, resolve_optional
from sdft.config import Config
from sdft.data import CompletionSlice
from sdft.optimizer import adam_params, train_pipelined


@dataclass
class Rollouts:
    """The student's completions of one batch, with everything the teacher and the loss need."""

    student_data: list[types.Datum] = field(default_factory=list)
    slices: list[CompletionSlice] = field(default_factory=list)
    teacher_sequences: list[types.ModelInput | None] = field(default_factory=list)
    sampled_logprobs: list[list[float]] = field(default_factory=list)
    completion_lengths: list[int] = field(default_factory=list)


@dataclass
class ObjectiveResult:
    loss_sum: float
    distilled: int
    metrics: dict[str, Any]


def weighted_positions(datums: Sequence[types.Datum]) -> int:
    """Positions that carry a training signal: rows of ``weights`` with any non-zero entry."""
    total = 0
    for datum in datums:
        weights = datum.loss_fn_inputs["weights"].to_numpy()
        rows = weights.reshape(weights.shape[0], -1)
        total += int(np.count_nonzero(np.any(rows != 0, axis=1)))
    return total


class Objective(ABC):
    """Scores a batch of rollouts with the teacher, then trains the student on the scores."""

    def __init__(self, config: Config, training_client: Any, tokenizer: Any) -> None:
        self.config = config
        self.params = config.params
        self.training_client = training_client
        self.tokenizer = tokenizer

    @abstractmethod
    async def score(self, teacher: Any, rollouts: Rollouts) -> Any:
        """What the teacher says about every rollout (all requests in flight at once)."""

    @abstractmethod
    async def train(self, rollouts: Rollouts, scores: Any, step: int) -> ObjectiveResult:
        """One optimizer step (or ``num_substeps``) on the scored rollouts."""

    async def _pipelined(self, datums: list[types.Datum], submit: Any, step: int) -> float:
        return await train_pipelined(
            self.training_client,
            datums,
            submit,
            adam_params(self.config, step),
            self.params.num_substeps,
        )


class _TopKObjective(Objective):
    async def score(self, teacher: Any, rollouts: Rollouts) -> Any:
        """Teacher top-K prompt log-probs of every teacher-forced sequence, all in flight.

        Only the completion rows are asked for (``prompt_logprobs_last_n``): the teacher prompt's
        own rows are never used, and skipping them saves the output layer on most of the sequence.
        """
        sampling = types.SamplingParams(max_tokens=1)
        requests = [
            teacher.sample(
                sequence,
                num_samples=1,
                sampling_params=sampling,
                include_prompt_logprobs=True,
                topk_prompt_logprobs=self.params.topk,
                prompt_logprobs_last_n=len(completion.tokens),
            )
            if sequence is not None
            else None
            for sequence, completion in zip(
                rollouts.teacher_sequences, rollouts.slices, strict=True
            )
        ]
        return list(await asyncio.gather(*(resolve_optional(request) for request in requests)))

    @abstractmethod
    def _datums(self, rollouts: Rollouts, scores: Any) -> tuple[list[types.Datum], dict]: ...

    @abstractmethod
    def _submit(self, batch: list[types.Datum]) -> Any: ...

    async def train(self, rollouts: Rollouts, scores: Any, step: int) -> ObjectiveResult:
        datums, kernel_metrics = self._datums(rollouts, scores)
        metrics: dict[str, Any] = dict(kernel_metrics)
        distilled = int(kernel_metrics["sdft/distilled_positions"])
        metrics["train/teacher_entropy"] = kernel_metrics["sdft/mean_teacher_entropy_distilled"]
        loss_sum = await self._pipelined(datums, self._submit, step)
        kl = self._teacher_student_kl(loss_sum, distilled, metrics["train/teacher_entropy"])
        if kl is not None:
            metrics["train/teacher_student_kl"] = kl
        return ObjectiveResult(loss_sum, distilled, metrics)

    def _teacher_student_kl(self, loss_sum: float, distilled: int, entropy: float) -> float | None:
        """KL(teacher || student) per distilled row, where the loss is a cross-entropy."""
        return None


class TopKCrossEntropy(_TopKObjective):
    """Cross-entropy towards the teacher's renormalized top-K (``cross_entropy`` with soft
    ``(N, K)`` targets from the Rust kernel)."""

    def _teacher_student_kl(self, loss_sum: float, distilled: int, entropy: float) -> float | None:
        # cross-entropy per distilled row (targets scaled by weight_scale) minus the teacher's
        # entropy over the same renormalized top-K: 0 when the student matches the teacher there
        if not distilled:
            return None
        return loss_sum / (self.params.weight_scale * distilled) - entropy

    def _datums(self, rollouts: Rollouts, scores: Any) -> tuple[list[types.Datum], dict]:
        return sdft_data.build_topk_targets(
            student_data=rollouts.student_data,
            completion_slices=rollouts.slices,
            teacher_topk_logprobs=scores,
            topk=self.params.topk,
            vocab_size=len(self.tokenizer),
            skip_first_n=self.params.skip_first_n,
            weight_scale=self.params.weight_scale,
        )

    def _submit(self, batch: list[types.Datum]) -> Any:
        return self.training_client.forward_backward(batch, "cross_entropy")


class TopKReverseKL(_TopKObjective):
    """Reverse KL over the teacher's top-K (``forward_backward_custom``)."""

    def _datums(self, rollouts: Rollouts, scores: Any) -> tuple[list[types.Datum], dict]:
        return sdft_data.build_reverse_kl_datums(
            student_data=rollouts.student_data,
            completion_slices=rollouts.slices,
            teacher_topk_logprobs=scores,
            topk=self.params.topk,
            vocab_size=len(self.tokenizer),
            skip_first_n=self.params.skip_first_n,
        )

    def _submit(self, batch: list[types.Datum]) -> Any:
        from sdft.losses import reverse_kl_custom_loss

        return self.training_client.forward_backward_custom(batch, reverse_kl_custom_loss)


class ImportanceSampling(Objective):
    """``topk: 0``: the teacher's log-prob of each sampled token against the student's."""

    async def score(self, teacher: Any, rollouts: Rollouts) -> Any:
        requests = [
            teacher.compute_logprobs(sequence) if sequence is not None else None
            for sequence in rollouts.teacher_sequences
        ]
        return list(await asyncio.gather(*(resolve_optional(request) for request in requests)))

    async def train(self, rollouts: Rollouts, scores: Any, step: int) -> ObjectiveResult:
        datums, is_metrics = sdft_data.build_importance_sampling_datums(
            student_data=rollouts.student_data,
            completion_slices=rollouts.slices,
            teacher_logprobs=scores,
            student_logprobs=rollouts.sampled_logprobs,
            skip_first_n=self.params.skip_first_n,
        )
        distilled = int(is_metrics["sdft/advantage_positions"])

        def submit(batch: list[types.Datum]) -> Any:
            return self.training_client.forward_backward(batch, "importance_sampling")

        loss_sum = await self._pipelined(datums, submit, step)
        return ObjectiveResult(loss_sum, distilled, dict(is_metrics))


class FullVocabularyKL(Objective):
    """``loss: full_kl`` (local backend): the training client runs the teacher itself and takes
    the exact KL over the whole vocabulary; one optimizer step, no substeps."""

    async def score(self, teacher: Any, rollouts: Rollouts) -> Any:
        return teacher

    async def train(self, rollouts: Rollouts, scores: Any, step: int) -> ObjectiveResult:
        skip = self.params.skip_first_n
        forward_backward = self.training_client.forward_backward_full_kl(
            rollouts.student_data,
            scores,
            rollouts.teacher_sequences,
            rollouts.slices,
            skip_first_n=skip,
        )
        optim = self.training_client.optim_step(adam_params(self.config, step))
        output = await resolve(forward_backward)
        await resolve(optim)
        metrics = {
            f"train/{key}": value for key, value in output.metrics.items() if key != "loss:sum"
        }
        distilled = sum(max(0, len(s.tokens) - skip) for s in rollouts.slices)
        return ObjectiveResult(float(output.metrics["loss:sum"]), distilled, metrics)


def objective_for(config: Config, training_client: Any, tokenizer: Any) -> Objective:
    """The objective ``algorithm.params`` selects (``loss`` and ``topk``)."""
    params = config.params
    if params.loss == "full_kl":
        return FullVocabularyKL(config, training_client, tokenizer)
    if params.topk == 0:
        return ImportanceSampling(config, training_client, tokenizer)
    if params.loss == "reverse_kl":
        return TopKReverseKL(config, training_client, tokenizer)
    return TopKCrossEntropy(config, training_client, tokenizer)
