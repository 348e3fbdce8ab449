"""Bad input to `sdft.build_topk_targets` (and the kernel binding): a clear TypeError/ValueError
that names the datum and position, or documented behaviour with finite output; never a panic,
abort, MemoryError or NaN.

Policy: TypeError for a Python object of the wrong type or dtype; ValueError for a well-typed
value that is out of range, of the wrong shape or inconsistent.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import tinker
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

import sdft
from sdft import _kernel

# Datum 1 of a two-datum batch: P = [1, 2, 3], C = [10, 11, 12, 13]; completion position t sits at
# student position 2 + t and reads teacher row 5 + t (q = 5).
WHERE = "datum 1: completion position 1 (student position 3, teacher row 6)"


def batch(teacher_rows, **kwargs):
    """Runs a batch whose second datum has the given teacher; the first one is fine."""
    good = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1]), completion_tokens=[5, 6]
    )
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1, 2, 3]), completion_tokens=[10, 11, 12, 13]
    )
    slices = [sdft.CompletionSlice([5, 6], 1), sdft.CompletionSlice([10, 11, 12, 13], 5)]
    kwargs.setdefault("skip_first_n", 0)
    return sdft.build_topk_targets(
        student_data=[good, datum],
        completion_slices=slices,
        teacher_topk_logprobs=[[None, [(5, -0.1)], [(6, -0.2)]], teacher_rows],
        **kwargs,
    )


def dense_teacher(bad_id=None, bad_logprob=None, ids_dtype=np.int32, logprobs_dtype=np.float32):
    ids = np.arange(27, dtype=np.int64).reshape(9, 3)
    logprobs = np.tile(np.log([0.6, 0.3, 0.1]), (9, 1))
    if bad_id is not None:
        ids[6, 2] = bad_id
    if bad_logprob is not None:
        logprobs[6, 2] = bad_logprob
    return TopkLogprobs(token_ids=ids.astype(ids_dtype), logprobs=logprobs.astype(logprobs_dtype))


def list_teacher(bad_entry):
    rows = [[(3 * r, -1.1), (3 * r + 1, -1.2), (3 * r + 2, -2.3)] for r in range(9)]
    rows[6][2] = bad_entry
    return rows


# ---------------------------------------------------------------------------------------------
# Values inside the teacher rows


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (np.nan, "logprob is NaN; teacher logprobs must be finite"),
        (np.inf, "logprob is inf; teacher logprobs must be finite"),
        (-np.inf, "logprob is -inf; teacher logprobs must be finite"),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_logprobs_in_dense_input(value, problem, dtype):
    with pytest.raises(ValueError, match=re.escape(f"{WHERE}, entry 2: {problem}")):
        batch(dense_teacher(bad_logprob=value, logprobs_dtype=dtype))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (float("nan"), "logprob is NaN; teacher logprobs must be finite"),
        (float("-inf"), "logprob is -inf; teacher logprobs must be finite"),
    ],
)
def test_non_finite_logprobs_in_list_input(value, problem):
    with pytest.raises(ValueError, match=re.escape(f"{WHERE}, entry 2: {problem}")):
        batch(list_teacher((7, value)))


@pytest.mark.parametrize(
    ("bad_id", "dtype"),
    [(-1, np.int32), (-(2**40), np.int64), (2**31, np.int64), (2**63 - 1, np.int64)],
)
def test_ids_outside_the_int32_token_range_in_dense_input(bad_id, dtype):
    with pytest.raises(
        ValueError,
        match=re.escape(f"{WHERE}, entry 2: token id {bad_id} is outside [0, 2147483647]"),
    ):
        batch(dense_teacher(bad_id=bad_id, ids_dtype=dtype))


@pytest.mark.parametrize("bad_id", [-1, 2**31, 2**63 - 1, -(2**63)])
def test_ids_outside_the_int32_token_range_in_list_input(bad_id):
    with pytest.raises(
        ValueError,
        match=re.escape(f"{WHERE}, entry 2: token id {bad_id} is outside [0, 2147483647]"),
    ):
        batch(list_teacher((bad_id, -0.5)))


@pytest.mark.parametrize("bad_id", [2**64, -(2**70)])
def test_ids_beyond_int64_in_list_input(bad_id):
    with pytest.raises(
        ValueError,
        match=re.escape(f"{WHERE}, entry 2: token id {bad_id} is outside [0, 2147483647]"),
    ):
        batch(list_teacher((bad_id, -0.5)))


def test_bad_ids_are_rejected_even_when_the_vocab_filter_would_drop_them():
    with pytest.raises(ValueError, match=re.escape(f"{WHERE}, entry 2: token id -3 is outside")):
        batch(list_teacher((-3, -0.5)), vocab_size=5)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ((7,), "entry must be a (token_id, logprob) pair, got a tuple of 1"),
        ((7, -0.5, 1), "entry must be a (token_id, logprob) pair, got a tuple of 3"),
        ([7, -0.5, 1], "entry must be a (token_id, logprob) pair, got a list of 3"),
        (7, "entry must be a (token_id, logprob) pair, got int"),
        ({"id": 7}, "entry must be a (token_id, logprob) pair, got dict"),
        (("7", -0.5), "token id must be an int, got str"),
        ((7.0, -0.5), "token id must be an int, got float"),
        ((True, -0.5), "token id must be an int, got bool"),
        ((None, -0.5), "token id must be an int, got NoneType"),
        ((7, "x"), "logprob must be a float, got str"),
        ((7, None), "logprob must be a float, got NoneType"),
        ((7, False), "logprob must be a float, got bool"),
    ],
)
def test_entries_that_are_not_int_float_pairs(entry, problem):
    with pytest.raises(TypeError, match=re.escape(f"{WHERE}, entry 2: {problem}")):
        batch(list_teacher(entry))


def test_list_entries_as_lists_and_numpy_scalars_are_accepted():
    rows = [[(3 * r, -1.1), (3 * r + 1, -1.2)] for r in range(9)]
    as_lists = [[[np.int64(i), np.float32(lp)] for i, lp in row] for row in rows]
    expected, _ = batch(rows)
    got, _ = batch(as_lists)
    np.testing.assert_allclose(
        got[1].loss_fn_inputs["weights"].to_numpy(),
        expected[1].loss_fn_inputs["weights"].to_numpy(),
        atol=1e-7,
    )


@pytest.mark.parametrize(("row", "name"), [(5, "int"), ("abc", "str"), ({1: 2.0}, "dict")])
def test_rows_that_are_not_lists(row, name):
    rows = list_teacher((1, -0.5))
    rows[6] = row
    message = (
        f"{WHERE}: teacher row must be None or a list of (token_id, logprob) pairs, got {name}"
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        batch(rows)


def test_only_rows_the_kernel_reads_are_validated():
    rows = list_teacher((1, -0.5))
    rows[0] = "not a row"  # teacher prompt rows are never read
    rows[5] = [(-1, float("nan"))]  # completion position 0 is skipped with skip_first_n=1
    rows[7] = [(1, -0.5), (2, -0.6), (-5, "beyond topk")]  # entry 2 is past topk=2
    datums, _ = batch(rows, skip_first_n=1, topk=2)
    assert np.isfinite(datums[1].loss_fn_inputs["weights"].to_numpy()).all()


def test_the_lowest_bad_datum_is_reported_whatever_the_input_forms():
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1, 2, 3]), completion_tokens=[10, 11, 12, 13]
    )
    slices = [sdft.CompletionSlice([10, 11, 12, 13], 5)] * 3
    bad_list = list_teacher((7, "x"))  # a TypeError, found while converting the list view
    bad_dense = dense_teacher(bad_logprob=np.nan)  # a ValueError, found by the kernel
    good = dense_teacher()
    at = "completion position 1 (student position 3, teacher row 6), entry 2"
    for teachers, error, message in [
        (
            [good, bad_list, bad_dense],
            TypeError,
            f"datum 1: {at}: logprob must be a float, got str",
        ),
        ([good, bad_dense, bad_list], ValueError, f"datum 1: {at}: logprob is NaN"),
        ([bad_dense, good, bad_list], ValueError, f"datum 0: {at}: logprob is NaN"),
    ]:
        with pytest.raises(error, match=re.escape(message)):
            sdft.build_topk_targets(
                student_data=[datum] * 3,
                completion_slices=slices,
                teacher_topk_logprobs=teachers,
                skip_first_n=0,
            )


# ---------------------------------------------------------------------------------------------
# Batch structure


def test_mismatched_list_lengths():
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1]), completion_tokens=[2]
    )
    message = "one entry per datum is required, but student_data has 2, completion_slices has 1, teacher_topk_logprobs has 2"
    with pytest.raises(ValueError, match=re.escape(message)):
        sdft.build_topk_targets(
            student_data=[datum, datum],
            completion_slices=[sdft.CompletionSlice([2], 1)],
            teacher_topk_logprobs=[None, None],
        )
    with pytest.raises(TypeError, match="teacher_topk_logprobs must be a list, got NoneType"):
        sdft.build_topk_targets(
            student_data=[datum],
            completion_slices=[sdft.CompletionSlice([2], 1)],
            teacher_topk_logprobs=None,
        )


def test_datum_without_mask_or_with_a_wrong_length_mask():
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1, 2]), completion_tokens=[3, 4]
    )
    no_mask = sdft.strip_mask(datum)
    with pytest.raises(
        ValueError, match=re.escape("datum 0: loss_fn_inputs has no 'mask' (keys: target_tokens)")
    ):
        sdft.build_topk_targets(
            student_data=[no_mask],
            completion_slices=[sdft.CompletionSlice([3, 4], 2)],
            teacher_topk_logprobs=[None],
        )
    short = tinker.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={
            "target_tokens": datum.loss_fn_inputs["target_tokens"],
            "mask": tinker.TensorData(data=np.ones(2, np.float32), dtype="float32", shape=[2]),
        },
    )
    with pytest.raises(
        ValueError,
        match=re.escape("datum 0: mask has shape (2,), expected (3,) = model_input.length"),
    ):
        sdft.build_topk_targets(
            student_data=[short],
            completion_slices=[sdft.CompletionSlice([3, 4], 2)],
            teacher_topk_logprobs=[None],
        )


def test_nan_mask():
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1, 2]), completion_tokens=[3, 4]
    )
    mask = np.array([0.0, 1.0, np.nan], np.float32)
    bad = tinker.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={"mask": tinker.TensorData(data=mask, dtype="float32", shape=[3])},
    )
    with pytest.raises(
        ValueError, match=re.escape("datum 0: mask[2] is NaN; mask values must be finite")
    ):
        sdft.build_topk_targets(
            student_data=[bad],
            completion_slices=[sdft.CompletionSlice([3, 4], 2)],
            teacher_topk_logprobs=[None],
        )


def test_wrong_object_types_per_datum():
    datum = sdft.student_datum_from_rollout(
        prompt=tinker.ModelInput.from_ints([1, 2]), completion_tokens=[3, 4]
    )
    slices = [sdft.CompletionSlice([3, 4], 2)]
    with pytest.raises(TypeError, match=re.escape("datum 0: expected a tinker.Datum, got dict")):
        sdft.build_topk_targets(
            student_data=[{"mask": [1]}], completion_slices=slices, teacher_topk_logprobs=[None]
        )
    with pytest.raises(
        TypeError, match=re.escape("datum 0: expected a CompletionSlice, got tuple")
    ):
        sdft.build_topk_targets(
            student_data=[datum], completion_slices=[([3, 4], 2)], teacher_topk_logprobs=[None]
        )
    with pytest.raises(
        TypeError,
        match=re.escape(
            "datum 0: teacher top-K must be None, a list of rows of (token_id, logprob) pairs, a tinker TopkLogprobs or a tinker SampleResponse, got dict"
        ),
    ):
        sdft.build_topk_targets(
            student_data=[datum], completion_slices=slices, teacher_topk_logprobs=[{"rows": []}]
        )
    with pytest.raises(
        ValueError, match=re.escape("datum 0: teacher_prompt_len must be >= 0, got -1")
    ):
        sdft.build_topk_targets(
            student_data=[datum],
            completion_slices=[sdft.CompletionSlice([3, 4], -1)],
            teacher_topk_logprobs=[None],
        )
    with pytest.raises(
        TypeError, match=re.escape("datum 0: teacher_prompt_len must be an int, got str")
    ):
        sdft.build_topk_targets(
            student_data=[datum],
            completion_slices=[sdft.CompletionSlice([3, 4], "2")],
            teacher_topk_logprobs=[None],
        )


# ---------------------------------------------------------------------------------------------
# Dense arrays


@pytest.mark.parametrize(
    ("ids", "logprobs", "error", "message"),
    [
        (
            np.zeros((9, 3), np.uint8),
            np.zeros((9, 3), np.float32),
            TypeError,
            "datum 1: teacher token_ids dtype must be int32 or int64, got uint8",
        ),
        (
            np.zeros((9, 3), np.float32),
            np.zeros((9, 3), np.float32),
            TypeError,
            "datum 1: teacher token_ids dtype must be int32 or int64, got float32",
        ),
        (
            np.zeros((9, 3), np.int32),
            np.zeros((9, 3), np.float16),
            TypeError,
            "datum 1: teacher logprobs dtype must be float32 or float64, got float16",
        ),
        (
            np.zeros((9, 3), np.int32),
            np.zeros((9, 3), np.int32),
            TypeError,
            "datum 1: teacher logprobs dtype must be float32 or float64, got int32",
        ),
        (
            np.zeros((9, 3), np.dtype(">i4")),
            np.zeros((9, 3), np.float32),
            TypeError,
            "datum 1: teacher token_ids dtype must be int32 or int64, got >i4",
        ),
        (
            np.zeros(9, np.int32),
            np.zeros((9, 3), np.float32),
            ValueError,
            "datum 1: teacher token_ids must be 2-D (rows, K), got shape [9]",
        ),
        (
            np.zeros((9, 3, 1), np.int32),
            np.zeros((9, 3), np.float32),
            ValueError,
            "datum 1: teacher token_ids must be 2-D (rows, K), got shape [9, 3, 1]",
        ),
        (
            np.zeros((9, 3), np.int32),
            np.zeros((9, 2), np.float32),
            ValueError,
            "datum 1: teacher token_ids shape [9, 3] and logprobs shape [9, 2] differ",
        ),
        (
            [[0, 1]],
            np.zeros((1, 2), np.float32),
            TypeError,
            "datum 1: teacher token_ids must be a numpy array, got list",
        ),
    ],
)
def test_bad_dense_arrays(ids, logprobs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        batch(TopkLogprobs(token_ids=ids, logprobs=logprobs))


def test_empty_dense_shapes_are_missing_rows_not_errors():
    for shape in [(0, 3), (9, 0), (0, 0)]:
        datums, metrics = batch(
            TopkLogprobs(token_ids=np.zeros(shape, np.int32), logprobs=np.zeros(shape, np.float32))
        )
        assert not datums[1].loss_fn_inputs["weights"].to_numpy().any()
        assert (
            metrics["sdft/missing_teacher_rows"] == 4.0
        )  # datum 1's four positions (datum 0 is fine)


def test_sample_response_without_topk_is_a_missing_teacher():
    response = tinker.SampleResponse(sequences=[], topk_prompt_logprobs_np=None)
    datums, metrics = batch(response)
    assert not datums[1].loss_fn_inputs["weights"].to_numpy().any()
    assert metrics["sdft/missing_teacher_rows"] == 4.0
    assert metrics["sdft/distilled_positions"] == 2.0


def test_all_sentinel_rows_are_missing():
    ids = np.zeros((9, 3), np.int32)
    logprobs = np.full((9, 3), MASK_LOGPROB, np.float32)
    datums, metrics = batch(TopkLogprobs(token_ids=ids, logprobs=logprobs))
    assert metrics["sdft/missing_teacher_rows"] == 4.0
    assert not datums[1].loss_fn_inputs["weights"].to_numpy().any()


# ---------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"topk": 0}, ValueError, "topk must be between 1 and 4096, got 0"),
        ({"topk": -3}, ValueError, "topk must be between 1 and 4096, got -3"),
        ({"topk": 4097}, ValueError, "topk must be between 1 and 4096, got 4097"),
        ({"topk": 10**30}, ValueError, f"topk must be between 1 and 4096, got {10**30}"),
        ({"topk": 2.0}, TypeError, "topk must be an int, got float"),
        ({"topk": True}, TypeError, "topk must be an int, got bool"),
        ({"skip_first_n": -1}, ValueError, "skip_first_n must be >= 0, got -1"),
        ({"skip_first_n": None}, TypeError, "skip_first_n must be an int, got NoneType"),
        ({"vocab_size": 0}, ValueError, "vocab_size must be >= 1 (or None), got 0"),
        ({"vocab_size": "151000"}, TypeError, "vocab_size must be an int, got str"),
        (
            {"weight_scale": float("nan")},
            ValueError,
            "weight_scale must be a finite number >= 0, got nan",
        ),
        (
            {"weight_scale": float("inf")},
            ValueError,
            "weight_scale must be a finite number >= 0, got inf",
        ),
        ({"weight_scale": -1}, ValueError, "weight_scale must be a finite number >= 0, got -1.0"),
        ({"weight_scale": "1"}, TypeError, "weight_scale must be a number, got str"),
        ({"sparse": 1}, TypeError, "sparse must be a bool, got int"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        batch(None, **kwargs)


FLOAT32_MAX = float(np.finfo(np.float32).max)
WEIGHT_SCALE_LIMIT = (
    "weight_scale must be at most 3.4028234663852886e38 (the largest float32: weights are "
    "float32), got "
)


@pytest.mark.parametrize(
    ("weight_scale", "shown"),
    [
        (1e39, "1e39"),
        (float(np.nextafter(FLOAT32_MAX, math.inf)), "3.402823466385289e38"),
        (1.7976931348623157e308, "1.7976931348623157e308"),
    ],
)
def test_weight_scale_beyond_float32_is_rejected_not_turned_into_inf_weights(weight_scale, shown):
    # Defect #28: finite as a float64, but every weight of a probability-1 entry became inf.
    with pytest.raises(ValueError, match=re.escape(WEIGHT_SCALE_LIMIT + shown)):
        batch(dense_teacher(), weight_scale=weight_scale)
    with pytest.raises(ValueError, match=re.escape(WEIGHT_SCALE_LIMIT + shown)):
        batch(list_teacher((7, -0.5)), weight_scale=weight_scale, sparse=True)


def test_the_largest_float32_weight_scale_gives_finite_weights():
    rows = [[(3 * r, -1.1), (3 * r + 1, -1.2), (3 * r + 2, -2.3)] for r in range(9)]
    rows[6] = [(42, -0.25)]  # completion position 1: all the mass on one entry
    rows[7] = [(1, -0.5), (2, -0.5)]  # completion position 2: two equal entries
    for sparse in (False, True):
        datums, _ = batch(rows, weight_scale=FLOAT32_MAX, sparse=sparse, topk=3)
        weights = datums[1].loss_fn_inputs["weights"].to_numpy()
        assert np.all(np.isfinite(weights)) and weights.max() == np.float32(FLOAT32_MAX)
        if not sparse:
            np.testing.assert_array_equal(weights[3], [FLOAT32_MAX, 0, 0])
            np.testing.assert_array_equal(weights[4], [FLOAT32_MAX / 2, FLOAT32_MAX / 2, 0])


@pytest.mark.parametrize(
    ("value", "shown"),
    [(2**64, "18446744073709551616"), (2**63, "9223372036854775808"), (-(2**70), str(-(2**70)))],
)
def test_counts_beyond_int64_are_out_of_range_values_not_type_errors(value, shown):
    # Defect #28: an int >= 2**63 was reported as "must be an int, got int".
    mask = np.ones(3, np.float32)
    common = dict(topk=2, vocab_size=None, skip_first_n=0, weight_scale=1.0, sparse=False)
    for name, item in (
        ("completion_len", (mask, value, 0, None)),
        ("teacher_prompt_len", (mask, 3, value, None)),
    ):
        with pytest.raises(
            ValueError,
            match=re.escape(f"datum 0: {name} must be a non-negative int below 2**63, got {shown}"),
        ):
            _kernel.build_topk_batch([item], **common)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"datum 1: teacher_prompt_len must be a non-negative int below 2**63, got {shown}"
        ),
    ):
        sdft.build_topk_targets(
            student_data=[
                sdft.student_datum_from_rollout(
                    prompt=tinker.ModelInput.from_ints([1]), completion_tokens=[3, 4]
                )
            ]
            * 2,
            completion_slices=[
                sdft.CompletionSlice([3, 4], 1),
                sdft.CompletionSlice([3, 4], value),
            ],
            teacher_topk_logprobs=[None, None],
        )
    # The largest accepted count: far beyond every teacher, so nothing is read.
    datums, metrics = _kernel.build_topk_batch([(mask, 3, 2**63 - 1, [])], **common)
    assert metrics["missing_teacher_rows"] == 3 and not datums[0][1].any()


def test_huge_arguments_that_mean_no_limit_are_accepted():
    datums, metrics = batch(dense_teacher(), skip_first_n=10**30, vocab_size=10**30, topk=4096)
    assert metrics["sdft/skipped_positions"] == 6.0
    assert datums[1].loss_fn_inputs["weights"].shape == [6, 4096]
    datums, metrics = batch(dense_teacher(), vocab_size=10**30)
    assert metrics["sdft/distilled_positions"] == 6.0 and metrics["sdft/vocab_filtered_ids"] == 0.0


def test_env_thread_count_must_be_an_int(monkeypatch):
    monkeypatch.setenv("SDFT_KERNEL_THREADS", "two")
    with pytest.raises(
        ValueError, match=re.escape("SDFT_KERNEL_THREADS must be a non-negative int, got 'two'")
    ):
        batch(None)


# ---------------------------------------------------------------------------------------------
# The binding directly


def test_binding_rejects_malformed_items():
    mask = np.ones(3, np.float32)
    common = dict(topk=2, vocab_size=None, skip_first_n=0, weight_scale=1.0, sparse=False)
    with pytest.raises(
        TypeError,
        match=re.escape(
            "datum 0: expected a (mask, completion_len, teacher_prompt_len, teacher) tuple"
        ),
    ):
        _kernel.build_topk_batch([(mask, 3, 0)], **common)
    with pytest.raises(
        TypeError,
        match=re.escape("datum 0: mask must be a 1-D float32 numpy array, got a 1-D float64 array"),
    ):
        _kernel.build_topk_batch([(mask.astype(np.float64), 3, 0, None)], **common)
    with pytest.raises(
        TypeError, match=re.escape("datum 0: completion_len must be an int, got bool")
    ):
        _kernel.build_topk_batch([(mask, True, 0, None)], **common)
    with pytest.raises(ValueError, match=re.escape("datum 0: completion_len must be >= 0, got -2")):
        _kernel.build_topk_batch([(mask, -2, 0, None)], **common)
    with pytest.raises(
        TypeError,
        match=re.escape(
            "datum 0: dense teacher must be a (token_ids, logprobs) pair, got a tuple of 3"
        ),
    ):
        _kernel.build_topk_batch([(mask, 3, 0, (1, 2, 3))], **common)
    with pytest.raises(
        TypeError,
        match=re.escape(
            "datum 0: teacher must be None, a list of rows or a (token_ids, logprobs) tuple, got str"
        ),
    ):
        _kernel.build_topk_batch([(mask, 3, 0, "rows")], **common)


def test_absurd_output_size_is_a_value_error_not_a_memory_error():
    # A broadcast mask: 10^12 positions without the memory; the (N, 4096) output cannot exist.
    mask = np.broadcast_to(np.float32(1.0), (10**12,))
    with pytest.raises(
        ValueError,
        match=r"the batch's \(N, topk\) int64 target_tokens needs [0-9.]+ GiB, more than this machine's [0-9.]+ GiB of memory",
    ):
        _kernel.build_topk_batch(
            [(mask, 5, 0, None)],
            topk=4096,
            vocab_size=None,
            skip_first_n=0,
            weight_scale=1.0,
            sparse=False,
        )
