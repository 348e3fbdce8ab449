"""Does the teacher know more than the student? Measured on a sample of training examples.

SDFT only helps when the teacher — the model shown the golden answer as a demonstration — is a
better model of the answer than the student. On a sample of training examples this reports:

- ``student_nll`` / ``teacher_nll``: the golden answer's mean per-token negative log-likelihood
  after the student prompt and after the teacher prompt (token-weighted over the sample);
- ``teacher_student_kl``: the mean KL(teacher || student) per distilled position over the teacher's
  renormalized top-K, on the student's own rollouts (what SDFT's loss minimizes: the student's
  cross-entropy against the top-K targets minus the teacher's entropy over them); it needs a
  training client's ``forward`` (the student's log-probs of the teacher's top-K ids);
- with a ``verifier`` (a registered ``fn_name`` that accepts the golden answer as ``expected``,
  e.g. ``tooluse``): the greedy pass@1 of the student prompt and of the teacher prompt.

``warnings`` says, with the numbers, when the teacher is not clearly better.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tinker import types

from sdft import data as sdft_data
from sdft.config import AlgorithmParams, Config
from sdft.datasets import SDFTExample, epoch_permutation
from sdft.rollouts import student_prompt_of, teacher_prompt_of

# The teacher counts as clearly better when its prompt cuts the answer's NLL by at least this much.
NLL_MARGIN = 0.10
# Below this KL per position the teacher and the student nearly agree: little to distill.
MIN_KL = 0.01


@dataclass
class TeacherCheck:
    examples: int
    answer_tokens: int
    student_nll: float
    teacher_nll: float
    teacher_student_kl: float | None = None
    distilled_positions: int = 0
    student_pass: float | None = None
    teacher_pass: float | None = None
    verifier: str | None = None
    warnings: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {
            "teacher_check/examples": float(self.examples),
            "teacher_check/answer_tokens": float(self.answer_tokens),
            "teacher_check/student_nll": self.student_nll,
            "teacher_check/teacher_nll": self.teacher_nll,
        }
        if self.teacher_student_kl is not None:
            out["teacher_check/teacher_student_kl"] = self.teacher_student_kl
            out["teacher_check/distilled_positions"] = float(self.distilled_positions)
        if self.student_pass is not None and self.teacher_pass is not None:
            out["teacher_check/student_pass@1"] = self.student_pass
            out["teacher_check/teacher_pass@1"] = self.teacher_pass
        return out

    def summary_line(self) -> str:
        parts = [
            f"{self.examples} examples: golden-answer NLL/token {self.student_nll:.3f} under the "
            f"student prompt, {self.teacher_nll:.3f} under the teacher prompt"
        ]
        if self.teacher_student_kl is not None:
            parts.append(
                f"KL(teacher || student) {self.teacher_student_kl:.4f}/position over "
                f"{self.distilled_positions} rollout positions"
            )
        if self.student_pass is not None and self.teacher_pass is not None:
            parts.append(
                f"pass@1 ({self.verifier}) student {self.student_pass:.2f}, teacher "
                f"{self.teacher_pass:.2f}"
            )
        return "; ".join(parts)

    def markdown(self) -> str:
        lines = ["## Teacher check (step 0)", "", f"- {self.summary_line()}"]
        lines += [f"- warning: {warning}" for warning in self.warnings] or [
            "- the teacher is clearly better than the student"
        ]
        return "\n".join(lines) + "\n"


def check_from_metrics(metrics: dict[str, Any]) -> TeacherCheck | None:
    """The check logged as a ``teacher_check`` metrics row (``TeacherCheck.metrics()`` plus
    ``teacher_check/examples``), with its warnings recomputed; ``None`` when incomplete."""
    try:
        check = TeacherCheck(
            examples=int(metrics["teacher_check/examples"]),
            answer_tokens=int(metrics.get("teacher_check/answer_tokens", 0)),
            student_nll=float(metrics["teacher_check/student_nll"]),
            teacher_nll=float(metrics["teacher_check/teacher_nll"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    kl = metrics.get("teacher_check/teacher_student_kl")
    if isinstance(kl, int | float):
        check.teacher_student_kl = float(kl)
        check.distilled_positions = int(metrics.get("teacher_check/distilled_positions", 0))
    student, teacher = (
        metrics.get("teacher_check/student_pass@1"),
        metrics.get("teacher_check/teacher_pass@1"),
    )
    if isinstance(student, int | float) and isinstance(teacher, int | float):
        check.student_pass, check.teacher_pass = float(student), float(teacher)
        check.verifier = "the verifier"
    check.warnings = _warnings(check)
    return check


def _warnings(check: TeacherCheck) -> list[str]:
    out = []
    if not check.teacher_nll < (1.0 - NLL_MARGIN) * check.student_nll:
        out.append(
            f"the teacher prompt does not make the golden answer clearly more likely (NLL/token "
            f"{check.teacher_nll:.3f} vs {check.student_nll:.3f} under the student prompt; needs "
            f"a {NLL_MARGIN:.0%} cut): the teacher barely uses the demonstration"
        )
    if check.teacher_student_kl is not None and check.teacher_student_kl < MIN_KL:
        out.append(
            f"teacher and student nearly agree on the student's rollouts (KL "
            f"{check.teacher_student_kl:.4f} per position < {MIN_KL}): there is little to distill"
        )
    if (
        check.student_pass is not None
        and check.teacher_pass is not None
        and not check.teacher_pass > check.student_pass
    ):
        out.append(
            f"the teacher does not answer better than the student (pass@1 {check.teacher_pass:.2f} "
            f"vs {check.student_pass:.2f} with {check.verifier})"
        )
    return out


async def _resolve(value: Any) -> Any:
    if hasattr(value, "result_async"):
        return await value.result_async()
    if inspect.isawaitable(value):
        return await value
    return value


def sample_examples(
    examples: Sequence[SDFTExample], count: int, seed: int = 0
) -> list[SDFTExample]:
    """A deterministic sample of ``count`` examples (the first of a seeded permutation)."""
    order = epoch_permutation(len(examples), seed, 0)
    return [examples[index] for index in order[:count]]


async def check_teacher(
    examples: Sequence[SDFTExample],
    *,
    params: AlgorithmParams,
    tokenizer: Any,
    student: Any,
    teacher: Any,
    training_client: Any = None,
    verifier: str | None = None,
    seed: int = 0,
) -> TeacherCheck:
    """Measure the teacher against the student on ``examples`` (see the module doc).

    ``student`` and ``teacher`` are sampling clients (usually the same base weights with the two
    prompts); ``training_client`` holds the student's weights (for the KL; ``None`` skips it)."""
    if not examples:
        raise ValueError("the teacher check needs at least one example")
    checker = None
    if verifier is not None:
        from sdft.evals import get_verifier

        checker = get_verifier(verifier).fn

    student_prompts = [student_prompt_of(e, params, tokenizer) for e in examples]
    teacher_prompts = [teacher_prompt_of(e, params, tokenizer) for e in examples]
    answers = [list(tokenizer.encode(e.golden_answer, add_special_tokens=False)) for e in examples]

    async def answer_nll(client: Any, prompts: list[types.ModelInput]) -> tuple[float, int]:
        requests = [
            client.compute_logprobs(
                types.ModelInput.from_ints(prompt.to_ints() + answer),
                prompt_logprobs_last_n=len(answer),
            )
            for prompt, answer in zip(prompts, answers, strict=True)
            if answer
        ]
        results = await asyncio.gather(*(_resolve(r) for r in requests))
        total, count = 0.0, 0
        for logprobs, answer in zip(results, [a for a in answers if a], strict=True):
            for value in logprobs[-len(answer) :]:
                if value is None or not math.isfinite(value):
                    raise RuntimeError(
                        "teacher check: a golden-answer token has no finite log-prob"
                    )
                total -= float(value)
                count += 1
        if count == 0:
            raise ValueError("teacher check: every sampled golden answer is empty")
        return total / count, count

    (student_nll, count), (teacher_nll, _) = await asyncio.gather(
        answer_nll(student, student_prompts), answer_nll(teacher, teacher_prompts)
    )
    check = TeacherCheck(
        examples=len(examples),
        answer_tokens=count,
        student_nll=student_nll,
        teacher_nll=teacher_nll,
        verifier=verifier,
    )

    eos = getattr(tokenizer, "eos_token_id", None)
    stop = [int(eos)] if isinstance(eos, int) else None
    if training_client is not None:
        await _measure_kl(
            check, params, tokenizer, student, teacher, training_client,
            student_prompts, teacher_prompts, stop, seed,
        )  # fmt: skip
    if checker is not None:
        greedy = types.SamplingParams(max_tokens=params.max_tokens, temperature=0.0, stop=stop)
        student_out, teacher_out = await asyncio.gather(
            asyncio.gather(*(_resolve(student.sample(p, 1, greedy)) for p in student_prompts)),
            asyncio.gather(*(_resolve(teacher.sample(p, 1, greedy)) for p in teacher_prompts)),
        )

        def rate(responses: Sequence[Any]) -> float:
            correct = 0
            for example, response in zip(examples, responses, strict=True):
                text = tokenizer.decode(
                    list(response.sequences[0].tokens), skip_special_tokens=True
                )
                correct += bool(checker(text, example.golden_answer))
            return correct / len(examples)

        check.student_pass = rate(student_out)
        check.teacher_pass = rate(teacher_out)
    check.warnings = _warnings(check)
    return check


async def _measure_kl(
    check: TeacherCheck,
    params: AlgorithmParams,
    tokenizer: Any,
    student: Any,
    teacher: Any,
    training_client: Any,
    student_prompts: list[types.ModelInput],
    teacher_prompts: list[types.ModelInput],
    stop: list[int] | None,
    seed: int,
) -> None:
    topk = params.topk or 20
    rollouts = await asyncio.gather(
        *(
            _resolve(
                student.sample(
                    prompt,
                    1,
                    types.SamplingParams(
                        max_tokens=params.max_tokens,
                        temperature=params.temperature,
                        seed=seed * 1009 + index,
                        stop=stop,
                    ),
                )
            )
            for index, prompt in enumerate(student_prompts)
        )
    )
    data, slices, sequences = [], [], []
    for prompt, teacher_prompt, response in zip(
        student_prompts, teacher_prompts, rollouts, strict=True
    ):
        tokens = list(response.sequences[0].tokens)
        if len(tokens) <= params.skip_first_n:
            continue
        datum = sdft_data.student_datum_from_rollout(prompt=prompt, completion_tokens=tokens)
        piece = sdft_data.extract_completion_tokens(
            datum, teacher_prompt.length, max_context_length=params.max_context_length
        )
        if len(piece.tokens) == 0:
            continue
        data.append(datum)
        slices.append(piece)
        sequences.append(sdft_data.build_teacher_forced_sequence(teacher_prompt, piece.tokens))
    if not data:
        return
    scored = await asyncio.gather(
        *(
            _resolve(
                teacher.sample(
                    sequence,
                    1,
                    types.SamplingParams(max_tokens=1),
                    include_prompt_logprobs=True,
                    topk_prompt_logprobs=topk,
                    prompt_logprobs_last_n=len(piece.tokens),
                )
            )
            for sequence, piece in zip(sequences, slices, strict=True)
        )
    )
    datums, metrics = sdft_data.build_topk_targets(
        student_data=data,
        completion_slices=slices,
        teacher_topk_logprobs=list(scored),
        topk=topk,
        vocab_size=len(tokenizer),
        skip_first_n=params.skip_first_n,
    )
    positions = int(metrics["sdft/distilled_positions"])
    if positions == 0:
        return
    output = await _resolve(
        training_client.forward([sdft_data.strip_mask(d) for d in datums], "cross_entropy")
    )
    cross_entropy = float(output.metrics["loss:sum"]) / positions
    check.teacher_student_kl = cross_entropy - float(metrics["sdft/mean_teacher_entropy_distilled"])
    check.distilled_positions = positions


async def check_base_model(
    service: Any,
    config: Config,
    examples: Sequence[SDFTExample],
    *,
    verifier: str | None = None,
    count: int = 8,
    params: AlgorithmParams | None = None,
) -> TeacherCheck:
    """The check of ``config``'s base model before training (``sdft validate --deep``): a fresh
    training client (LoRA starts at the base weights; full fine-tuning copies them) is the
    student, the base model with the teacher prompt is the teacher."""
    from sdft.clients import resolve

    name = config.model.name
    teacher = await resolve(service.create_sampling_client(base_model=name))
    run = params or config.params
    if run.full_finetune:
        training = await resolve(service.create_full_training_client(name, seed=config.seed))
    else:
        training = await resolve(
            service.create_lora_training_client(name, rank=run.lora_rank, seed=config.seed)
        )
    student = await resolve(training.save_weights_and_get_sampling_client())
    return await check_teacher(
        sample_examples(examples, count, config.seed),
        params=run,
        tokenizer=training.get_tokenizer(),
        student=student,
        teacher=teacher,
        training_client=training,
        verifier=verifier,
        seed=config.seed,
    )


def validation_rows(config: Config, count: int) -> list[tuple[str, str, str]]:
    """``sdft validate CONFIG --teacher-check N``: the check of the base model as
    ``(name, status, detail)`` rows (status ``warn`` with each warning); local backend only.
    Checkpoints of the throw-away training client go to a temporary folder."""
    import tempfile

    if config.algorithm.kind != "sdft":
        return [("teacher check", "skip", "algorithm.kind sft has no teacher")]
    if config.backend.kind != "local":
        return [("teacher check", "skip", "needs the Tinker service; see summary.md at step 0")]
    from sdft.backends.local import LocalServiceClient
    from sdft.datasets import load_examples

    data = config.data
    examples = load_examples(
        data.path, source_kind=data.source_kind, fields=data.fields, split=data.split
    )
    with tempfile.TemporaryDirectory(prefix="sdft-teacher-check-") as root:
        service = LocalServiceClient(
            checkpoint_root=root, device=config.backend.device, dtype=config.backend.dtype
        )
        try:
            check = asyncio.run(check_base_model(service, config, examples, count=count))
        finally:
            service.close()
    rows = [("teacher check", "warn" if check.warnings else "ok", check.summary_line())]
    return rows + [("teacher check", "warn", warning) for warning in check.warnings]


__all__ = [
    "MIN_KL",
    "NLL_MARGIN",
    "TeacherCheck",
    "check_base_model",
    "check_from_metrics",
    "check_teacher",
    "sample_examples",
    "validation_rows",
]
