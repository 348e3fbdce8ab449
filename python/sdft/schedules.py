"""How the requests of one SDFT step are scheduled.

Over the wire, latency and not compute dominates a step; the schedule decides what waits for what.

- :class:`GatheredSchedule` (``streaming: false``): phase by phase for the whole batch: every
  sample, then every teacher score, then the datums and training; the sampler refresh waits for
  the training results (the loop before streaming).
- :class:`StreamedSchedule` (``streaming: true``, the default): a question's teacher scoring is
  sent as soon as its rollouts arrive, its datums are built as soon as its scores arrive, each
  substep's ``forward_backward`` + ``optim_step`` is submitted as soon as its datums are built, and
  the sampler refresh is submitted right behind the last ``optim_step`` (a training client runs its
  requests in submission order, so it saves the trained weights).

Both send the same requests with the same contents: the same teacher sequences, the same datums
in the same batch order, the same substep chunks, so the results are the same; only the moments
at which requests leave differ. The objectives without per-rollout teacher requests
(``full_kl``) are always gathered.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdft.objectives import Built, DatumObjective, Objective, ObjectiveResult
from sdft.rollouts import Rollouts, SamplingRound


def _nothing() -> None:
    return None


@dataclass
class StepHooks:
    """Moments a schedule reports to the trainer.

    ``sampled``: every sample of the step is in (the next batch may be sampled now);
    ``training_submitted``: the step's last ``optim_step`` is submitted (the sampler refresh may
    be submitted behind it)."""

    sampled: Callable[[], None] = field(default=_nothing)
    training_submitted: Callable[[], None] = field(default=_nothing)


@dataclass
class StepOutcome:
    """The step's rollouts and training result; the seconds from the step's start at which the
    last sample arrived, the last teacher score arrived and the training finished."""

    rollouts: Rollouts
    result: ObjectiveResult
    sampled_s: float
    scored_s: float
    trained_s: float


def no_completions(step: int) -> RuntimeError:
    return RuntimeError(f"step {step}: the student produced no completion tokens")


class StepSchedule(ABC):
    @abstractmethod
    async def run(
        self,
        sampling: SamplingRound,
        teacher: Any,
        objective: Objective,
        step: int,
        hooks: StepHooks,
    ) -> StepOutcome:
        """Sample (``sampling`` is already in flight), score, build and train one step."""


class GatheredSchedule(StepSchedule):
    async def run(
        self,
        sampling: SamplingRound,
        teacher: Any,
        objective: Objective,
        step: int,
        hooks: StepHooks,
    ) -> StepOutcome:
        started = time.perf_counter()
        rollouts = await sampling.gather()
        if not len(rollouts):
            raise no_completions(step)
        sampled = time.perf_counter()
        hooks.sampled()
        scores = await objective.score(teacher, rollouts)
        scored = time.perf_counter()
        result = await objective.train(rollouts, scores, step)
        trained = time.perf_counter()
        return StepOutcome(rollouts, result, sampled - started, scored - started, trained - started)


class StreamedSchedule(StepSchedule):
    async def run(
        self,
        sampling: SamplingRound,
        teacher: Any,
        objective: Objective,
        step: int,
        hooks: StepHooks,
    ) -> StepOutcome:
        if not isinstance(objective, DatumObjective):
            return await GatheredSchedule().run(sampling, teacher, objective, step, hooks)
        return await _StreamedStep(sampling, teacher, objective, step, hooks).run()


class _StreamedStep:
    """The state of one streamed step (see :class:`StreamedSchedule`)."""

    def __init__(
        self,
        sampling: SamplingRound,
        teacher: Any,
        objective: DatumObjective,
        step: int,
        hooks: StepHooks,
    ) -> None:
        self.sampling = sampling
        self.teacher = teacher
        self.objective = objective
        self.step = step
        self.hooks = hooks
        self.questions = len(sampling.prompts)
        self.pieces: dict[int, Rollouts] = {}
        self.built: dict[int, Built | None] = {}
        self.training = objective.streamed_training(step)
        self.next_question = 0
        self.training_announced = False

    async def _score_and_build(self, index: int, piece: Rollouts) -> None:
        scores = await self.objective.score(self.teacher, piece)
        self.built[index] = self.objective.build(piece, scores)
        self._advance()

    def _advance(self) -> None:
        """Hand the built questions to the training in question order (a later question waits
        for the earlier ones, so the batch order is the gathered one)."""
        while self.next_question in self.built:
            built = self.built[self.next_question]
            if built is not None:
                self.training.add(built.datums)
            self.next_question += 1
        if self.training.complete and not self.training_announced:
            self.training_announced = True
            self.hooks.training_submitted()

    async def run(self) -> StepOutcome:
        started = time.perf_counter()
        scoring: list[asyncio.Task[None]] = []
        try:
            async for index, piece in self.sampling.as_completed():
                self.pieces[index] = piece
                if len(piece):
                    scoring.append(asyncio.ensure_future(self._score_and_build(index, piece)))
                else:
                    self.built[index] = None
            total = sum(len(piece) for piece in self.pieces.values())
            if not total:
                raise no_completions(self.step)
            sampled = time.perf_counter()
            self.hooks.sampled()
            self.training.expect(total)
            self._advance()
            await asyncio.gather(*scoring)
            scored = time.perf_counter()
        except BaseException:
            self.sampling.cancel()
            for task in scoring:
                task.cancel()
            raise
        loss_sum = await self.training.loss_sum()
        trained = time.perf_counter()
        order = range(self.questions)
        rollouts = Rollouts.concat([self.pieces[index] for index in order])
        built = self.objective.combine(
            [built for index in order if (built := self.built[index]) is not None]
        )
        return StepOutcome(
            rollouts,
            self.objective.result(built, loss_sum),
            sampled - started,
            scored - started,
            trained - started,
        )


def schedule_for(streaming: bool) -> StepSchedule:
    """The schedule ``algorithm.params.streaming`` selects."""
    return StreamedSchedule() if streaming else GatheredSchedule()
