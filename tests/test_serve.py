"""``sdft serve`` driven by the stock ``tinker`` SDK: the whole training path over the wire gives
the same numbers as the local backend in-process (same model, seed and requests)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import tinker
import torch
from tinker import types
from tinker.types.topk_logprobs import MASK_LOGPROB

from serve_fixture import TINY, ServeProcess

VOCAB = 49152


def ce_datum(tokens: list[int], targets: np.ndarray, weights: np.ndarray) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(targets.astype(np.int64)),
            "weights": types.TensorData.from_numpy(weights.astype(np.float32)),
        },
    )


def batch(seed: int, n: int = 3, k: int | None = None) -> list[types.Datum]:
    """Random datums: 1-D targets, or (N, K) soft targets when ``k`` is given."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = 5 + 2 * i
        tokens = rng.integers(3, VOCAB, size=length).tolist()
        if k is None:
            targets = rng.integers(3, VOCAB, size=length)
            weights = rng.random(length).astype(np.float32)
        else:
            targets = rng.integers(3, VOCAB, size=(length, k))
            weights = rng.random((length, k)).astype(np.float32)
            weights[0] = 0.0
        out.append(ce_datum(tokens, targets, weights))
    return out


def sparse(datum: types.Datum) -> types.Datum:
    """The same datum with CSR targets and weights (only non-zero weights travel)."""
    targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].to_numpy())
    weights = torch.tensor(datum.loss_fn_inputs["weights"].to_numpy())
    mask = weights != 0
    return types.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_torch_sparse(targets * mask),
            "weights": types.TensorData.from_torch_sparse(weights),
        },
    )


def logprobs(output: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [o["logprobs"].to_numpy() for o in output.loss_fn_outputs]


def assert_same_output(
    wire: types.ForwardBackwardOutput, local: types.ForwardBackwardOutput
) -> None:
    assert set(wire.metrics) == set(local.metrics)
    assert wire.metrics["loss:sum"] == pytest.approx(local.metrics["loss:sum"], rel=1e-5)
    assert len(wire.loss_fn_outputs) == len(local.loss_fn_outputs)
    for w, lo in zip(logprobs(wire), logprobs(local), strict=True):
        assert w.shape == lo.shape and w.dtype == np.float32
        np.testing.assert_allclose(w, lo, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pair(serve_service: Any, local_service: Any) -> tuple[Any, Any]:
    """A LoRA student over the wire and the same student in-process (rank 4, seed 7)."""
    wire = serve_service.create_lora_training_client(TINY, rank=4, seed=7).result(timeout=300)
    local = local_service.create_lora_training_client(TINY, rank=4, seed=7).result(timeout=300)
    return wire, local


def test_training_path_equals_the_local_backend(pair: tuple[Any, Any]) -> None:
    wire, local = pair
    adam = types.AdamParams(learning_rate=1e-2)
    for step, data in enumerate([batch(0), batch(1, k=5), [sparse(d) for d in batch(2, k=5)]]):
        w_out = wire.forward_backward(data, "cross_entropy").result(timeout=120)
        l_out = local.forward_backward(data, "cross_entropy").result(timeout=120)
        assert_same_output(w_out, l_out)
        w_opt = wire.optim_step(adam).result(timeout=120)
        l_opt = local.optim_step(adam).result(timeout=120)
        assert w_opt.metrics is not None and l_opt.metrics is not None
        assert w_opt.metrics["optim/steps:max"] == step + 1
        assert w_opt.metrics["optim/grad_norm:mean"] == pytest.approx(
            l_opt.metrics["optim/grad_norm:mean"], rel=1e-4
        )
    # the trained weights agree: a forward pass after three steps gives the same log-probs
    probe = batch(3)
    assert_same_output(
        wire.forward(probe, "cross_entropy").result(timeout=120),
        local.forward(probe, "cross_entropy").result(timeout=120),
    )


def test_cross_entropy_is_a_raw_sum_with_loss_sum(pair: tuple[Any, Any]) -> None:
    wire, _ = pair
    data = batch(11, n=2, k=3)
    out = wire.forward(data, "cross_entropy").result(timeout=120)
    expected = sum(
        float(-(lp * d.loss_fn_inputs["weights"].to_numpy()).sum())
        for lp, d in zip(logprobs(out), data, strict=True)
    )
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [[5, 3], [7, 3]]


def test_importance_sampling_and_custom_loss_equal_local(pair: tuple[Any, Any]) -> None:
    wire, local = pair
    rng = np.random.default_rng(5)
    data = []
    for length in (4, 6):
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(rng.integers(3, VOCAB, length).tolist()),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(
                        rng.integers(3, VOCAB, length).astype(np.int64)
                    ),
                    "logprobs": types.TensorData.from_numpy(
                        -rng.random(length).astype(np.float32) * 10
                    ),
                    "advantages": types.TensorData.from_numpy(
                        rng.standard_normal(length).astype(np.float32)
                    ),
                },
            )
        )
    assert_same_output(
        wire.forward(data, "importance_sampling").result(timeout=120),
        local.forward(data, "importance_sampling").result(timeout=120),
    )

    ce = batch(21, n=2)

    def neg_ll(data: list[types.Datum], lps: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        loss = sum(
            -(lp * torch.tensor(d.loss_fn_inputs["weights"].to_numpy())).sum()
            for d, lp in zip(data, lps, strict=True)
        )
        return loss, {}

    custom = wire.forward_backward_custom(ce, neg_ll).result(timeout=120)
    reference = wire.forward(ce, "cross_entropy").result(timeout=120)
    assert custom.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
    wire.optim_step(types.AdamParams(learning_rate=0.0)).result(timeout=120)
    local.forward_backward_custom(ce, neg_ll).result(timeout=120)
    local.optim_step(types.AdamParams(learning_rate=0.0)).result(timeout=120)


def test_sampling_and_topk_prompt_logprobs_equal_local(
    serve_service: Any, local_service: Any, tiny_tokenizer: Any
) -> None:
    wire = serve_service.create_sampling_client(base_model=TINY).result(timeout=120)
    local = local_service.create_sampling_client(base_model=TINY).result(timeout=120)
    prompt = types.ModelInput.from_ints(tiny_tokenizer.encode("The capital of France is"))
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    kwargs = dict(include_prompt_logprobs=True, topk_prompt_logprobs=7)
    w = wire.sample(prompt, 2, greedy, **kwargs).result(timeout=120)
    lo = local.sample(prompt, 2, greedy, **kwargs).result(timeout=120)
    assert [s.tokens for s in w.sequences] == [s.tokens for s in lo.sequences]
    assert [s.stop_reason for s in w.sequences] == [s.stop_reason for s in lo.sequences]
    ids = [s.sequence_id for s in w.sequences]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == 2
    np.testing.assert_allclose(w.sequences[0].logprobs, lo.sequences[0].logprobs, atol=1e-5)
    assert w.prompt_logprobs[0] is None and lo.prompt_logprobs[0] is None
    np.testing.assert_allclose(w.prompt_logprobs[1:], lo.prompt_logprobs[1:], atol=1e-5)
    assert w.topk_prompt_logprobs[0] is None
    topk = w.topk_prompt_logprobs_np
    assert topk is not None and topk.token_ids.shape == (prompt.length, 7)
    assert (topk.token_ids[0] == 0).all() and (topk.logprobs[0] == MASK_LOGPROB).all()
    ref = lo.topk_prompt_logprobs_np
    np.testing.assert_array_equal(topk.token_ids, ref.token_ids)
    np.testing.assert_allclose(topk.logprobs, ref.logprobs, atol=1e-5)

    last = wire.sample(
        prompt, 1, greedy, include_prompt_logprobs=True, topk_prompt_logprobs=3,
        prompt_logprobs_last_n=2,
    ).result(timeout=120)  # fmt: skip
    assert all(v is None for v in last.prompt_logprobs[:-2])
    assert all(row is not None and len(row) == 3 for row in last.topk_prompt_logprobs[-2:])

    seeded = types.SamplingParams(max_tokens=5, temperature=1.0, seed=123)
    first = wire.sample(prompt, 1, seeded).result(timeout=120).sequences[0].tokens
    again = wire.sample(prompt, 1, seeded).result(timeout=120).sequences[0].tokens
    assert first == again == local.sample(prompt, 1, seeded).result(timeout=120).sequences[0].tokens
    logprobs_only = wire.compute_logprobs(prompt).result(timeout=120)
    assert logprobs_only[0] is None and len(logprobs_only) == prompt.length


def test_checkpoints_save_resume_and_sample_exactly(
    serve_server: ServeProcess, serve_service: Any
) -> None:
    client = serve_service.create_lora_training_client(TINY, rank=4, seed=3).result(timeout=300)
    adam = types.AdamParams(learning_rate=1e-2)
    client.forward_backward(batch(30), "cross_entropy").result(timeout=120)
    client.optim_step(adam).result(timeout=120)
    state = client.save_state("after-1").result(timeout=120).path
    sampler_path = client.save_weights_for_sampler("sampler-1").result(timeout=120).path
    run_id = client.model_id
    assert state == f"tinker://{run_id}/weights/after-1"
    assert sampler_path == f"tinker://{run_id}/sampler_weights/sampler-1"
    assert (serve_server.checkpoint_root / run_id / "weights" / "after-1").is_dir()

    snapshot = client.save_weights_and_get_sampling_client().result(timeout=120)
    client.forward_backward(batch(31), "cross_entropy").result(timeout=120)
    client.optim_step(adam).result(timeout=120)
    expected = client.forward(batch(32), "cross_entropy").result(timeout=120)

    resumed = serve_service.create_training_client_from_state_with_optimizer(state).result(
        timeout=300
    )
    resumed.forward_backward(batch(31), "cross_entropy").result(timeout=120)
    resumed.optim_step(adam).result(timeout=120)
    assert_same_output(resumed.forward(batch(32), "cross_entropy").result(timeout=120), expected)
    fresh = serve_service.create_training_client_from_state(state).result(timeout=300)
    assert fresh.get_info().lora_rank == 4

    from_path = serve_service.create_sampling_client(model_path=sampler_path).result(timeout=120)
    prompt = types.ModelInput.from_ints([1, 2, 3, 4, 5])
    params = types.SamplingParams(max_tokens=6, temperature=0.0)
    kw = dict(include_prompt_logprobs=True)
    a = from_path.sample(prompt, 1, params, **kw).result(timeout=120)
    b = snapshot.sample(prompt, 1, params, **kw).result(timeout=120)
    assert a.sequences[0].tokens == b.sequences[0].tokens
    np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], atol=1e-5)
    assert from_path.get_base_model() == TINY

    rest = tinker.RestClient(base_url=serve_server.url, api_key=serve_server.key)
    info = rest.get_weights_info_by_tinker_path(state).result(timeout=60)
    assert (info.base_model, info.is_lora, info.lora_rank) == (TINY, True, 4)
    listed = rest.list_checkpoints(run_id).result(timeout=60).checkpoints
    assert [(c.checkpoint_type, c.tinker_path) for c in listed] == [
        ("training", state),
        ("sampler", sampler_path),
    ]
    assert all(c.size_bytes and c.size_bytes > 0 for c in listed)


def test_get_info_and_tokenizer_work_offline(pair: tuple[Any, Any], tiny_tokenizer: Any) -> None:
    wire, _ = pair
    info = wire.get_info()
    assert info.model_data.model_name == TINY and info.is_lora and info.lora_rank == 4
    tokenizer = wire.get_tokenizer()
    assert tokenizer.encode("hello world") == tiny_tokenizer.encode("hello world")
    assert math.isfinite(len(tokenizer))
