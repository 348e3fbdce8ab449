"""Wire overhead of ``sdft serve``: one SDFT step on the embedded SmolLM2-135M-Instruct (LoRA
r16), in-process on the local backend and through a stock ``tinker.ServiceClient`` talking to
``sdft serve`` on the same machine, side by side in one run.

The step is ``bench_step.LocalSDFT``'s (sample 4 × 64 tokens, teacher top-20 scoring,
``build_topk_targets``, ``forward_backward`` + ``optim_step``, sampler refresh); over the wire every
one of its requests goes through HTTP, protobuf/JSON and ``retrieve_future`` polling. The server
runs in a subprocess with the same device and dtype; the two cases alternate step by step, so
both see the same load on a shared machine.

    python -m pytest benches/bench_wire.py -p no:cacheprovider -s --benchmark-columns=mean,min,max,rounds

``SDFT_BENCH_ROUNDS`` (default 3) sets the measured steps per case; one warm-up step runs first.
The printed table gives each case's mean and min step time and the wire / in-process ratios.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bench_step import COMPLETION_TOKENS, QUESTIONS, ROUNDS, THREADS, LocalSDFT
from sdft.backends.local import LocalServiceClient
from sdft.models import DEFAULT_MODEL, TINY_RANDOM_MODEL

KEY = "tml-sdft-bench-wire-key"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("wire-checkpoints")
    command = [
        sys.executable, "-m", "sdft.serve", "--port", "0", "--device", "cpu",
        "--checkpoint-root", str(root), "--models", DEFAULT_MODEL, TINY_RANDOM_MODEL,
    ]  # fmt: skip
    env = {**os.environ, "SDFT_SERVE_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if "listening on" in line:
                found.append(line.split("listening on ", 1)[1].strip())
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(300) or not found:
        process.kill()
        raise RuntimeError("sdft serve did not start")
    yield found[0]
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def tiny_clients(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    import tinker

    wire = tinker.ServiceClient(base_url=server_url, api_key=KEY)
    with LocalServiceClient(tmp_path_factory.mktemp("tiny"), device="cpu") as local:
        yield {
            "in-process": local.create_lora_training_client(
                TINY_RANDOM_MODEL, rank=4, seed=0
            ).result(),
            "over sdft serve": wire.create_lora_training_client(
                TINY_RANDOM_MODEL, rank=4, seed=0
            ).result(),
        }


@pytest.mark.parametrize("case", ["in-process", "over sdft serve"])
def test_request_round_trip_on_the_tiny_model(
    benchmark: Any, tiny_clients: dict, case: str
) -> None:
    """The fixed cost of one request: a forward pass of one 16-token datum on the 2-layer tiny
    model (compute is negligible, so the difference between the cases is the wire's)."""
    from tinker import types

    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(range(5, 21))),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=list(range(6, 22)), dtype="int64", shape=[16]),
            "weights": types.TensorData(data=[1.0] * 16, dtype="float32", shape=[16]),
        },
    )
    client = tiny_clients[case]
    client.forward([datum], "cross_entropy").result()
    output = benchmark.pedantic(
        lambda: client.forward([datum], "cross_entropy").result(), rounds=30, iterations=1
    )
    assert output.metrics["loss:sum"] > 0


class Alternating:
    """One in-process step, then one step over the wire, timed separately: both cases see the
    same machine load (the development machine is shared, so load drifts between runs)."""

    def __init__(self, local: LocalSDFT, wire: LocalSDFT) -> None:
        self.jobs = {"in-process": local, "over sdft serve": wire}
        self.times: dict[str, list[float]] = {name: [] for name in self.jobs}
        self.results: dict[str, dict[str, float]] = {}

    def pair(self) -> None:
        for name, job in self.jobs.items():
            started = time.perf_counter()
            self.results[name] = job.step()
            self.times[name].append(time.perf_counter() - started)


def test_sdft_step_in_process_vs_over_sdft_serve(
    benchmark: Any, tmp_path: Path, server_url: str
) -> None:
    import tinker

    torch.set_num_threads(THREADS)
    with LocalServiceClient(tmp_path, device="cpu", dtype="float32") as service:
        local = LocalSDFT(service, lora=True)
        wire = LocalSDFT(tinker.ServiceClient(base_url=server_url, api_key=KEY), lora=True)
        runs = Alternating(local, wire)
        runs.pair()  # warm-up: first-call allocations, model load on the server
        runs.times = {name: [] for name in runs.jobs}
        benchmark.pedantic(runs.pair, rounds=ROUNDS, iterations=1)
    for result in runs.results.values():
        assert result["positions"] == len(QUESTIONS) * (COMPLETION_TOKENS - 3)
        assert result["loss"] > 0
    summary = {name: {"mean_s": sum(t) / len(t), "min_s": min(t)} for name, t in runs.times.items()}
    local_s, wire_s = summary["in-process"], summary["over sdft serve"]
    ratio = {
        "mean": wire_s["mean_s"] / local_s["mean_s"],
        "min": wire_s["min_s"] / local_s["min_s"],
    }
    benchmark.extra_info.update(
        {
            "in_process": summary["in-process"],
            "over_sdft_serve": summary["over sdft serve"],
            "wire_over_in_process": ratio,
            "threads": THREADS,
            "load_average_1min": os.getloadavg()[0],
        }
    )
    lines = [
        "",
        "| one SDFT step, SmolLM2-135M LoRA r16, CPU | mean (s) | min (s) |",
        "|---|---:|---:|",
        *(f"| {name} | {v['mean_s']:.2f} | {v['min_s']:.2f} |" for name, v in summary.items()),
        f"| wire / in-process | {ratio['mean']:.3f} | {ratio['min']:.3f} |",
        f"(rounds {ROUNDS}, {THREADS} threads, load average {os.getloadavg()[0]:.1f})",
    ]
    print("\n".join(lines))
