"""Client-side CPU of one recipe-scale SDFT step over the wire, against that step's wall time.

The cookbook recipe's step: 32 questions × 4 rollouts = 128 completions of up to 1,500 tokens,
teacher top-20 over every completion row, (N, 20) cross-entropy datums. It runs here through the
training loop's own step (``Trainer.train_step``, streamed) and a stock ``tinker.ServiceClient``
against ``sdft serve`` on the same machine. No model of real size can run this step on a 2-core
CPU (SmolLM2 would generate 192k tokens), so the server serves the 2-layer ``sdft/tiny-random``
model with its context raised to 4,096 positions (a local copy whose ``config.json`` says so; RoPE
needs nothing else). Its compute is a small fraction of any real model's, so its step is a lower
bound on a real step's wall time and the share measured here an upper bound on the real share.

Client-side CPU is this process's CPU time during the step (``time.process_time``: every thread
of the client, i.e. prompts, rollouts, kernel, the SDK's encoding and decoding, HTTP); the server
is another process.

    python -m pytest benches/bench_recipe_step.py -p no:cacheprovider -s --benchmark-disable

``SDFT_BENCH_ROUNDS`` (default 2) sets the measured steps after one warm-up step.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_streaming import walkthrough_config
from sdft.loop import Trainer
from sdft.models import TINY_RANDOM_MODEL, resolve_model
from serve_fixture import ServeProcess, start_server

ROUNDS = int(os.environ.get("SDFT_BENCH_ROUNDS", "2"))
CONTEXT = 4096


@pytest.fixture(scope="module")
def long_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = Path(resolve_model(TINY_RANDOM_MODEL).path)
    target = tmp_path_factory.mktemp("models") / "tiny-random-4k"
    shutil.copytree(source, target)
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = CONTEXT
    config_path.write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, long_tiny_model: Path
) -> Iterator[ServeProcess]:
    process = start_server(
        tmp_path_factory.mktemp("recipe-checkpoints"), models=(str(long_tiny_model),)
    )
    yield process
    process.stop()


async def measure(trainer: Trainer, rounds: int) -> list[tuple[float, float, dict]]:
    await trainer.prepare(None)
    results = []
    try:
        for step in range(1, rounds + 2):
            cpu, wall = time.process_time(), time.perf_counter()
            metrics = await trainer.train_step(step)
            results.append((time.process_time() - cpu, time.perf_counter() - wall, metrics))
    finally:
        trainer.close()
    return results[1:]  # the first step warms up


def test_client_cpu_share_of_a_recipe_scale_step(
    server: ServeProcess, long_tiny_model: Path, tmp_path: Path
) -> None:
    import tinker

    config = walkthrough_config(
        str(long_tiny_model),
        server.url,
        tmp_path / "run",
        batch_size=32,
        group_size=4,
        max_tokens=1500,
        max_context_length=CONTEXT,
        temperature=1.0,
        topk=20,
        max_steps=ROUNDS + 1,
    )
    # Every step a full batch of 32 questions: the walkthrough's 50 examples would end the first
    # epoch with a batch of 18, so the run reads them cycled to 32 × (ROUNDS + 1).
    examples = Path(config.data.path).read_text().splitlines()
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(examples[i % len(examples)] for i in range(32 * (ROUNDS + 1))) + "\n")
    config = config.model_copy(update={"data": config.data.model_copy(update={"path": data})})
    service = tinker.ServiceClient(base_url=server.url, api_key=server.key)
    results = asyncio.run(measure(Trainer(config, service, progress=False), ROUNDS))
    lines = [
        "",
        "| recipe-scale step over sdft serve (tiny-random, 4k context) | client CPU (s) | step wall (s) "
        "| share | completions | completion tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for index, (cpu, wall, metrics) in enumerate(results, start=2):
        lines.append(
            f"| step {index} | {cpu:.2f} | {wall:.1f} | {cpu / wall:.2%} | "
            f"{metrics['train/num_sequences']} | {metrics['train/completion_tokens']} |"
        )
    lines.append(f"(load average {os.getloadavg()[0]:.1f})")
    print("\n".join(lines))
    for _, _, metrics in results:
        assert metrics["train/num_sequences"] == 128
        assert metrics["train/completion_tokens"] > 128 * 1000
