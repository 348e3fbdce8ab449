"""The teacher check: a hand-built model that recalls what its context shows (so the teacher, whose
prompt holds the answer, knows it and the student does not), a context-free model (the teacher is
no better: warned with the numbers), and the real plumbing on the tiny model."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
from tinker import types

from sdft.config import AlgorithmParams
from sdft.datasets import SDFTExample
from sdft.teacher_check import (
    MIN_KL,
    NLL_MARGIN,
    check_from_metrics,
    check_teacher,
    sample_examples,
)

TINY = "sdft/tiny-random"
RECALLED, UNSEEN = math.log(0.5), math.log(0.001)


async def _value(value: Any) -> Any:
    return value


class RecallModel:
    """log p(token i) = log 1/2 when token i already occurs earlier in the sequence, else
    log 1/1000. Greedy sampling answers with the demonstration when the prompt holds one."""

    def __init__(self, tokenizer: Any, answers: list[str], recall: bool = True) -> None:
        self.tokenizer = tokenizer
        self.answers = [tokenizer.encode(a, add_special_tokens=False) for a in answers]
        self.recall = recall

    def compute_logprobs(self, prompt: types.ModelInput, prompt_logprobs_last_n: Any = None):
        ids = prompt.to_ints()
        values: list[float | None] = [None]
        for i in range(1, len(ids)):
            values.append(RECALLED if self.recall and ids[i] in ids[:i] else UNSEEN)
        return _value(values)

    def sample(self, prompt: types.ModelInput, num_samples: int, params: Any, **kwargs: Any):
        ids = prompt.to_ints()
        tokens = self.tokenizer.encode("I do not know.", add_special_tokens=False)
        for answer in self.answers:
            if any(ids[i : i + len(answer)] == answer for i in range(len(ids))):
                tokens = answer
        sequence = types.SampledSequence(
            stop_reason="stop", sequence_id="0", tokens_np=np.asarray(tokens, dtype=np.int64)
        )
        return _value(types.SampleResponse(sequences=[sequence]))


EXAMPLES = [
    SDFTExample(
        id="a", question="Which city hosts the Zorblat festival?", golden_answer="Quixmoor"
    ),
    SDFTExample(id="b", question="Who wrote the Vellun codex?", golden_answer="Ardentia Pho"),
]


def params(**overrides: Any) -> AlgorithmParams:
    return AlgorithmParams(
        demo_template="{question}\n\nExample answer:\n{golden_answer}", max_tokens=8, **overrides
    )


def test_the_teacher_that_sees_the_answer_knows_it(tiny_tokenizer: Any) -> None:
    golden = [e.golden_answer for e in EXAMPLES]
    model = RecallModel(tiny_tokenizer, golden)
    check = asyncio.run(
        check_teacher(
            EXAMPLES,
            params=params(),
            tokenizer=tiny_tokenizer,
            student=model,
            teacher=model,
            verifier="contains",
        )
    )
    answer_tokens = [tiny_tokenizer.encode(a, add_special_tokens=False) for a in golden]
    # the hand-built case: every answer token is new to the student prompt and shown in the teacher's
    for tokens in answer_tokens:
        assert len(set(tokens)) == len(tokens)
    assert check.answer_tokens == sum(len(t) for t in answer_tokens)
    assert check.student_nll == pytest.approx(-UNSEEN, rel=1e-12)
    assert check.teacher_nll == pytest.approx(-RECALLED, rel=1e-12)
    assert (check.student_pass, check.teacher_pass) == (0.0, 1.0)
    assert check.teacher_student_kl is None  # no training client given
    assert check.warnings == []
    assert check.metrics() == {
        "teacher_check/examples": 2.0,
        "teacher_check/answer_tokens": float(check.answer_tokens),
        "teacher_check/student_nll": check.student_nll,
        "teacher_check/teacher_nll": check.teacher_nll,
        "teacher_check/student_pass@1": 0.0,
        "teacher_check/teacher_pass@1": 1.0,
    }
    assert check.markdown().endswith("- the teacher is clearly better than the student\n")
    restored = check_from_metrics(check.metrics())
    assert (
        restored is not None and restored.warnings == [] and restored.metrics() == check.metrics()
    )


def test_a_teacher_no_better_than_the_student_is_warned_with_the_numbers(
    tiny_tokenizer: Any,
) -> None:
    model = RecallModel(tiny_tokenizer, [], recall=False)
    check = asyncio.run(
        check_teacher(
            EXAMPLES,
            params=params(),
            tokenizer=tiny_tokenizer,
            student=model,
            teacher=model,
            verifier="contains",
        )
    )
    nll = -UNSEEN
    assert check.student_nll == pytest.approx(nll) and check.teacher_nll == pytest.approx(nll)
    assert check.warnings == [
        "the teacher prompt does not make the golden answer clearly more likely (NLL/token "
        f"{nll:.3f} vs {nll:.3f} under the student prompt; needs a {NLL_MARGIN:.0%} cut): the "
        "teacher barely uses the demonstration",
        "the teacher does not answer better than the student (pass@1 0.00 vs 0.00 with contains)",
    ]
    assert "- warning: the teacher prompt does not make" in check.markdown()
    restored = check_from_metrics(check.metrics())
    assert restored is not None and len(restored.warnings) == 2
    assert restored.warnings[1].endswith("(pass@1 0.00 vs 0.00 with the verifier)")
    assert check_from_metrics({"teacher_check/student_nll": 1.0}) is None


def test_kl_on_the_students_rollouts_with_the_tiny_model(local_service: Any) -> None:
    teacher = local_service.create_sampling_client(base_model=TINY).result()
    training = local_service.create_lora_training_client(TINY, rank=4, seed=0).result()
    student = training.save_weights_and_get_sampling_client().result()
    tokenizer = teacher.get_tokenizer()
    check = asyncio.run(
        check_teacher(
            EXAMPLES,
            params=params(topk=5, skip_first_n=1, temperature=1.0),
            tokenizer=tokenizer,
            student=student,
            teacher=teacher,
            training_client=training,
        )
    )
    assert check.distilled_positions > 0
    assert check.teacher_student_kl is not None and check.teacher_student_kl >= -1e-6
    assert math.isfinite(check.student_nll) and math.isfinite(check.teacher_nll)
    if check.teacher_student_kl < MIN_KL:
        assert any("nearly agree" in warning for warning in check.warnings)


def test_sample_examples_is_a_seeded_sample() -> None:
    rows = [SDFTExample(id=str(i), question=f"q{i}", golden_answer="a") for i in range(10)]
    first = sample_examples(rows, 4, seed=1)
    assert len(first) == 4 and len({e.id for e in first}) == 4
    assert first == sample_examples(rows, 4, seed=1)
    assert first != sample_examples(rows, 4, seed=2)
    assert len(sample_examples(rows, 20)) == 10
    with pytest.raises(ValueError, match="at least one example"):
        asyncio.run(check_teacher([], params=params(), tokenizer=None, student=None, teacher=None))


def test_step_zero_check_goes_into_the_summary_and_the_kl_is_logged(tmp_path: Any) -> None:
    from sdft.config import load_config
    from sdft.loop import train_async
    from sdft.runlog import RunLog
    from support import write_config

    config = load_config(write_config(tmp_path, params={"max_steps": 2}, benchmarks=[]))
    asyncio.run(train_async(config, progress=False, teacher_check=3))
    rows = RunLog(config.output_dir).read_metrics()
    checks = [row for row in rows if row["split"] == "teacher_check"]
    assert len(checks) == 1 and checks[0]["step"] == 0
    logged = checks[0]["metrics"]
    assert logged["teacher_check/examples"] == 3.0
    assert logged["teacher_check/teacher_student_kl"] >= -1e-6
    restored = check_from_metrics(logged)
    assert restored is not None
    summary = (config.output_dir / "summary.md").read_text()
    assert restored.markdown() in summary
    for row in rows:
        if row["split"] == "train":
            metrics = row["metrics"]
            expected = metrics["train/mean_loss"] - metrics["train/teacher_entropy"]
            assert metrics["train/teacher_student_kl"] == pytest.approx(expected, rel=1e-12)
            assert metrics["train/teacher_student_kl"] >= -1e-6


def test_validate_teacher_check_on_a_run_config(tmp_path: Any, capsys: Any) -> None:
    from sdft.cli import main
    from support import write_config

    path = write_config(tmp_path, benchmarks=[])
    assert main(["validate", str(path), "--teacher-check", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "teacher check" in ln]
    assert (
        lines[0]
        .split("] teacher check")[1]
        .strip()
        .startswith("2 examples: golden-answer NLL/token")
    )
    assert "KL(teacher || student)" in lines[0]
    assert not (tmp_path / "out").exists()
    sft = write_config(tmp_path, kind="sft", benchmarks=[], name="sft.yaml")
    assert main(["validate", str(sft), "--teacher-check", "2"]) == 0
    assert "[skip] teacher check" in capsys.readouterr().out


def test_sdft_train_checks_the_teacher_by_default_without_changing_the_run(
    tmp_path: Any, capsys: Any
) -> None:
    from sdft.cli import main
    from sdft.runlog import RunLog
    from support import write_config

    config = write_config(tmp_path, params={"max_steps": 2}, benchmarks=[])
    assert main(["train", str(config), "--no-progress"]) == 0
    unchecked = write_config(tmp_path, params={"max_steps": 2}, benchmarks=[], output_dir="plain")
    assert main(["train", str(unchecked), "--no-progress", "--teacher-check", "0"]) == 0
    checked_rows = RunLog(tmp_path / "out").read_metrics()
    plain_rows = RunLog(tmp_path / "plain").read_metrics()
    (check,) = [row for row in checked_rows if row["split"] == "teacher_check"]
    assert check["step"] == 0 and check["metrics"]["teacher_check/examples"] == 5.0  # all 5
    assert "## Teacher check (step 0)" in (tmp_path / "out" / "summary.md").read_text()
    assert not [row for row in plain_rows if row["split"] == "teacher_check"]
    assert "Teacher check" not in (tmp_path / "plain" / "summary.md").read_text()

    # the check samples with its own seeds: the training run is the same with or without it
    def train_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in row["metrics"].items() if not k.startswith("time/")}
            for row in rows
            if row["split"] == "train"
        ]

    assert train_rows(checked_rows) == train_rows(plain_rows)
    capsys.readouterr()
    assert main(["train", str(unchecked), "--teacher-check", "-1", "--overwrite"]) == 2
    assert "--teacher-check must be >= 0, got -1" in capsys.readouterr().err
