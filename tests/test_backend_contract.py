"""The Tinker client contract, written once and run against every backend that can execute the
tiny test model (today: the local in-process backend).

A backend plugs in through the ``backend`` fixture: it provides a service client and a reference
copy of the base model's weights for direct torch computations.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import tinker
import torch
from tinker import types
from tinker.types.topk_logprobs import MASK_LOGPROB

from sdft.models import TINY_RANDOM_MODEL


@dataclass
class Backend:
    name: str
    service: Any = field(repr=False)
    model: str
    reference: Any = field(repr=False)  # HF model with the base weights, CPU float32

    def lora(self, seed: int = 0, rank: int = 4) -> Any:
        return self.service.create_lora_training_client(self.model, rank=rank, seed=seed).result()

    def full(self) -> Any:
        return self.service.create_full_training_client(self.model).result()

    def base_sampler(self) -> Any:
        return self.service.create_sampling_client(base_model=self.model).result()


@pytest.fixture(params=["local"])
def backend(
    request: pytest.FixtureRequest, local_service: Any, tiny_reference_model: Any
) -> Backend:
    if request.param == "local":
        return Backend("local", local_service, TINY_RANDOM_MODEL, tiny_reference_model)
    raise AssertionError(request.param)


VOCAB = 49152


# --- helpers ----------------------------------------------------------------------------------


def direct_logprob_rows(model: Any, tokens: list[int]) -> torch.Tensor:
    """Row j: log-softmax of the model's logits after tokens[: j + 1] (float32)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def ce_datum(tokens: list[int], targets: np.ndarray, weights: np.ndarray) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(targets.astype(np.int64)),
            "weights": types.TensorData.from_numpy(weights.astype(np.float32)),
        },
    )


def random_tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, VOCAB, size=n).tolist()


def logprobs_of(output: types.ForwardBackwardOutput, i: int) -> np.ndarray:
    return output.loss_fn_outputs[i]["logprobs"].to_numpy()


def prompt_of(tokenizer: Any, text: str) -> types.ModelInput:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    return types.ModelInput.from_ints(list(ids))


# --- futures ----------------------------------------------------------------------------------


def test_futures_behave_like_tinkers(backend: Backend) -> None:
    client_future = backend.service.create_lora_training_client(backend.model, rank=2, seed=0)
    assert isinstance(client_future, tinker.APIFuture)
    client = client_future.result(timeout=120)
    assert isinstance(client_future.future(), concurrent.futures.Future)
    datum = ce_datum([5, 6, 7], np.array([6, 7, 8]), np.ones(3))

    async def run() -> tuple[Any, Any, Any]:
        awaited = await client.forward([datum], "cross_entropy")
        via_result_async = await client.forward([datum], "cross_entropy").result_async(timeout=60)
        via_coroutine = await asyncio.create_task(
            client.forward([datum], "cross_entropy").coroutine()
        )
        return awaited, via_result_async, via_coroutine

    outputs = asyncio.run(run())
    for output in outputs:
        assert isinstance(output, types.ForwardBackwardOutput)
        np.testing.assert_array_equal(logprobs_of(output, 0), logprobs_of(outputs[0], 0))


# --- losses -----------------------------------------------------------------------------------


def test_cross_entropy_1d_loss_and_logprobs_equal_direct_torch(backend: Backend) -> None:
    client = backend.lora()
    rng = np.random.default_rng(0)
    datums, expected_loss, expected_lps = [], 0.0, []
    for length in (9, 14):
        tokens = random_tokens(rng, length)
        targets = rng.integers(0, VOCAB, size=length)
        weights = rng.uniform(0, 2, size=length) * (rng.uniform(size=length) > 0.3)
        rows = direct_logprob_rows(backend.reference, tokens)
        lp = rows[torch.arange(length), torch.from_numpy(targets)].numpy()
        expected_lps.append(lp)
        expected_loss += float(-(weights * lp).sum())
        datums.append(ce_datum(tokens, targets, weights))
    output = client.forward_backward(datums, "cross_entropy").result()
    assert output.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)
    for i, lp in enumerate(expected_lps):
        got = logprobs_of(output, i)
        assert got.dtype == np.float32 and got.shape == lp.shape
        np.testing.assert_allclose(got, lp, rtol=1e-5, atol=1e-5)


def test_cross_entropy_nk_soft_targets_equal_direct_torch(backend: Backend) -> None:
    client = backend.full()
    rng = np.random.default_rng(1)
    tokens = random_tokens(rng, 11)
    targets = rng.integers(0, VOCAB, size=(11, 4))
    weights = rng.dirichlet(np.ones(4), size=11)
    weights[:3] = 0.0  # prompt rows
    targets[:3] = 0
    rows = direct_logprob_rows(backend.reference, tokens)
    lp = rows.gather(1, torch.from_numpy(targets)).numpy()
    output = client.forward_backward([ce_datum(tokens, targets, weights)], "cross_entropy").result()
    np.testing.assert_allclose(logprobs_of(output, 0), lp, rtol=1e-5, atol=1e-5)
    assert logprobs_of(output, 0).shape == (11, 4)
    assert output.metrics["loss:sum"] == pytest.approx(float(-(weights * lp).sum()), rel=1e-5)


def test_sparse_csr_inputs_equal_dense(backend: Backend) -> None:
    client = backend.lora()
    rng = np.random.default_rng(2)
    tokens = random_tokens(rng, 16)
    targets = np.zeros((16, 3), dtype=np.int64)
    weights = np.zeros((16, 3), dtype=np.float32)
    targets[12:] = rng.integers(1, VOCAB, size=(4, 3))
    weights[12:] = rng.dirichlet(np.ones(3), size=4)
    dense = ce_datum(tokens, targets, weights)
    sparse = types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": torch.from_numpy(targets),
            "weights": torch.from_numpy(weights),
        },
    )
    assert sparse.loss_fn_inputs["weights"].sparse_crow_indices is not None
    out_dense = client.forward([dense], "cross_entropy").result()
    out_sparse = client.forward([sparse], "cross_entropy").result()
    np.testing.assert_array_equal(logprobs_of(out_dense, 0), logprobs_of(out_sparse, 0))
    assert out_dense.metrics["loss:sum"] == out_sparse.metrics["loss:sum"]


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo"])
def test_policy_losses_equal_their_formulas(backend: Backend, loss_fn: str) -> None:
    client = backend.lora()
    rng = np.random.default_rng(3)
    tokens = random_tokens(rng, 10)
    targets = rng.integers(0, VOCAB, size=10)
    lp = direct_logprob_rows(backend.reference, tokens)[torch.arange(10), torch.from_numpy(targets)]
    lp = lp.double().numpy()
    sampler_lp = lp + rng.normal(0, 0.3, size=10)
    advantages = rng.normal(size=10) * (np.arange(10) >= 4)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(targets.astype(np.int64)),
            "logprobs": types.TensorData.from_numpy(sampler_lp.astype(np.float32)),
            "advantages": types.TensorData.from_numpy(advantages.astype(np.float32)),
        },
    )
    ratio = np.exp(lp - sampler_lp.astype(np.float32))
    advantages = advantages.astype(np.float32)
    if loss_fn == "importance_sampling":
        expected = -(ratio * advantages).sum()
    elif loss_fn == "ppo":
        expected = -np.minimum(ratio * advantages, np.clip(ratio, 0.8, 1.2) * advantages).sum()
    else:
        expected = -(np.clip(ratio, 0.8, 1.2) * lp * advantages).sum()
    output = client.forward_backward([datum], loss_fn).result()
    assert output.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(logprobs_of(output, 0), lp, rtol=1e-5, atol=1e-5)


def test_custom_loss_sees_target_shaped_logprobs_and_trains_like_cross_entropy(
    backend: Backend,
) -> None:
    rng = np.random.default_rng(4)
    tokens = random_tokens(rng, 8)
    targets = rng.integers(0, VOCAB, size=(8, 2))
    weights = rng.uniform(0, 1, size=(8, 2))
    datum = ce_datum(tokens, targets, weights)
    expected_lp = direct_logprob_rows(backend.reference, tokens).gather(
        1, torch.from_numpy(targets)
    )
    seen: list[torch.Tensor] = []

    def loss_fn(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        seen.extend(lp.detach().clone() for lp in logprobs)
        assert all(lp.requires_grad for lp in logprobs)
        w = torch.from_numpy(data[0].loss_fn_inputs["weights"].to_numpy())
        loss = -(w * logprobs[0]).sum()
        return loss, {"custom_metric:sum": 7.0}

    custom = backend.lora(seed=5)
    plain = backend.lora(seed=5)
    out_custom = custom.forward_backward_custom([datum], loss_fn).result()
    out_plain = plain.forward_backward([datum], "cross_entropy").result()
    assert seen[0].shape == (8, 2)
    torch.testing.assert_close(seen[0], expected_lp, rtol=1e-5, atol=1e-5)
    assert out_custom.metrics["loss:sum"] == pytest.approx(out_plain.metrics["loss:sum"], rel=1e-6)
    assert out_custom.metrics["custom_metric:sum"] == 7.0
    adam = types.AdamParams(learning_rate=1e-2)
    custom.optim_step(adam).result()
    plain.optim_step(adam).result()
    after_custom = logprobs_of(custom.forward([datum], "cross_entropy").result(), 0)
    after_plain = logprobs_of(plain.forward([datum], "cross_entropy").result(), 0)
    np.testing.assert_allclose(after_custom, after_plain, rtol=1e-5, atol=1e-6)
    assert not np.allclose(after_custom, expected_lp.numpy(), atol=1e-3)


# --- accumulation and ordering ------------------------------------------------------------------


def test_gradients_accumulate_across_calls_until_optim_step(backend: Backend) -> None:
    rng = np.random.default_rng(6)
    d1 = ce_datum(random_tokens(rng, 7), rng.integers(0, VOCAB, 7), np.ones(7))
    d2 = ce_datum(random_tokens(rng, 12), rng.integers(0, VOCAB, 12), np.ones(12))
    probe = ce_datum(random_tokens(rng, 9), rng.integers(0, VOCAB, 9), np.ones(9))
    adam = types.AdamParams(learning_rate=5e-3, weight_decay=0.01)
    split, joined = backend.full(), backend.full()
    split.forward_backward([d1], "cross_entropy")
    split.forward_backward([d2], "cross_entropy")
    split.optim_step(adam)
    joined.forward_backward([d1, d2], "cross_entropy")
    joined.optim_step(adam)
    after_split = logprobs_of(split.forward([probe], "cross_entropy").result(), 0)
    after_joined = logprobs_of(joined.forward([probe], "cross_entropy").result(), 0)
    np.testing.assert_allclose(after_split, after_joined, rtol=1e-5, atol=1e-6)
    # Without the second call the step is different: the gradients really were summed.
    single = backend.full()
    single.forward_backward([d1], "cross_entropy")
    single.optim_step(adam)
    after_single = logprobs_of(single.forward([probe], "cross_entropy").result(), 0)
    assert np.abs(after_single - after_joined).max() > 1e-4


def test_requests_run_in_submission_order(backend: Backend) -> None:
    rng = np.random.default_rng(7)
    datum = ce_datum(random_tokens(rng, 10), rng.integers(0, VOCAB, 10), np.ones(10))
    client = backend.lora(seed=1)
    before = client.forward([datum], "cross_entropy")
    fb = client.forward_backward([datum], "cross_entropy")
    step = client.optim_step(types.AdamParams(learning_rate=1e-2))
    after = client.forward([datum], "cross_entropy")
    # Nothing awaited until here: each future still reflects its place in the queue.
    loss_before = before.result().metrics["loss:sum"]
    assert fb.result().metrics["loss:sum"] == pytest.approx(loss_before, rel=1e-6)
    assert isinstance(step.result(), types.OptimStepResponse)
    assert after.result().metrics["loss:sum"] < loss_before - 1e-3


# --- samplers -----------------------------------------------------------------------------------


def test_snapshot_sampler_is_frozen_and_inflight_follows(
    backend: Backend, tiny_tokenizer: Any
) -> None:
    client = backend.lora(seed=2)
    prompt = prompt_of(tiny_tokenizer, "Freeze me")
    snapshot = client.save_weights_and_get_sampling_client().result()
    inflight = client.save_weights_and_get_sampling_client(kind="inflight").result()
    before = snapshot.compute_logprobs(prompt).result()
    tokens = prompt.to_ints()
    datum = ce_datum(tokens, np.array([*tokens[1:], 2]), np.ones(len(tokens)))
    for _ in range(2):
        client.forward_backward([datum], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=5e-2))
    assert snapshot.compute_logprobs(prompt).result() == before
    later = client.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
    # The snapshot may run merged LoRA weights, the in-flight sampler the adapters: equal values,
    # float32 rounding apart.
    np.testing.assert_allclose(
        inflight.compute_logprobs(prompt).result()[1:], later[1:], rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(later[1:], before[1:], atol=1e-3)


def test_sampled_logprobs_equal_recomputed_logprobs(backend: Backend, tiny_tokenizer: Any) -> None:
    sampler = backend.base_sampler()
    prompt = prompt_of(tiny_tokenizer, "Tell me something")
    response = sampler.sample(
        prompt, 3, types.SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    ).result()
    assert len(response.sequences) == 3
    for sequence in response.sequences:
        assert sequence.tokens_np.dtype == np.int32 and sequence.logprobs_np.dtype == np.float32
        full = prompt.to_ints() + sequence.tokens
        rows = direct_logprob_rows(backend.reference, full)
        expected = [
            float(rows[len(prompt.to_ints()) - 1 + t, tok]) for t, tok in enumerate(sequence.tokens)
        ]
        np.testing.assert_allclose(sequence.logprobs, expected, rtol=1e-4, atol=1e-4)
        recomputed = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
        np.testing.assert_allclose(
            sequence.logprobs, recomputed[prompt.length :], rtol=1e-4, atol=1e-4
        )
    assert len({sequence.sequence_id for sequence in response.sequences}) == 3


def test_greedy_is_argmax_and_seeds_are_reproducible(backend: Backend, tiny_tokenizer: Any) -> None:
    sampler = backend.base_sampler()
    prompt = prompt_of(tiny_tokenizer, "Be greedy")
    greedy = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=5, temperature=0.0)).result()
    tokens = prompt.to_ints()
    for _ in range(5):
        tokens.append(int(direct_logprob_rows(backend.reference, tokens)[-1].argmax()))
    for sequence in greedy.sequences:
        assert sequence.tokens == tokens[prompt.length :]
    top1 = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=5, top_k=1, seed=3)).result()
    assert top1.sequences[0].tokens == tokens[prompt.length :]
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=1234)
    first = sampler.sample(prompt, 2, params).result()
    second = sampler.sample(prompt, 2, params).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in second.sequences]
    assert first.sequences[0].tokens != first.sequences[1].tokens
    other = sampler.sample(prompt, 2, params.model_copy(update={"seed": 99})).result()
    assert [s.tokens for s in other.sequences] != [s.tokens for s in first.sequences]


def test_stop_conditions_and_stop_reasons(backend: Backend, tiny_tokenizer: Any) -> None:
    sampler = backend.base_sampler()
    prompt = prompt_of(tiny_tokenizer, "Stop somewhere")
    greedy = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0)).result()
    path = greedy.sequences[0].tokens
    assert greedy.sequences[0].stop_reason == "length" and len(path) == 6
    # A stop token: generation ends on it and includes it.
    stop_id = path[2]
    stopped = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=6, temperature=0, stop=[stop_id])
    ).result()
    first_hit = path.index(stop_id)
    assert stopped.sequences[0].tokens == path[: first_hit + 1]
    assert stopped.sequences[0].stop_reason == "stop"
    # A stop string completed by the third token.
    text = tiny_tokenizer.decode(path[:3])
    needle = text[-2:] if len(text) >= 2 else text
    by_string = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=6, temperature=0, stop=[needle])
    ).result()
    assert by_string.sequences[0].stop_reason == "stop"
    assert needle in tiny_tokenizer.decode(by_string.sequences[0].tokens)
    assert by_string.sequences[0].tokens == path[: len(by_string.sequences[0].tokens)]
    # stop=[] disables everything, including EOS.
    eos = tiny_tokenizer.eos_token_id
    forced = sampler.sample(
        types.ModelInput.from_ints(prompt.to_ints()),
        1,
        types.SamplingParams(max_tokens=3, temperature=0, stop=[]),
    ).result()
    assert forced.sequences[0].stop_reason == "length" and len(forced.sequences[0].tokens) == 3
    assert isinstance(eos, int)


def test_prompt_logprobs_and_topk_follow_tinkers_alignment(
    backend: Backend, tiny_tokenizer: Any
) -> None:
    sampler = backend.base_sampler()
    prompt = prompt_of(tiny_tokenizer, "Score this prompt please")
    tokens = prompt.to_ints()
    k = 7
    response = sampler.sample(
        prompt,
        1,
        types.SamplingParams(max_tokens=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=k,
    ).result()
    rows = direct_logprob_rows(backend.reference, tokens)
    plp = response.prompt_logprobs_np
    assert plp.dtype == np.float32 and plp.shape == (len(tokens),) and math.isnan(plp[0])
    expected = np.array([float(rows[i - 1, tokens[i]]) for i in range(1, len(tokens))])
    np.testing.assert_allclose(plp[1:], expected, rtol=1e-5, atol=1e-5)
    assert response.prompt_logprobs[0] is None
    topk = response.topk_prompt_logprobs_np
    assert topk.token_ids.dtype == np.int32 and topk.logprobs.dtype == np.float32
    assert topk.token_ids.shape == (len(tokens), k)
    assert topk.token_ids[0].tolist() == [0] * k and topk.logprobs[0].tolist() == [MASK_LOGPROB] * k
    for i in range(1, len(tokens)):
        values, ids = torch.topk(rows[i - 1], k)
        assert topk.token_ids[i].tolist() == ids.tolist()
        np.testing.assert_allclose(topk.logprobs[i], values.numpy(), rtol=1e-5, atol=1e-5)
    assert response.topk_prompt_logprobs[0] is None
    assert response.topk_prompt_logprobs[3][0][0] == int(topk.token_ids[3, 0])


def test_prompt_logprobs_last_n_leaves_earlier_rows_empty(
    backend: Backend, tiny_tokenizer: Any
) -> None:
    sampler = backend.base_sampler()
    prompt = prompt_of(tiny_tokenizer, "Only the tail")
    n = prompt.length
    full = sampler.sample(
        prompt,
        1,
        types.SamplingParams(max_tokens=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
    ).result()
    tail = sampler.sample(
        prompt,
        1,
        types.SamplingParams(max_tokens=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
        prompt_logprobs_last_n=4,
    ).result()
    assert np.isnan(tail.prompt_logprobs_np[: n - 4]).all()
    np.testing.assert_allclose(
        tail.prompt_logprobs_np[n - 4 :], full.prompt_logprobs_np[n - 4 :], rtol=1e-5, atol=1e-6
    )
    assert (tail.topk_prompt_logprobs_np.logprobs[: n - 4] == MASK_LOGPROB).all()
    np.testing.assert_array_equal(
        tail.topk_prompt_logprobs_np.token_ids[n - 4 :],
        full.topk_prompt_logprobs_np.token_ids[n - 4 :],
    )
    listed = sampler.compute_logprobs(prompt, prompt_logprobs_last_n=4).result()
    assert listed[: n - 4] == [None] * (n - 4) and all(v is not None for v in listed[n - 4 :])


def test_concurrent_requests_equal_sequential_ones(backend: Backend, tiny_tokenizer: Any) -> None:
    sampler = backend.base_sampler()
    prompts = [prompt_of(tiny_tokenizer, f"Question number {i} " + "x" * (3 * i)) for i in range(5)]
    prompts.append(types.ModelInput.from_ints([*prompts[0].to_ints(), 300, 400, 500]))

    def request(prompt: types.ModelInput) -> Any:
        return sampler.sample(
            prompt,
            2,
            types.SamplingParams(max_tokens=4, temperature=0.0),
            include_prompt_logprobs=True,
            topk_prompt_logprobs=4,
        )

    sequential = [request(p).result() for p in prompts]

    async def together() -> list[types.SampleResponse]:
        return await asyncio.gather(*(request(p).coroutine() for p in prompts))

    concurrent_responses = asyncio.run(together())
    for one, other in zip(sequential, concurrent_responses, strict=True):
        assert [s.tokens for s in one.sequences] == [s.tokens for s in other.sequences]
        np.testing.assert_allclose(
            one.prompt_logprobs_np, other.prompt_logprobs_np, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_array_equal(
            one.topk_prompt_logprobs_np.token_ids, other.topk_prompt_logprobs_np.token_ids
        )


# --- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_save_state_and_resume_with_optimizer_is_bit_exact(backend: Backend, kind: str) -> None:
    rng = np.random.default_rng(8)
    data = [
        ce_datum(random_tokens(rng, 10), rng.integers(0, VOCAB, 10), np.ones(10)) for _ in range(2)
    ]
    adam = types.AdamParams(learning_rate=1e-2, weight_decay=0.1)
    original = backend.lora(seed=3) if kind == "lora" else backend.full()
    for datum in data:
        original.forward_backward([datum], "cross_entropy")
        original.optim_step(adam)
    saved = original.save_state(f"resume-{kind}").result()
    assert isinstance(saved, types.SaveWeightsResponse)
    restored = backend.service.create_training_client_from_state_with_optimizer(saved.path).result()
    probe = data[0]
    np.testing.assert_array_equal(
        logprobs_of(original.forward([probe], "cross_entropy").result(), 0),
        logprobs_of(restored.forward([probe], "cross_entropy").result(), 0),
    )
    for client in (original, restored):
        client.forward_backward([data[1]], "cross_entropy")
        client.optim_step(adam)
    np.testing.assert_array_equal(
        logprobs_of(original.forward([probe], "cross_entropy").result(), 0),
        logprobs_of(restored.forward([probe], "cross_entropy").result(), 0),
    )
    # A fresh optimizer (weights only) takes a different second step.
    fresh = backend.service.create_training_client_from_state(saved.path).result()
    fresh.forward_backward([data[1]], "cross_entropy")
    fresh.optim_step(adam)
    assert not np.array_equal(
        logprobs_of(fresh.forward([probe], "cross_entropy").result(), 0),
        logprobs_of(restored.forward([probe], "cross_entropy").result(), 0),
    )


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_sampler_checkpoint_samples_like_the_trained_weights(
    backend: Backend, kind: str, tiny_tokenizer: Any
) -> None:
    client = backend.lora(seed=4) if kind == "lora" else backend.full()
    prompt = prompt_of(tiny_tokenizer, "Checkpoint me")
    tokens = prompt.to_ints()
    client.forward_backward(
        [ce_datum(tokens, np.array([*tokens[1:], 2]), np.ones(len(tokens)))], "cross_entropy"
    )
    client.optim_step(types.AdamParams(learning_rate=1e-2))
    saved = client.save_weights_for_sampler("sampler").result()
    assert isinstance(saved, types.SaveWeightsForSamplerResponse)
    assert saved.path.endswith("/sampler_weights/sampler")
    from_path = client.create_sampling_client(saved.path).result()
    snapshot = client.save_weights_and_get_sampling_client().result()
    np.testing.assert_allclose(
        from_path.compute_logprobs(prompt).result()[1:],
        snapshot.compute_logprobs(prompt).result()[1:],
        rtol=1e-5,
        atol=1e-5,
    )


def test_get_info_and_tokenizer(backend: Backend) -> None:
    client = backend.lora(rank=3)
    info = client.get_info()
    assert isinstance(info, types.GetInfoResponse)
    assert info.is_lora is True and info.lora_rank == 3
    assert info.model_data.model_name == backend.model and info.model_id == client.model_id
    assert client.get_tokenizer().eos_token == "<|im_end|>"
    full_info = backend.full().get_info()
    assert full_info.is_lora is False and full_info.lora_rank is None


# --- bad input ----------------------------------------------------------------------------------


def _bad(
    client: Any, datum: types.Datum, loss_fn: str = "cross_entropy", config: Any = None
) -> None:
    client.forward_backward([datum], loss_fn, config).result()


def test_bad_training_inputs_are_rejected_like_the_service(backend: Backend) -> None:
    client = backend.lora()
    tokens = [5, 6, 7, 8]
    good = ce_datum(tokens, np.array([6, 7, 8, 9]), np.ones(4))
    with_mask = types.Datum(
        model_input=good.model_input,
        loss_fn_inputs={
            **good.loss_fn_inputs,
            "mask": types.TensorData.from_numpy(np.ones(4, np.float32)),
        },
    )
    with pytest.raises(
        tinker.BadRequestError, match=r"datum 0: .*unknown loss_fn_inputs key\(s\) \['mask'\]"
    ):
        _bad(client, with_mask)
    with pytest.raises(ValueError, match=r"missing \['weights'\]"):
        _bad(
            client,
            types.Datum(
                model_input=good.model_input,
                loss_fn_inputs={"target_tokens": good.loss_fn_inputs["target_tokens"]},
            ),
        )
    with pytest.raises(
        ValueError, match=r"datum 0: loss_fn_inputs\['weights'\] has dtype int64, expected float32"
    ):
        _bad(
            client,
            types.Datum(
                model_input=good.model_input,
                loss_fn_inputs={
                    "target_tokens": good.loss_fn_inputs["target_tokens"],
                    "weights": types.TensorData.from_numpy(np.ones(4, np.int64)),
                },
            ),
        )
    with pytest.raises(
        ValueError, match=r"target_tokens has shape \(3,\), expected \(4,\) or \(4, K\)"
    ):
        _bad(client, ce_datum(tokens, np.array([6, 7, 8]), np.ones(3)))
    with pytest.raises(
        ValueError, match=r"weights has shape \(4, 2\), expected the shape of target_tokens \(4,\)"
    ):
        _bad(client, ce_datum(tokens, np.array([6, 7, 8, 9]), np.ones((4, 2))))
    with pytest.raises(
        ValueError, match=rf"target_tokens\[2\] = {VOCAB} is outside the vocabulary \[0, {VOCAB}\)"
    ):
        _bad(client, ce_datum(tokens, np.array([6, 7, VOCAB, 9]), np.ones(4)))
    with pytest.raises(
        ValueError, match=rf"token id {VOCAB + 5} at position 1 is outside the vocabulary"
    ):
        _bad(client, ce_datum([5, VOCAB + 5, 7, 8], np.array([6, 7, 8, 9]), np.ones(4)))
    with pytest.raises(ValueError, match=r"weights\[1\] = nan is not finite"):
        _bad(client, ce_datum(tokens, np.array([6, 7, 8, 9]), np.array([1, np.nan, 1, 1])))
    with pytest.raises(ValueError, match=r"exceed the model's context window of 1024"):
        _bad(client, ce_datum([5] * 1025, np.full(1025, 6), np.ones(1025)))
    with pytest.raises(ValueError, match=r"chunk 1 has empty tokens list"):
        _bad(
            client,
            types.Datum(
                model_input=types.ModelInput(
                    chunks=[
                        types.EncodedTextChunk(tokens=[5, 6]),
                        types.EncodedTextChunk(tokens=[]),
                    ]
                ),
                loss_fn_inputs={
                    "target_tokens": np.array([6, 7]),
                    "weights": np.ones(2, np.float32),
                },
            ),
        )
    with pytest.raises(ValueError, match=r"unknown loss_fn 'mse'"):
        _bad(client, good, "mse")
    with pytest.raises(
        ValueError, match=r"loss_fn_config key 'beta' is not understood by loss_fn 'cross_entropy'"
    ):
        _bad(client, good, config={"beta": 0.1})
    with pytest.raises(ValueError, match="No data provided"):
        client.forward_backward([], "cross_entropy")
    # A rejected request does not disturb the next one.
    assert client.forward_backward([good], "cross_entropy").result().metrics["loss:sum"] > 0


def test_bad_sampling_requests_are_rejected(backend: Backend, tiny_tokenizer: Any) -> None:
    sampler = backend.base_sampler()
    prompt = prompt_of(tiny_tokenizer, "hi")
    params = types.SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match=r"prompt: model_input is empty"):
        sampler.sample(types.ModelInput.empty(), 1, params).result()
    with pytest.raises(
        ValueError,
        match=r"prompt \(1000 tokens\) \+ max_tokens \(100\) exceeds the model's context window of 1024",
    ):
        sampler.sample(
            types.ModelInput.from_ints([5] * 1000), 1, types.SamplingParams(max_tokens=100)
        ).result()
    with pytest.raises(ValueError, match=r"token id -1 at position 0 is outside the vocabulary"):
        sampler.sample(types.ModelInput.from_ints([-1, 5]), 1, params).result()
    with pytest.raises(ValueError, match=r"num_samples must be >= 1"):
        sampler.sample(prompt, 0, params).result()
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, top_p=0.0)).result()
    with pytest.raises(ValueError, match=r"top_k must be -1 \(no limit\) or >= 1"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, top_k=0)).result()
    with pytest.raises(ValueError, match=r"temperature must be >= 0"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, temperature=-1)).result()
    with pytest.raises(ValueError, match=r"prompt_logprobs_last_n must be in \[1, "):
        sampler.sample(
            prompt, 1, params, include_prompt_logprobs=True, prompt_logprobs_last_n=prompt.length
        ).result()
    with pytest.raises(ValueError, match=r"stop token id 99999999 is outside the vocabulary"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, stop=[99999999])).result()
    with pytest.raises(ValueError, match="Either model_path or base_model must be provided"):
        backend.service.create_sampling_client()
