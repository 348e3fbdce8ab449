"""The student's rollouts of one batch: the sample requests in flight, and each question's
completions turned into what the teacher and the loss need.

A :class:`SamplingRound` submits one ``sample`` request per question (all in flight at once) and
hands each question's :class:`Rollouts` over either in question order (:meth:`SamplingRound.gather`)
or as soon as that question's response arrives (:meth:`SamplingRound.as_completed`). Both give the
same rollouts for the same responses; :meth:`Rollouts.concat` of the per-question pieces in
question order equals the gathered batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tinker import types

from sdft import data as sdft_data
from sdft.clients import resolve, sampling_seed
from sdft.config import AlgorithmParams
from sdft.data import CompletionSlice


@dataclass
class Rollouts:
    """Completions with everything the teacher and the loss need, one entry per completion."""

    student_data: list[types.Datum] = field(default_factory=list)
    slices: list[CompletionSlice] = field(default_factory=list)
    teacher_sequences: list[types.ModelInput | None] = field(default_factory=list)
    sampled_logprobs: list[list[float]] = field(default_factory=list)
    completion_lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.student_data)

    @classmethod
    def concat(cls, pieces: Sequence[Rollouts]) -> Rollouts:
        """The pieces one after the other (question order in, question order out)."""
        whole = cls()
        for piece in pieces:
            whole.student_data.extend(piece.student_data)
            whole.slices.extend(piece.slices)
            whole.teacher_sequences.extend(piece.teacher_sequences)
            whole.sampled_logprobs.extend(piece.sampled_logprobs)
            whole.completion_lengths.extend(piece.completion_lengths)
        return whole


@dataclass(frozen=True)
class QuestionPrompts:
    """The student prompt (what the student is trained on) and the teacher prompt (question plus
    golden answer as a demonstration) of one question."""

    student: types.ModelInput
    teacher: types.ModelInput


def system_prompt_of(example: Any, params: AlgorithmParams) -> str | None:
    """A data row's own system prompt, else the config's."""
    return example.system_prompt if example.system_prompt is not None else params.system_prompt


def student_prompt(
    question: str, system: str | None, params: AlgorithmParams, tokenizer: Any
) -> types.ModelInput:
    """The student prompt of ``question`` under ``system``, rendered as training renders it."""
    return sdft_data.build_student_prompt(
        question=question,
        tokenizer=tokenizer,
        user_template=params.user_template,
        system_prompt=system,
        enable_thinking=params.enable_thinking,
    )


def teacher_prompt(
    question: str, answer: str, system: str | None, params: AlgorithmParams, tokenizer: Any
) -> types.ModelInput:
    """The teacher prompt of ``question`` with ``answer`` as the demonstration."""
    return sdft_data.build_teacher_prompt(
        question=question,
        golden_answer=answer,
        tokenizer=tokenizer,
        system_prompt=system,
        demo_template=params.demo_template,
        enable_thinking=params.enable_thinking,
    )


def student_prompt_of(example: Any, params: AlgorithmParams, tokenizer: Any) -> types.ModelInput:
    """The student prompt of a training example, rendered as training renders it."""
    return student_prompt(example.question, system_prompt_of(example, params), params, tokenizer)


def teacher_prompt_of(example: Any, params: AlgorithmParams, tokenizer: Any) -> types.ModelInput:
    """The teacher prompt of a training example (its golden answer as the demonstration)."""
    system = system_prompt_of(example, params)
    return teacher_prompt(example.question, example.golden_answer, system, params, tokenizer)


def question_prompts(example: Any, params: AlgorithmParams, tokenizer: Any) -> QuestionPrompts:
    """Both prompts of a training example (``question``, ``golden_answer``, ``system_prompt``)."""
    return QuestionPrompts(
        student=student_prompt_of(example, params, tokenizer),
        teacher=teacher_prompt_of(example, params, tokenizer),
    )


def question_rollouts(
    response: Any, prompts: QuestionPrompts, *, max_context_length: int
) -> Rollouts:
    """One question's sampled sequences as rollouts (empty completions are dropped)."""
    rollouts = Rollouts()
    teacher_prompt = prompts.teacher
    for sequence in response.sequences:
        tokens = list(sequence.tokens)
        if not tokens:
            continue
        datum = sdft_data.student_datum_from_rollout(
            prompt=prompts.student, completion_tokens=tokens
        )
        completion = sdft_data.extract_completion_tokens(
            datum, teacher_prompt.length, max_context_length=max_context_length
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


class SamplingRound:
    """The sample requests of one batch, submitted at construction, one per question.

    ``sampler`` is the sampling client the requests went to; ``step`` the training step they are
    for (the seeds derive from it)."""

    def __init__(
        self,
        sampler: Any,
        prompts: Sequence[QuestionPrompts],
        *,
        params: AlgorithmParams,
        seed: int,
        step: int,
        stop: list[int] | None,
    ) -> None:
        self.sampler = sampler
        self.prompts = list(prompts)
        self.step = step
        self.max_context_length = params.max_context_length
        self.requests = [
            sampler.sample(
                question.teacher if params.generate_from_teacher else question.student,
                num_samples=params.group_size,
                sampling_params=types.SamplingParams(
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    seed=sampling_seed(seed, step, index),
                    stop=stop,
                ),
            )
            for index, question in enumerate(self.prompts)
        ]
        self._tasks: list[asyncio.Task[Any]] | None = None

    def _started(self) -> list[asyncio.Task[Any]]:
        """One task per request, so the responses are collected while the caller does other work
        (created once; :meth:`gather` and :meth:`as_completed` share them)."""
        if self._tasks is None:
            self._tasks = [asyncio.ensure_future(resolve(request)) for request in self.requests]
        return self._tasks

    def start(self) -> SamplingRound:
        """Begin collecting the responses now (the overlap of the next batch's sampling)."""
        self._started()
        return self

    def cancel(self) -> None:
        for task in self._tasks or []:
            task.cancel()

    def _rollouts(self, index: int, response: Any) -> Rollouts:
        return question_rollouts(
            response, self.prompts[index], max_context_length=self.max_context_length
        )

    async def gather(self) -> Rollouts:
        """Every question's rollouts, in question order, once all responses are in."""
        responses = await asyncio.gather(*self._started())
        return Rollouts.concat(
            [self._rollouts(index, response) for index, response in enumerate(responses)]
        )

    async def as_completed(self) -> AsyncIterator[tuple[int, Rollouts]]:
        """``(question index, its rollouts)`` as each response arrives."""
        tasks = self._started()
        index_of = {task: index for index, task in enumerate(tasks)}
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=index_of.__getitem__):
                index = index_of[task]
                yield index, self._rollouts(index, task.result())
