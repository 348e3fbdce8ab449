"""Benchmarks of `sdft.build_topk_targets`: teacher top-K responses -> finished `tinker.Datum`s.

Run: ``python -m pytest benches/bench_kernel.py --benchmark-only`` (the per-position table is
printed at the end by benches/conftest.py).

Recipe scale: B = 64 rollouts, completion 1024 tokens, student prompt 150, teacher prompt 600,
K = 20, vocab 151,000 (65,536 completion positions per batch), plus a 1M-position batch. Compared in
one run: the Rust kernel from dense arrays (auto threads and 1 thread) and from the list view, the
plain-Python reference (on a 2-datum slice) and a vectorized numpy implementation written here.
All of them produce the same datums (checked once before timing). Peak memory is measured in a
fresh process from the kernel-reported RSS high-water mark (tracemalloc cannot see Rust
allocations).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tinker
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs, topk_to_lists

import sdft
from sdft.reference import reference_topk_targets

COMPLETION = 1024
STUDENT_PROMPT = 150
TEACHER_PROMPT = 600
TOPK = 20
VOCAB = 151_000


def make_batch(num_datums: int, seed: int = 0):
    """Student datums, completion slices and dense teacher responses shaped like the recipe's:
    teacher rows sorted by log-prob, a few ids beyond the student vocabulary, row 0 empty."""
    rng = np.random.default_rng(seed)
    student_data, slices, teachers = [], [], []
    for _ in range(num_datums):
        completion = rng.integers(0, VOCAB, COMPLETION)
        prompt = tinker.ModelInput.from_ints(rng.integers(0, VOCAB, STUDENT_PROMPT).tolist())
        student_data.append(
            sdft.student_datum_from_rollout(prompt=prompt, completion_tokens=completion)
        )
        slices.append(
            sdft.CompletionSlice(tokens=completion.tolist(), teacher_prompt_len=TEACHER_PROMPT)
        )
        rows = TEACHER_PROMPT + COMPLETION
        ids = rng.integers(0, VOCAB + 300, (rows, TOPK), dtype=np.int64).astype(np.int32)
        logprobs = -np.sort(rng.exponential(2.0, (rows, TOPK)), axis=1).astype(np.float32)
        ids[0], logprobs[0] = 0, MASK_LOGPROB
        teachers.append(TopkLogprobs(token_ids=ids, logprobs=logprobs))
    return student_data, slices, teachers


def numpy_topk_targets(
    student_data, completion_slices, teachers, topk=TOPK, vocab_size=VOCAB, skip_first_n=3
):
    """A vectorized numpy version of build_topk_targets (dense input only, no validation)."""
    datums = []
    for datum, completion_slice, teacher in zip(
        student_data, completion_slices, teachers, strict=True
    ):
        rows = datum.model_input.length
        target_tokens = np.zeros((rows, topk), np.int64)
        weights = np.zeros((rows, topk), np.float32)
        positions = np.flatnonzero(datum.loss_fn_inputs["mask"].to_numpy() > 0)
        n = min(len(completion_slice.tokens), positions.size)
        t = np.arange(min(skip_first_n, n), n)
        teacher_rows = completion_slice.teacher_prompt_len + t
        inside = teacher_rows < teacher.token_ids.shape[0]
        t, teacher_rows = t[inside], teacher_rows[inside]
        ids = teacher.token_ids[teacher_rows].astype(np.int64)
        logprobs = teacher.logprobs[teacher_rows].astype(np.float64)
        width = ids.shape[1]
        sentinel = (ids == 0) & (logprobs == MASK_LOGPROB)
        trailing = np.cumprod(sentinel[:, ::-1], axis=1).sum(axis=1)
        entries = np.where(sentinel[:, 0], 0, width - trailing)
        columns = np.arange(width)
        keep = (columns < np.minimum(entries, topk)[:, None]) & (ids < vocab_size)
        # Left-align the kept entries (stable, so their order is preserved).
        order = np.argsort(~keep, axis=1, kind="stable")[:, :topk]
        ids = np.take_along_axis(ids, order, axis=1)
        logprobs = np.take_along_axis(logprobs, order, axis=1)
        keep = np.take_along_axis(keep, order, axis=1)
        has_any = keep.any(axis=1)
        shifted = np.where(keep, logprobs, -np.inf)
        shifted -= np.where(has_any, shifted.max(axis=1), 0.0)[:, None]
        exps = np.where(keep, np.exp(shifted), 0.0)
        probabilities = exps / np.where(has_any, exps.sum(axis=1), 1.0)[:, None]
        student_rows = positions[t[has_any]]
        k = ids.shape[1]
        target_tokens[student_rows, :k] = np.where(keep, ids, 0)[has_any]
        weights[student_rows, :k] = probabilities[has_any]
        datums.append(
            tinker.Datum(
                model_input=datum.model_input,
                loss_fn_inputs={
                    "target_tokens": tinker.TensorData(
                        data=target_tokens, dtype="int64", shape=[rows, topk]
                    ),
                    "weights": tinker.TensorData(data=weights, dtype="float32", shape=[rows, topk]),
                },
            )
        )
    return datums


@pytest.fixture(scope="module")
def recipe_batch():
    student_data, slices, teachers = make_batch(64)
    datums, _ = sdft.build_topk_targets(
        student_data=student_data,
        completion_slices=slices,
        teacher_topk_logprobs=teachers,
        topk=TOPK,
        vocab_size=VOCAB,
    )
    # Every contender must produce the same datums as the kernel.
    for theirs, ours in zip(
        numpy_topk_targets(student_data, slices, teachers), datums, strict=True
    ):
        for key in ("target_tokens", "weights"):
            np.testing.assert_allclose(
                theirs.loss_fn_inputs[key].to_numpy(),
                ours.loss_fn_inputs[key].to_numpy(),
                atol=1e-6,
            )
    return student_data, slices, teachers


@pytest.fixture(scope="module")
def recipe_lists(recipe_batch):
    return [topk_to_lists(teacher) for teacher in recipe_batch[2]]


def run_kernel(benchmark, student_data, slices, teachers, *, rounds=15, threads=None, **kwargs):
    positions = len(student_data) * COMPLETION
    benchmark.extra_info["positions"] = positions
    previous = os.environ.get("SDFT_KERNEL_THREADS")
    if threads is not None:
        os.environ["SDFT_KERNEL_THREADS"] = str(threads)
    try:
        datums, metrics = benchmark.pedantic(
            sdft.build_topk_targets,
            kwargs=dict(
                student_data=student_data,
                completion_slices=slices,
                teacher_topk_logprobs=teachers,
                topk=TOPK,
                vocab_size=VOCAB,
                **kwargs,
            ),
            rounds=rounds,
            warmup_rounds=2,
        )
    finally:
        if threads is not None:
            if previous is None:
                os.environ.pop("SDFT_KERNEL_THREADS", None)
            else:
                os.environ["SDFT_KERNEL_THREADS"] = previous
    assert len(datums) == len(student_data)
    assert metrics["sdft/total_completion_tokens"] == positions


@pytest.mark.benchmark(group="topk-targets-recipe")
def test_rust_dense(benchmark, recipe_batch):
    run_kernel(benchmark, *recipe_batch, rounds=30)


@pytest.mark.benchmark(group="topk-targets-recipe")
def test_rust_dense_one_thread(benchmark, recipe_batch):
    run_kernel(benchmark, *recipe_batch, rounds=30, threads=1)


@pytest.mark.benchmark(group="topk-targets-recipe")
def test_rust_dense_sparse_output(benchmark, recipe_batch):
    run_kernel(benchmark, *recipe_batch, rounds=30, sparse=True)


@pytest.mark.benchmark(group="topk-targets-recipe")
def test_rust_list_input(benchmark, recipe_batch, recipe_lists):
    student_data, slices, _ = recipe_batch
    run_kernel(benchmark, student_data, slices, recipe_lists, rounds=10)


@pytest.mark.benchmark(group="topk-targets-recipe")
def test_numpy_vectorized(benchmark, recipe_batch):
    student_data, slices, teachers = recipe_batch
    benchmark.extra_info["positions"] = len(student_data) * COMPLETION
    benchmark.pedantic(
        numpy_topk_targets, args=(student_data, slices, teachers), rounds=8, warmup_rounds=1
    )


@pytest.mark.benchmark(group="topk-targets-recipe")
def test_python_reference_two_datums(benchmark, recipe_batch, recipe_lists):
    student_data, slices, _ = recipe_batch
    benchmark.extra_info["positions"] = 2 * COMPLETION
    outputs, _ = benchmark.pedantic(
        reference_topk_targets,
        kwargs=dict(
            student_data=student_data[:2],
            completion_slices=slices[:2],
            teacher_topk_logprobs=recipe_lists[:2],
            topk=TOPK,
            vocab_size=VOCAB,
        ),
        rounds=3,
        warmup_rounds=0,
    )
    assert len(outputs) == 2


@pytest.mark.parametrize("num_datums", [16, 256])
@pytest.mark.benchmark(group="topk-targets-scaling")
def test_rust_dense_scaling(benchmark, num_datums):
    run_kernel(benchmark, *make_batch(num_datums, seed=num_datums), rounds=10)


@pytest.mark.benchmark(group="topk-targets-scaling")
def test_rust_dense_one_million_positions(benchmark):
    run_kernel(benchmark, *make_batch(1024, seed=1), rounds=3)


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {bench_dir!r})
    import bench_kernel as b
    import sdft
    from tinker.types.topk_logprobs import topk_to_lists

    def status():
        fields = {{}}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    student_data, slices, teachers = b.make_batch(64)
    if {form!r} == "list":
        teachers = [topk_to_lists(t) for t in teachers]
    build = lambda: sdft.build_topk_targets(
        student_data=student_data, completion_slices=slices, teacher_topk_logprobs=teachers,
        topk=b.TOPK, vocab_size=b.VOCAB, sparse={sparse!r})
    build()  # warm up: first-call imports and allocator state (the result is dropped)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the RSS high-water mark
    before = status()["VmRSS"]
    datums, _ = build()
    peak = status()["VmHWM"]
    output = 0
    for datum in datums:
        for tensor in datum.loss_fn_inputs.values():
            output += tensor._numpy.nbytes
            if tensor.sparse_crow_indices is not None:
                output += tensor.sparse_crow_indices.nbytes + tensor.sparse_col_indices.nbytes
    if {sparse!r}:
        # The two CSR tensors of a datum share their index arrays: count them once.
        output -= sum(d.loss_fn_inputs["weights"].sparse_crow_indices.nbytes
                      + d.loss_fn_inputs["weights"].sparse_col_indices.nbytes for d in datums)
    print(json.dumps({{"peak_increase": peak - before, "output_bytes": output}}))
    """
)


@pytest.mark.parametrize(("form", "sparse"), [("dense", False), ("list", False), ("dense", True)])
@pytest.mark.benchmark(group="topk-targets-memory")
def test_peak_memory(benchmark, form, sparse):
    """Peak RSS growth during one recipe-scale call, relative to the output it returns."""

    def probe():
        script = MEMORY_PROBE.format(bench_dir=os.path.dirname(__file__), form=form, sparse=sparse)
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
        )
        return json.loads(result.stdout.strip().splitlines()[-1])

    measured = benchmark.pedantic(probe, rounds=1, iterations=1)
    ratio = measured["peak_increase"] / measured["output_bytes"]
    benchmark.extra_info.update(measured, peak_over_output=round(ratio, 3))
    assert ratio <= 1.2, measured
