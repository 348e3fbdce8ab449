"""The Rust kernel (`sdft.build_topk_targets`) against the plain-Python oracle (`sdft.reference`).

Property tests generate arbitrary batches; worked examples check hand-computed numbers and the
index alignment of tinker_contract.md §7.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import tinker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs, topk_to_lists

import sdft
from sdft import _kernel
from sdft.reference import reference_topk_targets

SENTINEL = MASK_LOGPROB  # -99999.0, with token id 0

# ---------------------------------------------------------------------------------------------
# Helpers


def dense_of(datum: tinker.Datum) -> tuple[np.ndarray, np.ndarray]:
    return (
        datum.loss_fn_inputs["target_tokens"].to_numpy(),
        datum.loss_fn_inputs["weights"].to_numpy(),
    )


def assert_matches_reference(datums, metrics, reference_outputs, reference_metrics, topk):
    assert len(datums) == len(reference_outputs)
    for datum, (ref_tokens, ref_weights) in zip(datums, reference_outputs, strict=True):
        assert set(datum.loss_fn_inputs) == {"target_tokens", "weights"}
        tokens, weights = dense_of(datum)
        rows = datum.model_input.length
        assert tokens.dtype == np.int64 and weights.dtype == np.float32
        assert tokens.shape == weights.shape == (rows, topk)
        np.testing.assert_array_equal(
            tokens, np.asarray(ref_tokens, dtype=np.int64).reshape(rows, topk)
        )
        expected = np.asarray(ref_weights, dtype=np.float64).reshape(rows, topk)
        assert np.all(np.isfinite(weights))
        np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-6)
    assert metrics.keys() == reference_metrics.keys()
    for key, value in reference_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def rollout(prompt: list[int], completion: list[int]) -> tinker.Datum:
    return sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints(prompt), completion_tokens=completion
    )


# ---------------------------------------------------------------------------------------------
# Strategies

ID_POOL = [0, 1, 2, 3, 5, 7, 8, 9, 10, 11, 49, 50, 51, 1000, 2**31 - 1]
LOGPROB_POOL = [0.0, -1e-7, -1e-30, -0.5, -0.50000001, -1.0, -1e4, -88.0, -745.0, SENTINEL]


@st.composite
def teacher_arrays(draw, rows: int):
    width = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 3, 4]))
    ids = draw(hnp.arrays(np.int32, (rows, width), elements=st.sampled_from(ID_POOL)))
    logprobs = draw(
        hnp.arrays(
            np.float32,
            (rows, width),
            elements=st.one_of(
                st.sampled_from(LOGPROB_POOL),
                st.floats(-30.0, 0.0, width=32, allow_subnormal=False),
            ),
        )
    )
    # Sentinel cells: whole rows (first cell) and trailing padding, as Tinker sends them.
    for row in range(rows):
        if width and draw(st.integers(0, 5)) == 0:
            ids[row, 0], logprobs[row, 0] = 0, SENTINEL
        pad = draw(st.integers(0, width)) if draw(st.booleans()) else 0
        if pad:
            ids[row, width - pad :], logprobs[row, width - pad :] = 0, SENTINEL
    return ids, logprobs


@st.composite
def batches(draw):
    """(student_data, completion_slices, dense teachers or None) of ragged datums."""
    student_data, slices, teachers = [], [], []
    for _ in range(draw(st.sampled_from([0, 1, 2, 3, 4, 2, 3]))):
        prompt = draw(st.lists(st.integers(0, 60), min_size=1, max_size=5))
        completion = draw(st.lists(st.integers(0, 60), min_size=0, max_size=10))
        datum = rollout(prompt, completion)
        if draw(st.integers(0, 4)) == 0 and datum.model_input.length > 0:
            # An arbitrary mask (several completion segments, or none).
            length = datum.model_input.length
            mask = np.asarray(
                draw(st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=length, max_size=length)),
                dtype=np.float32,
            )
            inputs = dict(datum.loss_fn_inputs)
            inputs["mask"] = tinker.TensorData(data=mask, dtype="float32", shape=[length])
            datum = tinker.Datum(model_input=datum.model_input, loss_fn_inputs=inputs)
        student_data.append(datum)
        cut = draw(st.one_of(st.just(len(completion)), st.integers(0, len(completion))))
        slice_tokens = completion[:cut]
        if draw(st.booleans()):
            slice_tokens = slice_tokens + [1] * draw(st.integers(0, 3))  # longer than the mask
        q = draw(st.integers(0, 6))
        slices.append(
            sdft.CompletionSlice(
                tokens=slice_tokens, teacher_prompt_len=q, truncated=draw(st.booleans())
            )
        )
        if draw(st.integers(0, 6)) == 0:
            teachers.append(None)
        else:
            # Usually covering the completion, sometimes short of it or longer.
            rows = max(0, q + len(completion) + draw(st.sampled_from([0, 0, 1, 3, -1, -3])))
            teachers.append(draw(teacher_arrays(rows)))
    return student_data, slices, teachers


options = st.fixed_dictionaries(
    {
        "topk": st.integers(1, 8),
        "vocab_size": st.sampled_from([None, None, 1, 8, 10, 50, 51, 2**31]),
        "skip_first_n": st.sampled_from([0, 0, 0, 1, 2, 3, 12]),
        "weight_scale": st.sampled_from([1.0, 0.5, 0.0, 2.5]),
    }
)

property_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def list_view(teacher):
    if teacher is None:
        return None
    ids, logprobs = teacher
    return topk_to_lists(TopkLogprobs(token_ids=ids, logprobs=logprobs))


# ---------------------------------------------------------------------------------------------
# Properties


@property_settings
@given(batch=batches(), kwargs=options)
def test_kernel_matches_reference_for_dense_and_list_input(batch, kwargs):
    student_data, slices, teachers = batch
    lists = [list_view(teacher) for teacher in teachers]
    reference_outputs, reference_metrics = reference_topk_targets(
        student_data=student_data, completion_slices=slices, teacher_topk_logprobs=lists, **kwargs
    )
    dense_teachers = [
        None if t is None else TopkLogprobs(token_ids=t[0], logprobs=t[1]) for t in teachers
    ]
    from_dense, dense_metrics = sdft.build_topk_targets(
        student_data=student_data,
        completion_slices=slices,
        teacher_topk_logprobs=dense_teachers,
        **kwargs,
    )
    from_lists, list_metrics = sdft.build_topk_targets(
        student_data=student_data, completion_slices=slices, teacher_topk_logprobs=lists, **kwargs
    )
    assert_matches_reference(
        from_dense, dense_metrics, reference_outputs, reference_metrics, kwargs["topk"]
    )
    # Both input forms, and batches mixing them, give the very same bits.
    mixed = [
        dense if i % 2 else rows
        for i, (dense, rows) in enumerate(zip(dense_teachers, lists, strict=True))
    ]
    from_mixed, mixed_metrics = sdft.build_topk_targets(
        student_data=student_data, completion_slices=slices, teacher_topk_logprobs=mixed, **kwargs
    )
    assert dense_metrics == list_metrics == mixed_metrics
    for a, b, c in zip(from_dense, from_lists, from_mixed, strict=True):
        for key in ("target_tokens", "weights"):
            expected = a.loss_fn_inputs[key].to_numpy()
            np.testing.assert_array_equal(expected, b.loss_fn_inputs[key].to_numpy())
            np.testing.assert_array_equal(expected, c.loss_fn_inputs[key].to_numpy())


@property_settings
@given(batch=batches(), kwargs=options)
def test_sparse_output_densifies_to_the_dense_output(batch, kwargs):
    student_data, slices, teachers = batch
    dense_teachers = [
        None if t is None else TopkLogprobs(token_ids=t[0], logprobs=t[1]) for t in teachers
    ]
    common = dict(
        student_data=student_data,
        completion_slices=slices,
        teacher_topk_logprobs=dense_teachers,
        **kwargs,
    )
    dense, dense_metrics = sdft.build_topk_targets(**common)
    sparse, sparse_metrics = sdft.build_topk_targets(**common, sparse=True)
    assert dense_metrics == sparse_metrics
    for d, s in zip(dense, sparse, strict=True):
        for key in ("target_tokens", "weights"):
            tensor = s.loss_fn_inputs[key]
            assert tensor.sparse_crow_indices is not None and tensor.shape == list(
                d.loss_fn_inputs[key].shape
            )
            np.testing.assert_array_equal(tensor.to_numpy(), d.loss_fn_inputs[key].to_numpy())
        # Only written cells travel: one per nonzero-capable cell of distilled rows.
        crow = s.loss_fn_inputs["weights"].sparse_crow_indices
        assert len(crow) == d.model_input.length + 1
        assert int(crow[-1]) == len(s.loss_fn_inputs["weights"]._numpy)


FLOAT32_MAX = float(np.finfo(np.float32).max)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), kwargs=options, weight_scale=st.floats(0.0, FLOAT32_MAX))
def test_any_weight_scale_up_to_the_float32_max_scales_the_reference_weights(
    batch, kwargs, weight_scale
):
    """Every weight is the reference's ``p * weight_scale`` cast to float32: finite, never inf."""
    student_data, slices, teachers = batch
    kwargs = {**kwargs, "weight_scale": weight_scale}
    reference_outputs, reference_metrics = reference_topk_targets(
        student_data=student_data,
        completion_slices=slices,
        teacher_topk_logprobs=[list_view(teacher) for teacher in teachers],
        **kwargs,
    )
    datums, metrics = sdft.build_topk_targets(
        student_data=student_data,
        completion_slices=slices,
        teacher_topk_logprobs=[
            None if t is None else TopkLogprobs(token_ids=t[0], logprobs=t[1]) for t in teachers
        ],
        **kwargs,
    )
    # float32 rounding is relative; below the normal range a subnormal's spacing bounds it.
    atol = max(1e-6 * weight_scale, 2.0**-149)
    for datum, (ref_tokens, ref_weights) in zip(datums, reference_outputs, strict=True):
        tokens, weights = dense_of(datum)
        rows = datum.model_input.length
        np.testing.assert_array_equal(
            tokens, np.asarray(ref_tokens, np.int64).reshape(rows, kwargs["topk"])
        )
        assert np.all(np.isfinite(weights))
        expected = np.asarray(ref_weights, np.float64).reshape(rows, kwargs["topk"])
        np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=atol)
    for key, value in reference_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


@settings(max_examples=40, deadline=None)
@given(
    weight_scale=st.floats(
        min_value=float(np.nextafter(FLOAT32_MAX, math.inf)), allow_infinity=False
    ),
    sparse=st.booleans(),
)
def test_any_finite_weight_scale_above_the_float32_max_is_rejected(weight_scale, sparse):
    datum = rollout([1, 2], [3, 4])
    # The kernel prints the shortest round-trip digits, as repr does, with Rust's exponent style.
    shown = repr(weight_scale).replace("e+", "e")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "weight_scale must be at most 3.4028234663852886e38 (the largest float32: weights "
            f"are float32), got {shown}"
        ),
    ):
        sdft.build_topk_targets(
            student_data=[datum],
            completion_slices=[sdft.CompletionSlice([3, 4], 2)],
            teacher_topk_logprobs=[[None, None, [(3, -0.1)], [(4, -0.2)]]],
            weight_scale=weight_scale,
            sparse=sparse,
        )


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.one_of(
            st.none(),
            st.just([]),
            st.lists(
                st.tuples(st.sampled_from(ID_POOL), st.sampled_from(LOGPROB_POOL)),
                min_size=0,
                max_size=6,
            ),
        ),
        min_size=0,
        max_size=12,
    ),
    kwargs=options,
    completion=st.lists(st.integers(0, 60), min_size=0, max_size=9),
    q=st.integers(0, 4),
)
def test_list_view_rows_dense_cannot_express(rows, kwargs, completion, q):
    """List rows may start with or end in a sentinel-valued pair, or be empty: all are entries."""
    datum = rollout([1, 2, 3], completion)
    slices = [sdft.CompletionSlice(tokens=completion, teacher_prompt_len=q)]
    reference_outputs, reference_metrics = reference_topk_targets(
        student_data=[datum], completion_slices=slices, teacher_topk_logprobs=[rows], **kwargs
    )
    datums, metrics = sdft.build_topk_targets(
        student_data=[datum], completion_slices=slices, teacher_topk_logprobs=[rows], **kwargs
    )
    assert_matches_reference(datums, metrics, reference_outputs, reference_metrics, kwargs["topk"])
    # Rows given as tuples of tuples and the whole view as a tuple are read the same way.
    as_tuples = tuple(None if row is None else tuple(row) for row in rows)
    again, again_metrics = sdft.build_topk_targets(
        student_data=[datum], completion_slices=slices, teacher_topk_logprobs=[as_tuples], **kwargs
    )
    assert again_metrics == metrics
    np.testing.assert_array_equal(dense_of(again[0])[1], dense_of(datums[0])[1])


# ---------------------------------------------------------------------------------------------
# Worked examples


def worked_example():
    """tinker_contract.md §7: P = [11..14], C = [21..25], Q = [91..96]; the fake teacher puts 0.7 on
    the true token T[i] of row i and 0.2 / 0.1 on decoys 1000+i / 2000+i."""
    prompt, completion, teacher_prompt = (
        [11, 12, 13, 14],
        [21, 22, 23, 24, 25],
        [91, 92, 93, 94, 95, 96],
    )
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints(prompt),
        completion_tokens=completion,
        completion_logprobs=[-0.5, -0.6, -0.7, -0.8, -0.9],
    )
    completion_slice = sdft.extract_completion_tokens(
        datum, len(teacher_prompt), max_context_length=32768
    )
    sequence = sdft.build_teacher_forced_sequence(
        tinker.ModelInput.from_ints(teacher_prompt), completion_slice.tokens
    )
    tokens = sequence.to_ints()
    ids = np.zeros((len(tokens), 3), np.int32)
    logprobs = np.full((len(tokens), 3), SENTINEL, np.float32)
    for i in range(1, len(tokens)):
        ids[i] = [tokens[i], 1000 + i, 2000 + i]
        logprobs[i] = np.log([0.7, 0.2, 0.1])
    response = tinker.SampleResponse(
        sequences=[],
        prompt_logprobs_np=np.array([np.nan] + [math.log(0.7)] * (len(tokens) - 1), np.float32),
        topk_prompt_logprobs_np=TopkLogprobs(token_ids=ids, logprobs=logprobs),
    )
    return datum, completion_slice, sequence, response


def test_worked_example_of_the_contract_alignment():
    datum, completion_slice, sequence, response = worked_example()
    assert datum.model_input.to_ints() == [11, 12, 13, 14, 21, 22, 23, 24]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [12, 13, 14, 21, 22, 23, 24, 25]
    assert datum.loss_fn_inputs["mask"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert completion_slice == sdft.CompletionSlice(
        tokens=[21, 22, 23, 24, 25], teacher_prompt_len=6, truncated=False
    )
    assert sequence.to_ints() == [91, 92, 93, 94, 95, 96, 21, 22, 23, 24, 25]
    assert len(sequence.chunks) == 1
    assert response.topk_prompt_logprobs[:2] == [
        None,
        [
            (92, pytest.approx(-0.3567, abs=1e-4)),
            (1001, pytest.approx(-1.6094, abs=1e-4)),
            (2001, pytest.approx(-2.3026, abs=1e-4)),
        ],
    ]

    for teacher in (response, response.topk_prompt_logprobs_np, response.topk_prompt_logprobs):
        datums, metrics = sdft.build_topk_targets(
            student_data=[datum],
            completion_slices=[completion_slice],
            teacher_topk_logprobs=[teacher],
            topk=3,
            skip_first_n=0,
        )
        tokens, weights = dense_of(datums[0])
        assert tokens.tolist() == [
            [0, 0, 0],
            [0, 0, 0],
            [0, 0, 0],
            [21, 1006, 2006],  # student position 3 = len(P)-1+0 <-> teacher row 6 = len(Q)+0
            [22, 1007, 2007],
            [23, 1008, 2008],
            [24, 1009, 2009],
            [25, 1010, 2010],
        ]
        np.testing.assert_allclose(weights[:3], 0.0)
        np.testing.assert_allclose(weights[3:], [[0.7, 0.2, 0.1]] * 5, atol=1e-7)
        # Every distilled row predicts the same completion token in student and teacher.
        targets = datum.loss_fn_inputs["target_tokens"].tolist()
        for t in range(5):
            student_position, teacher_row = len([11, 12, 13, 14]) - 1 + t, 6 + t
            assert (
                tokens[student_position, 0]
                == targets[student_position]
                == sequence.to_ints()[teacher_row]
            )
        entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
        assert metrics == {
            "sdft/teacher_truncated_count": 0.0,
            "sdft/num_datums": 1.0,
            "sdft/topk": 3.0,
            "sdft/total_completion_tokens": 5.0,
            "sdft/mean_teacher_entropy": pytest.approx(entropy, abs=1e-6),
            "sdft/distilled_positions": 5.0,
            "sdft/mean_teacher_entropy_distilled": pytest.approx(entropy, abs=1e-6),
            "sdft/skipped_positions": 0.0,
            "sdft/missing_teacher_rows": 0.0,
            "sdft/vocab_filtered_ids": 0.0,
            "sdft/vocab_emptied_positions": 0.0,
            "sdft/truncated_positions": 0.0,
        }


def test_worked_example_defaults_skip_three_and_vocab_filter():
    datum, completion_slice, _, response = worked_example()
    datums, metrics = sdft.build_topk_targets(
        student_data=[datum],
        completion_slices=[completion_slice],
        teacher_topk_logprobs=[response],
        topk=3,
        vocab_size=2008,
    )
    tokens, weights = dense_of(datums[0])
    # skip_first_n=3: completion positions 0..2 (student rows 3..5) stay zero.
    assert tokens[:6].tolist() == [[0, 0, 0]] * 6
    # Row 6 <- teacher row 9: ids 24, 1009, 2009; vocab 2008 drops 2009 -> 0.7, 0.2 renormalized.
    assert tokens[6].tolist() == [24, 1009, 0]
    np.testing.assert_allclose(weights[6], [7 / 9, 2 / 9, 0.0], atol=1e-7)
    assert tokens[7].tolist() == [25, 1010, 0]
    entropy = -(7 / 9 * math.log(7 / 9) + 2 / 9 * math.log(2 / 9))
    assert metrics["sdft/skipped_positions"] == 3.0
    assert metrics["sdft/vocab_filtered_ids"] == 2.0
    assert metrics["sdft/distilled_positions"] == 2.0
    # The cookbook's quirky divisor counts the skipped positions too.
    assert metrics["sdft/mean_teacher_entropy"] == pytest.approx(2 * entropy / 5, abs=1e-7)
    assert metrics["sdft/mean_teacher_entropy_distilled"] == pytest.approx(entropy, abs=1e-7)


def test_hand_computed_topk_cut_before_vocab_filter_and_weight_scale():
    # One completion position; teacher row 1 = [(5, ln .5), (9, ln .3), (7, ln .1)].
    datum = rollout([100], [4, 4])  # N = 2, positions 0 and 1
    row = [(5, math.log(0.5)), (9, math.log(0.3)), (7, math.log(0.1))]
    completion_slice = sdft.CompletionSlice(tokens=[4, 4], teacher_prompt_len=1)
    teacher = [None, row, None]  # completion position 1 -> teacher row 2 is None

    def build(**kwargs):
        datums, metrics = sdft.build_topk_targets(
            student_data=[datum],
            completion_slices=[completion_slice],
            teacher_topk_logprobs=[teacher],
            skip_first_n=0,
            **kwargs,
        )
        return (*dense_of(datums[0]), metrics)

    tokens, weights, metrics = build(topk=3, vocab_size=8)
    assert tokens.tolist() == [[5, 7, 0], [0, 0, 0]]
    np.testing.assert_allclose(weights, [[5 / 6, 1 / 6, 0], [0, 0, 0]], atol=1e-7)
    assert metrics["sdft/missing_teacher_rows"] == 1.0
    assert metrics["sdft/mean_teacher_entropy"] == pytest.approx(
        -(5 / 6 * math.log(5 / 6) + 1 / 6 * math.log(1 / 6)) / 2
    )

    tokens, weights, metrics = build(topk=2, vocab_size=8)  # cut to [5, 9] first, then 9 dropped
    assert tokens.tolist() == [[5, 0], [0, 0]]
    assert weights.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert metrics["sdft/mean_teacher_entropy"] == 0.0

    tokens, weights, metrics = build(topk=5, vocab_size=5)  # every id >= 5: nothing survives
    assert not tokens.any() and not weights.any()
    assert (
        metrics["sdft/vocab_emptied_positions"] == 1.0 and metrics["sdft/vocab_filtered_ids"] == 3.0
    )

    tokens, weights, _ = build(topk=3, weight_scale=0.5)
    # 0.5, 0.3, 0.1 renormalize to 5/9, 3/9, 1/9; halved.
    np.testing.assert_allclose(weights[0], [5 / 18, 3 / 18, 1 / 18], atol=1e-7)


def test_teacher_shorter_than_completion_and_truncated_slice_are_skipped_not_errors():
    datum = rollout([1, 2], [10, 11, 12, 13, 14])  # positions 1..5
    teacher = [
        None,
        None,
        [(10, 0.0)],
        [(11, 0.0)],
    ]  # q = 2: rows for completion positions 0, 1 only
    completion_slice = sdft.CompletionSlice(
        tokens=[10, 11, 12, 13], teacher_prompt_len=2, truncated=True
    )
    datums, metrics = sdft.build_topk_targets(
        student_data=[datum],
        completion_slices=[completion_slice],
        teacher_topk_logprobs=[teacher],
        topk=1,
        skip_first_n=0,
    )
    tokens, weights = dense_of(datums[0])
    assert tokens[:, 0].tolist() == [0, 10, 11, 0, 0, 0]
    assert weights[:, 0].tolist() == [0, 1, 1, 0, 0, 0]
    assert metrics["sdft/total_completion_tokens"] == 4.0
    assert metrics["sdft/missing_teacher_rows"] == 2.0
    assert metrics["sdft/truncated_positions"] == 1.0
    assert metrics["sdft/teacher_truncated_count"] == 1.0


def test_no_completion_positions_omit_the_cookbook_averages():
    datum = rollout([1, 2, 3], [])
    datums, metrics = sdft.build_topk_targets(
        student_data=[datum],
        completion_slices=[sdft.CompletionSlice([], 3)],
        teacher_topk_logprobs=[None],
    )
    assert dense_of(datums[0])[0].shape == (2, 20)
    assert (
        "sdft/total_completion_tokens" not in metrics and "sdft/mean_teacher_entropy" not in metrics
    )
    assert metrics["sdft/mean_teacher_entropy_distilled"] == 0.0
    assert (
        sdft.build_topk_targets(student_data=[], completion_slices=[], teacher_topk_logprobs=[])[0]
        == []
    )


# ---------------------------------------------------------------------------------------------
# Dense input forms


def recipe_like_batch(num_datums=6, rows_prompt=9, completion=40, width=5, seed=0):
    rng = np.random.default_rng(seed)
    student_data, slices, teachers = [], [], []
    for _ in range(num_datums):
        comp = rng.integers(0, 300, completion).tolist()
        student_data.append(rollout(rng.integers(0, 300, 4).tolist(), comp))
        slices.append(sdft.CompletionSlice(tokens=comp, teacher_prompt_len=rows_prompt))
        rows = rows_prompt + completion
        ids = rng.integers(0, 300, (rows, width)).astype(np.int32)
        logprobs = np.sort(rng.normal(-4, 2, (rows, width)), axis=1)[:, ::-1].astype(np.float32)
        ids[0], logprobs[0] = 0, SENTINEL
        teachers.append((ids, logprobs))
    return student_data, slices, teachers


@pytest.mark.parametrize(
    "layout",
    [
        "fortran",
        "row_step",
        "column_step",
        "negative_rows",
        "broadcast",
        "read_only",
        "int64_float64",
        "float64_only",
    ],
)
def test_non_contiguous_and_wider_dtype_arrays_give_identical_results(layout):
    student_data, slices, teachers = recipe_like_batch()
    baseline, baseline_metrics = sdft.build_topk_targets(
        student_data=student_data,
        completion_slices=slices,
        teacher_topk_logprobs=[TopkLogprobs(token_ids=i, logprobs=lp) for i, lp in teachers],
        topk=4,
        vocab_size=250,
    )
    transformed = []
    for ids, logprobs in teachers:
        if layout == "fortran":
            ids, logprobs = np.asfortranarray(ids), np.asfortranarray(logprobs)
        elif layout == "row_step":
            ids = np.repeat(ids, 2, axis=0)[::2]
            logprobs = np.repeat(logprobs, 2, axis=0)[::2]
        elif layout == "column_step":
            ids = np.repeat(ids, 3, axis=1)[:, ::3]
            logprobs = np.repeat(logprobs, 3, axis=1)[:, ::3]
        elif layout == "negative_rows":
            ids, logprobs = ids[::-1].copy()[::-1], logprobs[::-1].copy()[::-1]
        elif layout == "broadcast":
            # The same row everywhere (zero row stride) against a materialized copy.
            ids = np.broadcast_to(ids[3], ids.shape)
            logprobs = np.broadcast_to(logprobs[3], logprobs.shape)
        elif layout == "read_only":
            ids, logprobs = ids.copy(), logprobs.copy()
            ids.flags.writeable = logprobs.flags.writeable = False
        elif layout == "int64_float64":
            ids, logprobs = ids.astype(np.int64), logprobs.astype(np.float64)
        elif layout == "float64_only":
            logprobs = logprobs.astype(np.float64)
        transformed.append(TopkLogprobs(token_ids=ids, logprobs=logprobs))
    if layout == "broadcast":
        expected_teachers = [
            TopkLogprobs(
                token_ids=np.ascontiguousarray(t.token_ids),
                logprobs=np.ascontiguousarray(t.logprobs),
            )
            for t in transformed
        ]
        baseline, baseline_metrics = sdft.build_topk_targets(
            student_data=student_data,
            completion_slices=slices,
            teacher_topk_logprobs=expected_teachers,
            topk=4,
            vocab_size=250,
        )
    else:
        assert not all(t.token_ids.flags.c_contiguous for t in transformed) or layout in {
            "read_only",
            "int64_float64",
            "float64_only",
        }
    got, metrics = sdft.build_topk_targets(
        student_data=student_data,
        completion_slices=slices,
        teacher_topk_logprobs=transformed,
        topk=4,
        vocab_size=250,
    )
    assert metrics == baseline_metrics
    for a, b in zip(baseline, got, strict=True):
        np.testing.assert_array_equal(dense_of(a)[0], dense_of(b)[0])
        np.testing.assert_array_equal(dense_of(a)[1], dense_of(b)[1])


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    student_data, slices, teachers = recipe_like_batch(num_datums=9, completion=300, seed=3)
    dense = [TopkLogprobs(token_ids=i, logprobs=lp) for i, lp in teachers]
    results = []
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("SDFT_KERNEL_THREADS", threads)
        for sparse in (False, True):
            datums, metrics = sdft.build_topk_targets(
                student_data=student_data,
                completion_slices=slices,
                teacher_topk_logprobs=dense,
                topk=5,
                sparse=sparse,
            )
            results.append((sparse, [dense_of(d) for d in datums], metrics))
    first_dense, first_sparse = results[0], results[1]
    for sparse, arrays, metrics in results:
        reference = first_sparse if sparse else first_dense
        assert metrics == reference[2]
        for (t1, w1), (t2, w2) in zip(arrays, reference[1], strict=True):
            np.testing.assert_array_equal(t1, t2)
            np.testing.assert_array_equal(w1.view(np.uint32), w2.view(np.uint32))


def test_kernel_outputs_are_wrapped_without_a_copy():
    student_data, slices, teachers = recipe_like_batch(num_datums=3)
    datums, _ = sdft.build_topk_targets(
        student_data=student_data,
        completion_slices=slices,
        teacher_topk_logprobs=[TopkLogprobs(token_ids=i, logprobs=lp) for i, lp in teachers],
        topk=4,
    )
    owners = set()
    for datum in datums:
        for key, dtype in (("target_tokens", np.int64), ("weights", np.float32)):
            tensor = datum.loss_fn_inputs[key]
            array = tensor._numpy
            assert tensor.to_numpy() is array  # TensorData kept the kernel's array itself
            assert array.dtype == dtype and array.flags.writeable and array.flags.c_contiguous
            assert isinstance(
                array.base, _kernel.OutputBuffer
            )  # memory owned by the kernel's buffer
            owners.add((key, id(array.base)))
    # One buffer per tensor kind holds the whole batch back to back.
    assert len(owners) == 2
    total_rows = sum(d.model_input.length for d in datums)
    tokens_owner = datums[0].loss_fn_inputs["target_tokens"]._numpy.base
    assert tokens_owner.nbytes == total_rows * 4 * 8


def test_outputs_survive_the_batch_and_can_be_written():
    student_data, slices, teachers = recipe_like_batch(num_datums=2)
    datums, _ = sdft.build_topk_targets(
        student_data=student_data,
        completion_slices=slices,
        teacher_topk_logprobs=[TopkLogprobs(token_ids=i, logprobs=lp) for i, lp in teachers],
        topk=4,
    )
    keep = datums[1].loss_fn_inputs["weights"].to_numpy()
    expected = keep.copy()
    del datums
    import gc

    gc.collect()
    np.testing.assert_array_equal(keep, expected)
    keep[0, 0] = 3.5
    assert keep[0, 0] == 3.5


def test_serializes_to_tinker_wire_format():
    from tinker.proto.request_conv import _tensor_data_to_proto

    datum, completion_slice, _, response = worked_example()
    for sparse in (False, True):
        datums, _ = sdft.build_topk_targets(
            student_data=[datum],
            completion_slices=[completion_slice],
            teacher_topk_logprobs=[response],
            topk=3,
            skip_first_n=0,
            sparse=sparse,
        )
        weights = datums[0].loss_fn_inputs["weights"]
        message = _tensor_data_to_proto(weights)
        assert list(message.shape) == [8, 3]
        if sparse:
            crow = np.frombuffer(message.sparse_csr.crow_indices, dtype=np.int64)
            values = np.frombuffer(message.sparse_csr.values, dtype=np.float32)
            assert crow.tolist() == [0, 0, 0, 0, 3, 6, 9, 12, 15]
            np.testing.assert_allclose(values, [0.7, 0.2, 0.1] * 5, atol=1e-7)
        else:
            dense = np.frombuffer(message.dense, dtype=np.float32).reshape(8, 3)
            np.testing.assert_array_equal(dense, weights.to_numpy())


def test_the_kernel_releases_the_gil_while_it_works():
    """A Python thread keeps running while another thread is inside the kernel."""
    import threading
    import time

    rng = np.random.default_rng(5)
    mask = np.ones(1024, np.float32)
    ids = rng.integers(0, 1000, (1100, 20)).astype(np.int32)
    logprobs = -np.sort(rng.exponential(2.0, (1100, 20)), axis=1).astype(np.float32)
    items = [(mask, 1024, 50, (ids, logprobs))] * 512
    durations: list[float] = []

    def work():
        for _ in range(3):
            start = time.perf_counter()
            _kernel.build_topk_batch(
                items,
                topk=20,
                vocab_size=None,
                skip_first_n=0,
                weight_scale=1.0,
                sparse=False,
                threads=1,
            )
            durations.append(time.perf_counter() - start)

    worker = threading.Thread(target=work)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    # Holding the GIL for a whole call would stall this loop for that long.
    assert len(ticks) > 1000
    assert max(np.diff(ticks)) < 0.5 * min(durations), (max(np.diff(ticks)), durations)
