"""Many clients at once on one ``sdft serve``: sessions, training clients and samplers run
concurrently; one training client's requests run in arrival order; nobody sees anyone else's
state. Every result equals the same work done alone, in-process, on the local backend."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np
import pytest
import tinker
from tinker import types

from serve_fixture import TINY, ServeProcess

VOCAB = 49152
ADAM = types.AdamParams(learning_rate=2e-2)


def data(seed: int) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for length in (4, 7):
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(rng.integers(3, VOCAB, length).tolist()),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(
                        rng.integers(3, VOCAB, (length, 3)).astype(np.int64)
                    ),
                    "weights": types.TensorData.from_numpy(
                        rng.random((length, 3)).astype(np.float32)
                    ),
                },
            )
        )
    return out


def run_student(service: Any, seed: int) -> dict[str, Any]:
    """Three pipelined steps (everything submitted before anything is awaited), then a probe."""
    client = service.create_lora_training_client(TINY, rank=4, seed=seed).result(timeout=300)
    futures = []
    for step in range(3):
        futures.append(client.forward_backward(data(100 * seed + step), "cross_entropy"))
        futures.append(client.optim_step(ADAM))
    probe = client.forward(data(999), "cross_entropy")
    losses = [f.result(timeout=300).metrics["loss:sum"] for f in futures[::2]]
    sampler = client.save_weights_and_get_sampling_client().result(timeout=120)
    prompt = types.ModelInput.from_ints([1, 2, 3, 4, 5, 6])
    samples = [
        sampler.sample(prompt, 2, types.SamplingParams(max_tokens=6, temperature=1.0, seed=s))
        for s in range(3)
    ]
    return {
        "losses": losses,
        "probe": [o["logprobs"].to_numpy() for o in probe.result(timeout=300).loss_fn_outputs],
        "tokens": [[q.tokens for q in f.result(timeout=300).sequences] for f in samples],
    }


def test_concurrent_sessions_equal_each_run_alone(
    serve_server: ServeProcess, local_service: Any
) -> None:
    seeds = [1, 2, 3]
    services = [
        tinker.ServiceClient(base_url=serve_server.url, api_key=serve_server.key) for _ in seeds
    ]
    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        wire = list(pool.map(run_student, services, seeds))
    for seed, result in zip(seeds, wire, strict=True):
        alone = run_student(local_service, seed)
        np.testing.assert_allclose(result["losses"], alone["losses"], rtol=1e-5)
        for a, b in zip(result["probe"], alone["probe"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert result["tokens"] == alone["tokens"]
    # each seed trained its own adapter: nobody received anyone else's updates
    assert not np.allclose(wire[0]["probe"][0], wire[1]["probe"][0])


def test_one_clients_requests_run_in_arrival_order(serve_service: Any) -> None:
    client = serve_service.create_lora_training_client(TINY, rank=4, seed=9).result(timeout=300)
    before = client.forward(data(5), "cross_entropy")
    client.forward_backward(data(6), "cross_entropy")
    client.optim_step(ADAM)
    after = client.forward(data(5), "cross_entropy")
    saved = client.save_state("ordered")
    again = client.forward(data(5), "cross_entropy")
    a = before.result(timeout=300).metrics["loss:sum"]
    b = after.result(timeout=300).metrics["loss:sum"]
    assert b != pytest.approx(a)  # the optimizer step ran between the two forwards
    assert again.result(timeout=300).metrics["loss:sum"] == b
    assert saved.result(timeout=300).path.endswith("/weights/ordered")
