"""Peak resident memory of SDFT runs on SmolLM2-135M-Instruct (float32, CPU), local backend.

Each case runs in a fresh Python process (peak RSS is a per-process high-water mark), doing the
training step of ``bench_step.py`` (sample 4 completions of 64 tokens from the student's snapshot
sampler, score them with the static base-model teacher, ``forward_backward`` + ``optim_step``,
refresh the snapshot sampler) with a LoRA rank 16 student:

- ``one_run``: one ``LocalServiceClient``, student + static teacher, 2 steps;
- ``one_run_unmerged``: the same with ``merge_lora_for_sampling=False`` (snapshot samplers run
  the adapters instead of holding merged weights);
- ``four_runs``: four runs in one process, each with its own ``LocalServiceClient`` (as four
  ``sdft train`` loops would create), one step each, concurrently.

Reported per case (``extra_info`` and a table at the end): the process's peak RSS, its RSS once
torch and transformers are imported (before any model), and the difference.

    python -m pytest benches/bench_memory.py -p no:cacheprovider -s

Measured on the 2-core development machine (torch 2.15, transformers 5.24, peft 0.21), peak RSS
in MiB: (1) before and (2) after service clients in one process started sharing each base model's
weights (a loaded machine; the interpreter with torch and transformers imported was 780 MiB of
it), then (3) on another, idle machine after LoRA snapshots started keeping only their adapters
(2 merged copies cached per process) and the worker threads started trimming freed malloc memory
(the interpreter was 580 MiB there, so compare the "above the interpreter" column):

| case | (1) | (2) | (3) | (2) above interpreter | (3) above interpreter |
|---|---:|---:|---:|---:|---:|
| one_run (merged snapshot samplers, the default) | 3511 | 3483 | 2993 | 2703 | 2413 |
| one_run_unmerged | 2824 | 2757 | 2386 | 1977 | 1806 |
| four_runs | 9170 | 7401 | 6283 | 6621 | 5703 |

Within one service the LoRA student, the static teacher and the snapshot samplers run on one copy
of the base weights; a merged snapshot sampler holds ``W0 + scale * B @ A`` for every adapted
layer while it is among the 2 most recently used (about one model's worth of float32 weights
each), which is most of the one_run vs one_run_unmerged difference. Peak RSS is a high-water mark:
four_runs trains four clients at once, so their activations coexist.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
CASES = {
    "one_run": {"runs": 1, "steps": 2, "merge": True},
    "one_run_unmerged": {"runs": 1, "steps": 2, "merge": False},
    "four_runs": {"runs": 4, "steps": 1, "merge": True},
}
RESULTS: dict[str, dict[str, float]] = {}


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def run_case(name: str) -> dict[str, float]:
    """Run case ``name`` in this process; returns the RSS figures in MiB."""
    import torch  # noqa: F401  (imported before the baseline is taken)
    import transformers  # noqa: F401

    from bench_step import LocalSDFT
    from sdft.backends.local import LocalServiceClient

    case = CASES[name]
    baseline = _status_mib("VmRSS")
    with tempfile.TemporaryDirectory() as root:
        services = [
            LocalServiceClient(
                Path(root) / str(i),
                device="cpu",
                dtype="float32",
                merge_lora_for_sampling=bool(case["merge"]),
            )
            for i in range(int(case["runs"]))
        ]
        runs = [LocalSDFT(service, lora=True) for service in services]
        losses: list[float] = []
        errors: list[BaseException] = []

        def train(run: Any) -> None:
            try:
                for _ in range(int(case["steps"])):
                    losses.append(run.step()["loss"])
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=train, args=(run,)) for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for service in services:
            service.close()
    if errors:
        raise errors[0]
    assert len(losses) == case["runs"] * case["steps"] and all(loss > 0 for loss in losses)
    peak = _status_mib("VmHWM")
    return {"peak_rss_mib": peak, "baseline_rss_mib": baseline, "models_mib": peak - baseline}


@pytest.mark.parametrize("name", list(CASES))
def test_peak_memory(benchmark: Any, name: str) -> None:
    def measure() -> dict[str, float]:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), name],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"case {name} failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    RESULTS[name] = result
    benchmark.extra_info.update({key: round(value, 1) for key, value in result.items()})
    print(
        f"\n[bench_memory] {name}: peak RSS {result['peak_rss_mib']:.0f} MiB "
        f"({result['models_mib']:.0f} MiB above the {result['baseline_rss_mib']:.0f} MiB of the "
        "interpreter with torch and transformers imported)"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    print(json.dumps(run_case(sys.argv[1])))
