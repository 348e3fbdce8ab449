"""One object per SDFT loss: how the teacher scores the student's rollouts and how the student
trains on those scores.

- :class:`TopKCrossEntropy` (``loss: cross_entropy``, ``topk > 0``): forward KL towards the
  teacher's renormalized top-K (the paper's and the cookbook's default);
- :class:`TopKReverseKL` (``loss: reverse_kl``): reverse KL over the teacher's top-K, a custom loss;
- :class:`ImportanceSampling` (``topk: 0``): advantage = teacher log-prob − sampled log-prob;
- :class:`FullVocabularyKL` (``loss: full_kl``, local backend): exact full-vocabulary KL, the
  teacher runs inside the training client's forward-backward.

An objective scores rollouts (:meth:`Objective.score`), builds their datums (:meth:`Objective.build`,
any subset of a batch: the streamed step builds one question at a time and
:meth:`Objective.combine` joins the pieces into exactly what building the whole batch gives) and
submits ``forward_backward`` (:meth:`Objective.forward_backward`). Every objective returns the
summed loss, the number of distilled positions and its own metrics; the trainer adds the metrics
every step shares.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from tinker import types

from sdft import data as sdft_data
from sdft.clients import resolve, resolve_optional
from sdft.config import Config
from sdft.optimizer import StreamedTraining, adam_params, train_pipelined
from sdft.rollouts import Rollouts

# The denominator of a mean metric that is not itself a metric: the pieces' completion tokens.
COMPLETION_TOKENS = "completion tokens"


@dataclass
class ObjectiveResult:
    loss_sum: float
    distilled: int
    metrics: dict[str, Any]


@dataclass
class Built:
    """The datums of some rollouts, their metrics, and their completion-token count (the weight
    of the metrics that are means over completion positions)."""

    datums: list[types.Datum]
    metrics: dict[str, float]
    completion_tokens: int


def merge_metrics(
    pieces: Sequence[Built], means: Mapping[str, str], constants: frozenset[str]
) -> dict[str, float]:
    """The metrics of the pieces taken together: counts add up; a mean is re-weighted by its
    denominator (a count among the metrics, or :data:`COMPLETION_TOKENS`) and is 0.0 when that is
    0; a constant is taken from the first piece. A key missing from a piece counts as absent
    there (the kernel leaves out means whose denominator is 0)."""
    merged: dict[str, float] = {}
    keys = list(dict.fromkeys(key for piece in pieces for key in piece.metrics))
    for key in keys:
        present = [piece for piece in pieces if key in piece.metrics]
        if key in constants:
            merged[key] = present[0].metrics[key]
        elif key in means:
            denominator = means[key]

            def weight(piece: Built, denominator: str = denominator) -> float:
                if denominator == COMPLETION_TOKENS:
                    return float(piece.completion_tokens)
                return float(piece.metrics.get(denominator, 0.0))

            total = sum(weight(piece) for piece in present)
            numerator = sum(piece.metrics[key] * weight(piece) for piece in present)
            merged[key] = numerator / total if total else 0.0
        else:
            merged[key] = float(sum(piece.metrics[key] for piece in present))
    return merged


def weighted_positions(datums: Sequence[types.Datum]) -> int:
    """Positions that carry a training signal: rows of ``weights`` with any non-zero entry."""
    total = 0
    for datum in datums:
        weights = datum.loss_fn_inputs["weights"].to_numpy()
        rows = weights.reshape(weights.shape[0], -1)
        total += int(np.count_nonzero(np.any(rows != 0, axis=1)))
    return total


class Objective(ABC):
    """Scores rollouts with the teacher, then trains the student on the scores."""

    def __init__(self, config: Config, training_client: Any, tokenizer: Any) -> None:
        self.config = config
        self.params = config.params
        self.training_client = training_client
        self.tokenizer = tokenizer

    @abstractmethod
    async def score(self, teacher: Any, rollouts: Rollouts) -> Any:
        """What the teacher says about the rollouts (all requests in flight at once)."""

    @abstractmethod
    async def train(self, rollouts: Rollouts, scores: Any, step: int) -> ObjectiveResult:
        """One optimizer step (or ``num_substeps``) on the scored rollouts."""


class DatumObjective(Objective):
    """An objective whose teacher scores each rollout on its own and whose loss trains on
    datums: the step may score, build and submit it question by question (sdft.schedules)."""

    # merge_metrics: mean metric -> its denominator, and the metrics that are constants.
    mean_metrics: ClassVar[Mapping[str, str]] = {}
    constant_metrics: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    async def score(self, teacher: Any, rollouts: Rollouts) -> list[Any]:
        """One teacher answer per rollout."""

    @abstractmethod
    def build(self, rollouts: Rollouts, scores: Sequence[Any]) -> Built:
        """The datums of the scored rollouts and their metrics."""

    @abstractmethod
    def forward_backward(self, datums: list[types.Datum]) -> Any:
        """Submit one ``forward_backward`` of this objective's loss on ``datums``."""

    @abstractmethod
    def result(self, built: Built, loss_sum: float) -> ObjectiveResult:
        """The step's outcome once the loss of ``built`` is known."""

    def combine(self, pieces: Sequence[Built]) -> Built:
        """Pieces built separately (in batch order) as if built at once."""
        return Built(
            datums=[datum for piece in pieces for datum in piece.datums],
            metrics=merge_metrics(pieces, self.mean_metrics, self.constant_metrics),
            completion_tokens=sum(piece.completion_tokens for piece in pieces),
        )

    def streamed_training(self, step: int) -> StreamedTraining:
        """The substeps of ``step``, submitted as their datums are built."""
        return StreamedTraining(
            self.training_client,
            self.forward_backward,
            adam_params(self.config, step),
            self.params.num_substeps,
        )

    async def train(self, rollouts: Rollouts, scores: Any, step: int) -> ObjectiveResult:
        """Build the whole batch at once, then train it."""
        built = self.build(rollouts, scores)
        loss_sum = await train_pipelined(
            self.training_client,
            built.datums,
            self.forward_backward,
            adam_params(self.config, step),
            self.params.num_substeps,
        )
        return self.result(built, loss_sum)


class _TopKObjective(DatumObjective):
    mean_metrics: ClassVar[Mapping[str, str]] = {
        "sdft/mean_teacher_entropy": "sdft/total_completion_tokens",
        "sdft/mean_teacher_entropy_distilled": "sdft/distilled_positions",
    }
    constant_metrics: ClassVar[frozenset[str]] = frozenset({"sdft/topk"})

    async def score(self, teacher: Any, rollouts: Rollouts) -> list[Any]:
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

    def build(self, rollouts: Rollouts, scores: Sequence[Any]) -> Built:
        datums, metrics = self._datums(rollouts, scores)
        return Built(datums, metrics, sum(rollouts.completion_lengths))

    def result(self, built: Built, loss_sum: float) -> ObjectiveResult:
        metrics: dict[str, Any] = dict(built.metrics)
        distilled = int(built.metrics["sdft/distilled_positions"])
        metrics["train/teacher_entropy"] = built.metrics["sdft/mean_teacher_entropy_distilled"]
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

    def forward_backward(self, datums: list[types.Datum]) -> Any:
        return self.training_client.forward_backward(datums, "cross_entropy")


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

    def forward_backward(self, datums: list[types.Datum]) -> Any:
        from sdft.losses import reverse_kl_custom_loss

        return self.training_client.forward_backward_custom(datums, reverse_kl_custom_loss)


class ImportanceSampling(DatumObjective):
    """``topk: 0``: the teacher's log-prob of each sampled token against the student's."""

    # The kernel's divisor for these means is the mask sum: every completion token.
    mean_metrics: ClassVar[Mapping[str, str]] = {
        "sdft/mean_advantage": COMPLETION_TOKENS,
        "sdft/mean_teacher_lp": COMPLETION_TOKENS,
        "sdft/mean_student_lp": COMPLETION_TOKENS,
    }

    async def score(self, teacher: Any, rollouts: Rollouts) -> list[Any]:
        requests = [
            teacher.compute_logprobs(sequence) if sequence is not None else None
            for sequence in rollouts.teacher_sequences
        ]
        return list(await asyncio.gather(*(resolve_optional(request) for request in requests)))

    def build(self, rollouts: Rollouts, scores: Sequence[Any]) -> Built:
        datums, metrics = sdft_data.build_importance_sampling_datums(
            student_data=rollouts.student_data,
            completion_slices=rollouts.slices,
            teacher_logprobs=scores,
            student_logprobs=rollouts.sampled_logprobs,
            skip_first_n=self.params.skip_first_n,
        )
        return Built(datums, metrics, sum(rollouts.completion_lengths))

    def forward_backward(self, datums: list[types.Datum]) -> Any:
        return self.training_client.forward_backward(datums, "importance_sampling")

    def result(self, built: Built, loss_sum: float) -> ObjectiveResult:
        distilled = int(built.metrics["sdft/advantage_positions"])
        return ObjectiveResult(loss_sum, distilled, dict(built.metrics))


class FullVocabularyKL(Objective):
    """``loss: full_kl`` (local backend): the training client runs the teacher itself and takes
    the exact KL over the whole vocabulary; one optimizer step, no substeps. There are no teacher
    requests to stream: the step is always gathered."""

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
