"""The walkthrough's SDFT step over the wire with injected latency: gathered phase by phase
(``streaming: false``), streamed per question (the default), and streamed with the next batch's
sampling overlapped with training (``overlap_sampling: true``, one step off-policy).

A stock ``tinker.ServiceClient`` drives ``sdft serve --latency-ms 200`` (every response delayed by
200 ms) on the same machine; the step is the training loop's own (``Trainer.train_step``: sample,
teacher top-20 scoring, kernel, ``forward_backward`` + ``optim_step``, sampler refresh) on the
walkthrough config (``examples/capitals/config.yaml``: batch 4 × 2 rollouts, up to 48 tokens,
LoRA r16). Each case trains ``SDFT_BENCH_ROUNDS`` (default 4) consecutive steps after one warm-up
step, on its own training client; the cases run one after the other in the same server, and the
whole sequence runs twice in opposite orders (so load drift on a shared machine hits each case
alike). ``SDFT_BENCH_MODELS`` picks the models (default: the embedded SmolLM2-135M-Instruct and
the 2-layer ``sdft/tiny-random``, where compute is negligible and latency is everything).

    python -m pytest benches/bench_streaming.py -p no:cacheprovider -s --benchmark-disable

The printed table gives each case's mean and min step time and its ratio to the gathered step.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sdft.config import load_config
from sdft.loop import Trainer
from sdft.models import DEFAULT_MODEL, TINY_RANDOM_MODEL
from serve_fixture import ServeProcess, start_server

ROOT = Path(__file__).resolve().parents[1]
LATENCY_MS = 200
ROUNDS = int(os.environ.get("SDFT_BENCH_ROUNDS", "4"))
MODELS = os.environ.get("SDFT_BENCH_MODELS", f"{DEFAULT_MODEL},{TINY_RANDOM_MODEL}").split(",")
CASES = {
    "gathered": {"streaming": False},
    "streamed": {"streaming": True},
    "streamed + overlapped sampling": {"streaming": True, "overlap_sampling": True},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = start_server(
        tmp_path_factory.mktemp("latency-checkpoints"),
        "--latency-ms",
        str(LATENCY_MS),
        models=tuple(MODELS),
    )
    yield process
    process.stop()


def walkthrough_config(model: str, url: str, output: Path, **params: Any) -> Any:
    config = load_config(ROOT / "examples/capitals/config.yaml")
    algorithm = config.algorithm.model_copy(
        update={"params": config.params.model_copy(update=params)}
    )
    return config.model_copy(
        update={
            "model": config.model.model_copy(update={"name": model}),
            "backend": config.backend.model_copy(update={"kind": "tinker", "base_url": url}),
            "algorithm": algorithm,
            "output_dir": output,
        }
    )


async def time_steps(config: Any, service: Any, rounds: int) -> list[float]:
    """Seconds per step of ``rounds`` consecutive steps after one warm-up step."""
    loop = asyncio.get_running_loop()
    trainer = Trainer(config, service, progress=False)
    await trainer.prepare(None)
    try:
        await trainer.train_step(1)
        times = []
        for step in range(2, rounds + 2):
            started = loop.time()
            await trainer.train_step(step)
            times.append(loop.time() - started)
        return times
    finally:
        trainer.close()


@pytest.mark.parametrize("model", MODELS)
def test_streaming_step_with_200ms_latency(
    server: ServeProcess, tmp_path: Path, model: str
) -> None:
    import tinker

    service = tinker.ServiceClient(base_url=server.url, api_key=server.key)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    order = list(CASES)
    for attempt, names in enumerate((order, order[::-1])):
        for name in names:
            config = walkthrough_config(
                model,
                server.url,
                tmp_path / f"{attempt}-{name}",
                max_steps=ROUNDS + 1,
                **CASES[name],
            )
            times[name] += asyncio.run(time_steps(config, service, ROUNDS))
    gathered = statistics.mean(times["gathered"])
    lines = [
        "",
        f"| {model}, walkthrough step, {LATENCY_MS} ms per response | mean (s) | min (s) "
        "| mean / gathered |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        mean = statistics.mean(values)
        lines.append(f"| {name} | {mean:.2f} | {min(values):.2f} | {mean / gathered:.3f} |")
    lines.append(
        f"({len(times['gathered'])} steps per case, load average {os.getloadavg()[0]:.1f})"
    )
    print("\n".join(lines))
    for values in times.values():
        assert all(value > LATENCY_MS / 1000 for value in values)
