"""A continual experiment on ``backend.kind: tinker``: the stock ``tinker`` SDK against ``sdft serve``
(the Tinker wire protocol on the tiny model). Stage 2 starts from stage 1's checkpoint by path,
and the drift metric runs on ``sample`` + ``compute_logprobs`` alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdft.checkpoints import read_checkpoints
from sdft.continual import load_experiment, run_experiment
from test_continual import write_experiment


def test_two_stages_over_the_tinker_sdk(
    tmp_path: Path, serve_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_experiment(
        tmp_path,
        max_steps=1,
        extra={
            "methods": [{"name": "sdft"}],
            "learning_rates": [1e-2],
            "seeds": [0],
            "benchmarks": [
                {"name": "drift", "kind": "drift", "path": "data/drift.jsonl", "max_tokens": 4}
            ],
        },
    )
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["backend"] = {"kind": "tinker", "base_url": serve_server.url}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    monkeypatch.setenv("TINKER_API_KEY", serve_server.key)
    experiment = load_experiment(path)
    assert experiment.base_config.backend.kind == "tinker"

    result = run_experiment(experiment, log=lambda _: None)
    assert len(result.trained) == 2
    first, second = experiment.stage_runs(experiment.chains[0])
    final = read_checkpoints(first.output_dir)[-1]
    assert final.state_path is not None and not final.state_path.startswith("local://")
    start = json.loads((second.output_dir / "start.json").read_text())
    assert (start["state_path"], start["teacher"]) == (final.state_path, final.sampler_path)
    rows = [
        json.loads(line)
        for line in (experiment.output_dir / "results.jsonl").read_text().splitlines()
    ]
    drift = {(r["stage"], r["metric"]) for r in rows if r["benchmark"] == "drift"}
    assert drift == {(0, "kl"), (1, "kl"), (2, "kl")}
    assert next(r["value"] for r in rows if r["benchmark"] == "drift" and r["stage"] == 0) == 0.0
    assert len(rows) == 3 * 3  # b1, b2, drift at the base model and after each stage
