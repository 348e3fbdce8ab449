"""The fast paths of ``student_datum_from_rollout``, ``extract_completion_tokens`` and
``build_teacher_forced_sequence`` against their previous implementations, kept here verbatim as
reference twins in ``tests/data_reference.py``.

The fast paths build ``tinker`` models without pydantic re-validating every token, and hand the
completion tokens from ``extract_completion_tokens`` to ``build_teacher_forced_sequence`` without
checking them a second time. Here: equal results (values, Python ``int`` tokens, the same chunk
structure, the same pydantic dumps) and the same exceptions with the same messages, for arbitrary
inputs, plus the checks a completion list edited in place still gets.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import numpy as np
import pytest
import tinker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdft
from data_reference import (
    MAX_TOKEN_ID,
    ref_extract,
    ref_student_datum,
    ref_teacher_forced,
)

# ---------------------------------------------------------------------------------------------
# Comparison helpers


def outcome(function: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """``("ok", result)`` or ``("error", (exception type, message))``."""
    try:
        return "ok", function(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        return "error", (type(exc), str(exc))


def assert_same_model_input(new: tinker.ModelInput, old: tinker.ModelInput) -> None:
    assert new == old
    assert [type(chunk) for chunk in new.chunks] == [type(chunk) for chunk in old.chunks]
    for chunk in new.chunks:
        if isinstance(chunk, tinker.EncodedTextChunk):
            assert type(chunk.tokens) is list
            assert all(type(token) is int for token in chunk.tokens)
    assert new.model_dump(mode="json") == old.model_dump(mode="json")
    # What the SDK sends: the models validate as they are.
    assert tinker.ModelInput.model_validate(new.model_dump()) == new


def assert_same_datum(new: tinker.Datum, old: tinker.Datum) -> None:
    assert_same_model_input(new.model_input, old.model_input)
    assert new.loss_fn_inputs.keys() == old.loss_fn_inputs.keys()
    for key, tensor in old.loss_fn_inputs.items():
        assert new.loss_fn_inputs[key].dtype == tensor.dtype
        assert new.loss_fn_inputs[key].shape == tensor.shape
        np.testing.assert_array_equal(new.loss_fn_inputs[key].to_numpy(), tensor.to_numpy())


def assert_same_slice(new: Any, old: Any) -> None:
    assert new == old
    assert isinstance(new.tokens, list)
    assert [type(token) for token in new.tokens] == [type(token) for token in old.tokens]
    assert repr(new) == repr(old)
    assert json.dumps(new.tokens) == json.dumps(old.tokens)


# ---------------------------------------------------------------------------------------------
# Strategies

token_ids = st.one_of(st.integers(0, 60_000), st.integers(0, MAX_TOKEN_ID))
bad_values = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=MAX_TOKEN_ID + 1, max_value=2**70),
    st.floats(allow_nan=True),
    st.booleans(),
)
FORMS = ("list", "tuple", "int32", "int64", "uint32", "numpy scalars in a list")


def as_form(tokens: list[int], form: str) -> Any:
    if form == "list":
        return list(tokens)
    if form == "tuple":
        return tuple(tokens)
    if form == "numpy scalars in a list":
        return [np.int64(token) for token in tokens]
    return np.asarray(tokens, dtype=form)


@st.composite
def completions(draw: Any, max_size: int = 40) -> Any:
    tokens = draw(st.lists(token_ids, max_size=max_size))
    form = draw(st.sampled_from(FORMS))
    if form in ("int32", "uint32"):
        tokens = [min(token, 2**31 - 1) for token in tokens]
    return as_form(tokens, form)


@st.composite
def bad_completions(draw: Any) -> Any:
    tokens: list[Any] = draw(st.lists(token_ids, max_size=10))
    for _ in range(draw(st.integers(1, 3))):
        tokens.insert(draw(st.integers(0, len(tokens))), draw(bad_values))
    if draw(st.booleans()):
        return tokens
    return draw(st.sampled_from([[tokens], np.asarray([0, 1], dtype=np.float32), "abc"]))


@st.composite
def teacher_prompts(draw: Any) -> tinker.ModelInput:
    chunks: list[Any] = [
        tinker.EncodedTextChunk(tokens=draw(st.lists(token_ids, max_size=12)))
        for _ in range(draw(st.integers(0, 3)))
    ]
    if draw(st.booleans()):
        image = tinker.types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)
        chunks.insert(draw(st.integers(0, len(chunks))), image)
    return tinker.ModelInput(chunks=chunks)


prompts = st.lists(token_ids, min_size=1, max_size=20).map(tinker.ModelInput.from_ints)
property_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# ---------------------------------------------------------------------------------------------
# Properties


@property_settings
@given(prompt=prompts, completion=completions(), with_logprobs=st.booleans())
def test_student_datum_equals_the_previous_implementation(prompt, completion, with_logprobs):
    logprobs = [-0.5] * len(completion) if with_logprobs else None
    new = sdft.student_datum_from_rollout(
        prompt=prompt, completion_tokens=completion, completion_logprobs=logprobs
    )
    old = ref_student_datum(
        prompt=prompt, completion_tokens=completion, completion_logprobs=logprobs
    )
    assert_same_datum(new, old)


@property_settings
@given(prompt=prompts, completion=bad_completions())
def test_student_datum_rejects_what_the_previous_implementation_rejected(prompt, completion):
    new = outcome(sdft.student_datum_from_rollout, prompt=prompt, completion_tokens=completion)
    old = outcome(ref_student_datum, prompt=prompt, completion_tokens=completion)
    assert new[0] == old[0]
    if old[0] == "error":
        assert new[1] == old[1]
    else:
        assert_same_datum(new[1], old[1])


@st.composite
def student_data(draw: Any) -> tinker.Datum:
    """Datums from ``student_datum_from_rollout`` or built by hand with arbitrary masks and
    targets (gaps in the mask, no mask at all, ids out of range, float targets)."""
    if draw(st.booleans()):
        return sdft.student_datum_from_rollout(
            prompt=draw(prompts), completion_tokens=draw(st.lists(token_ids, max_size=40))
        )
    n = draw(st.integers(1, 30))
    mask = np.asarray(draw(st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=n, max_size=n)))
    if draw(st.booleans()):
        targets = tinker.TensorData(
            data=np.asarray(
                draw(st.lists(st.integers(-5, 2**40), min_size=n, max_size=n)), np.int64
            ),
            dtype="int64",
            shape=[n],
        )
    else:
        targets = tinker.TensorData(
            data=np.asarray(draw(st.lists(st.floats(0, 100), min_size=n, max_size=n)), np.float32),
            dtype="float32",
            shape=[n],
        )
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(list(range(n))),
        loss_fn_inputs={
            "target_tokens": targets,
            "mask": tinker.TensorData(data=mask.astype(np.float32), dtype="float32", shape=[n]),
        },
    )


@property_settings
@given(
    datum=student_data(),
    teacher_prompt_len=st.one_of(st.integers(0, 60), st.integers(-2, -1), st.just(3.0)),
    max_context_length=st.one_of(st.integers(0, 100), st.just(True)),
)
def test_extract_equals_the_previous_implementation(datum, teacher_prompt_len, max_context_length):
    new = outcome(
        sdft.extract_completion_tokens,
        datum,
        teacher_prompt_len,
        max_context_length=max_context_length,
    )
    old = outcome(ref_extract, datum, teacher_prompt_len, max_context_length=max_context_length)
    assert new[0] == old[0]
    if old[0] == "error":
        assert new[1] == old[1]
    else:
        assert_same_slice(new[1], old[1])


@property_settings
@given(teacher_prompt=teacher_prompts(), completion=completions())
def test_teacher_forced_sequence_equals_the_previous_implementation(teacher_prompt, completion):
    new = sdft.build_teacher_forced_sequence(teacher_prompt, completion)
    old = ref_teacher_forced(teacher_prompt, completion)
    assert_same_model_input(new, old)
    if len(completion) == 0:
        assert new is teacher_prompt


@property_settings
@given(teacher_prompt=teacher_prompts(), completion=bad_completions())
def test_teacher_forced_sequence_rejects_what_the_previous_implementation_rejected(
    teacher_prompt, completion
):
    new = outcome(sdft.build_teacher_forced_sequence, teacher_prompt, completion)
    old = outcome(ref_teacher_forced, teacher_prompt, completion)
    assert new[0] == old[0]
    if old[0] == "error":
        assert new[1] == old[1]
    else:
        assert_same_model_input(new[1], old[1])


@property_settings
@given(
    datum=student_data(),
    teacher_prompt=teacher_prompts(),
    teacher_prompt_len=st.integers(0, 60),
    max_context_length=st.integers(0, 100),
)
def test_the_chain_extract_then_teacher_forced_equals_the_previous_one(
    datum, teacher_prompt, teacher_prompt_len, max_context_length
):
    """What the loop does: the slice's own tokens go to ``build_teacher_forced_sequence`` (the
    fast path for lists made by ``extract_completion_tokens``)."""
    completion_slice = sdft.extract_completion_tokens(
        datum, teacher_prompt_len, max_context_length=max_context_length
    )
    reference_slice = ref_extract(datum, teacher_prompt_len, max_context_length=max_context_length)
    new = outcome(sdft.build_teacher_forced_sequence, teacher_prompt, completion_slice.tokens)
    old = outcome(ref_teacher_forced, teacher_prompt, reference_slice.tokens)
    assert new[0] == old[0]
    if old[0] == "error":
        assert new[1] == old[1]
    else:
        assert_same_model_input(new[1], old[1])


# ---------------------------------------------------------------------------------------------
# A completion list edited in place is checked again


def completion_slice_of(completion: list[int]) -> sdft.CompletionSlice:
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1, 2]), completion_tokens=completion
    )
    return sdft.extract_completion_tokens(datum, 2, max_context_length=100)


EDITS = {
    "setitem": lambda tokens: tokens.__setitem__(1, -7),
    "slice setitem": lambda tokens: tokens.__setitem__(slice(0, 1), [-7]),
    "append": lambda tokens: tokens.append(-7),
    "extend": lambda tokens: tokens.extend([3, -7]),
    "insert": lambda tokens: tokens.insert(0, -7),
    "iadd": lambda tokens: tokens.__iadd__([-7]),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_completion_list_is_checked_again(edit):
    tokens = completion_slice_of([5, 6, 7]).tokens
    EDITS[edit](tokens)
    bad = tokens.index(-7)
    message = f"completion_tokens[{bad}] = -7 is outside [0, {MAX_TOKEN_ID}]"
    with pytest.raises(ValueError, match=re.escape(message)):
        sdft.build_teacher_forced_sequence(tinker.ModelInput.from_ints([1]), tokens)
    with pytest.raises(ValueError, match=re.escape(message)):
        ref_teacher_forced(tinker.ModelInput.from_ints([1]), tokens)


def test_an_edited_completion_list_with_a_float_is_checked_again():
    tokens = completion_slice_of([5, 6, 7]).tokens
    tokens[0] = 2.5  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="completion_tokens must contain ints, got dtype float64"):
        sdft.build_teacher_forced_sequence(tinker.ModelInput.from_ints([1]), tokens)


def test_removing_or_reordering_tokens_keeps_the_result_exact():
    tokens = completion_slice_of([5, 6, 7, 8]).tokens
    tokens.pop()
    tokens.reverse()
    tokens.remove(6)
    prompt = tinker.ModelInput.from_ints([1])
    assert_same_model_input(
        sdft.build_teacher_forced_sequence(prompt, tokens), ref_teacher_forced(prompt, tokens)
    )
    assert sdft.build_teacher_forced_sequence(prompt, tokens).to_ints() == [1, 7, 5]


@pytest.mark.parametrize("with_image", [False, True])
def test_the_sequence_does_not_share_the_slice_list(with_image):
    completion_slice = completion_slice_of([5, 6, 7])
    chunks: list[Any] = [tinker.EncodedTextChunk(tokens=[1])]
    if with_image:
        chunks.append(tinker.types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4))
    sequence = sdft.build_teacher_forced_sequence(
        tinker.ModelInput(chunks=chunks), completion_slice.tokens
    )
    assert len(sequence.chunks) == (3 if with_image else 1)
    assert sequence.chunks[-1].tokens is not completion_slice.tokens
    completion_slice.tokens.pop()
    assert sequence.chunks[-1].tokens[-3:] == [5, 6, 7]
    assert completion_slice.tokens == [5, 6]


def test_slices_with_ids_out_of_range_take_the_checked_path():
    """Targets that are not valid token ids (a hand-built datum) give an ordinary list, so the
    teacher-forced sequence reports them exactly as before."""
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData(
                data=np.array([2, 3, -4], np.int64), dtype="int64", shape=[3]
            ),
            "mask": tinker.TensorData(
                data=np.array([0, 1, 1], np.float32), dtype="float32", shape=[3]
            ),
        },
    )
    completion_slice = sdft.extract_completion_tokens(datum, 1, max_context_length=10)
    assert completion_slice == sdft.CompletionSlice([3, -4], 1, False)
    with pytest.raises(
        ValueError, match=re.escape(f"completion_tokens[1] = -4 is outside [0, {MAX_TOKEN_ID}]")
    ):
        sdft.build_teacher_forced_sequence(
            tinker.ModelInput.from_ints([1]), completion_slice.tokens
        )


def test_copies_of_a_slice_give_the_same_sequence():
    """``copy`` rebuilds the list by appending, so a copy is checked again; the result is the
    same either way."""
    completion_slice = completion_slice_of([5, 6, 7])
    prompt = tinker.ModelInput.from_ints([1])
    expected = ref_teacher_forced(prompt, [5, 6, 7])
    for tokens in (
        completion_slice.tokens,
        copy.copy(completion_slice.tokens),
        copy.deepcopy(completion_slice).tokens,
    ):
        assert tokens == [5, 6, 7]
        assert_same_model_input(sdft.build_teacher_forced_sequence(prompt, tokens), expected)
