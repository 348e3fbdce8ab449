"""``sdft train`` / ``sdft eval`` with ``backend: {kind: tinker, base_url: <sdft serve>}``: the
Tinker path end to end through the stock SDK. Every run's metrics equal the in-process local
run of the same config; resume works after ``kill -9`` of the client and after a server restart
(checkpoints persist on the server's disk)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdft.cli import DEFAULT_TEACHER_CHECK
from sdft.config import load_config
from sdft.loop import evaluate_checkpoint, train
from serve_fixture import ServeProcess, start_server
from support import write_config

SKIPPED_PREFIXES = ("time/",)


def tinker_config(local: Path, url: str, name: str = "tinker.yaml") -> Path:
    """The same run as ``local`` on ``backend: {kind: tinker, base_url: url}``."""
    data = yaml.safe_load(local.read_text())
    data["backend"] = {"kind": "tinker", "base_url": url}
    data["output_dir"] = data["output_dir"] + "-tinker"
    path = local.parent / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rows(config_path: Path) -> list[dict[str, Any]]:
    config = load_config(config_path)
    lines = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def assert_same_metrics(tinker_rows: list[dict], local_rows: list[dict]) -> None:
    assert [(r["step"], r["split"]) for r in tinker_rows] == [
        (r["step"], r["split"]) for r in local_rows
    ]
    for t, lo in zip(tinker_rows, local_rows, strict=True):
        keys = {k for k in lo["metrics"] if not k.startswith(SKIPPED_PREFIXES)}
        assert keys == {k for k in t["metrics"] if not k.startswith(SKIPPED_PREFIXES)}
        for key in sorted(keys):
            a, b = t["metrics"][key], lo["metrics"][key]
            if isinstance(b, float) and math.isnan(b):
                assert math.isnan(a), (t["step"], key)
            else:
                assert a == pytest.approx(b, rel=1e-4, abs=1e-5), (t["step"], t["split"], key)


@pytest.fixture()
def tinker_env(serve_server: ServeProcess, monkeypatch: Any) -> ServeProcess:
    monkeypatch.setenv("TINKER_API_KEY", serve_server.key)
    return serve_server


LORA = {"lora_rank": 4, "max_steps": 2, "save_every": 1}
VARIANTS = {
    "sdft_topk": ("sdft", {}),
    "sdft_is_fallback": ("sdft", {"topk": 0}),
    "sdft_reverse_kl": ("sdft", {"loss": "reverse_kl"}),
    "sdft_sync_teacher": ("sdft", {"teacher": {"mode": "sync", "sync_every": 1}}),
    "sft": ("sft", {}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_train_over_the_wire_equals_the_local_run(
    tmp_path: Path, tinker_env: ServeProcess, variant: str
) -> None:
    kind, params = VARIANTS[variant]
    local = write_config(tmp_path, kind=kind, params={**LORA, **params})
    remote = tinker_config(local, tinker_env.url)
    train(load_config(local), progress=False)
    result = train(load_config(remote), progress=False)
    assert result.status == "completed"
    assert_same_metrics(rows(remote), rows(local))
    index = (Path(load_config(remote).output_dir) / "checkpoints.jsonl").read_text().splitlines()
    last = json.loads(index[-1])
    assert last["state_path"].startswith("tinker://") and last["batch"] == 2


def test_eval_on_a_tinker_checkpoint_equals_local(tmp_path: Path, tinker_env: ServeProcess) -> None:
    local = write_config(tmp_path, params=LORA)
    remote = tinker_config(local, tinker_env.url)
    train(load_config(local), progress=False)
    train(load_config(remote), progress=False)
    wire = evaluate_checkpoint(load_config(remote), checkpoint="last", progress=False)
    here = evaluate_checkpoint(load_config(local), checkpoint="last", progress=False)
    assert wire.step == here.step == 2
    assert wire.metrics == pytest.approx(here.metrics)
    assert wire.metrics


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sdft.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_resume_after_kill_9_of_the_client(tmp_path: Path, tinker_env: ServeProcess) -> None:
    params = {**LORA, "max_steps": 4, "save_every": 1}
    local = write_config(tmp_path, params=params)
    remote = tinker_config(local, tinker_env.url)
    env = {**os.environ, "TINKER_API_KEY": tinker_env.key, "HF_HUB_OFFLINE": "1"}
    index = Path(load_config(remote).output_dir) / "checkpoints.jsonl"
    process = _cli("train", str(remote), "--no-progress", env=env)
    deadline = time.monotonic() + 600
    while not (index.is_file() and len(index.read_text().splitlines()) >= 2):
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    resumed = _cli("train", str(remote), "--resume", "--no-progress", env=env)
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output
    # `sdft train` checks the teacher at step 0 by default: over the wire as in-process
    train(load_config(local), progress=False, teacher_check=DEFAULT_TEACHER_CHECK)
    assert_same_metrics(rows(remote), rows(local))


def test_resume_after_a_server_restart(tmp_path: Path, monkeypatch: Any) -> None:
    root = tmp_path / "server-checkpoints"
    root.mkdir()
    first = start_server(root)
    monkeypatch.setenv("TINKER_API_KEY", first.key)
    local = write_config(tmp_path, params={**LORA, "max_steps": 3})
    remote = tinker_config(local, first.url)
    try:
        result = train(load_config(remote).model_copy(), progress=False, resume=False)
        assert result.status == "completed"
    finally:
        first.stop()
    second = start_server(root)
    try:
        moved = tinker_config(local, second.url, name="tinker-restarted.yaml")
        data = yaml.safe_load(moved.read_text())
        data["algorithm"]["params"]["max_steps"] = 5
        moved.write_text(yaml.safe_dump(data, sort_keys=False))
        resumed = train(load_config(moved), resume=True, progress=False)
        assert resumed.status == "completed"
    finally:
        second.stop()
    data = yaml.safe_load(local.read_text())
    data["algorithm"]["params"]["max_steps"] = 5
    local.write_text(yaml.safe_dump(data, sort_keys=False))
    train(load_config(local), progress=False)
    # The first run ended at step 3 and scored its benchmarks there; training rows and the
    # final step's rows match the uninterrupted local run.
    kept = [r for r in rows(moved) if r["split"] == "train" or r["step"] == 5]
    assert [r["step"] for r in kept if r["split"] == "train"] == [1, 2, 3, 4, 5]
    assert_same_metrics(kept, [r for r in rows(local) if r["split"] == "train" or r["step"] == 5])


WALKTHROUGH = Path(__file__).resolve().parent.parent / "examples" / "capitals" / "config.yaml"


@pytest.mark.real_model
def test_one_walkthrough_step_over_the_wire_on_smollm2(tmp_path: Path, monkeypatch: Any) -> None:
    """The capitals walkthrough config, one SDFT step, through ``sdft serve`` on SmolLM2; its
    metrics equal the same step in-process."""
    from sdft.models import DEFAULT_MODEL

    data = yaml.safe_load(WALKTHROUGH.read_text())
    data["algorithm"]["params"]["max_steps"] = 1
    data["data"]["path"] = str(WALKTHROUGH.parent / data["data"]["path"])
    for bench in data["metadata"]["benchmark"]:
        bench["path"] = str(WALKTHROUGH.parent / bench["path"])
        bench["limit"] = 2
    data["backend"] = {"kind": "local", "device": "cpu", "dtype": "float32"}
    data["output_dir"] = str(tmp_path / "local")
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / "checkpoints").mkdir()
    server = start_server(tmp_path / "checkpoints", models=(DEFAULT_MODEL,))
    try:
        monkeypatch.setenv("TINKER_API_KEY", server.key)
        remote = tinker_config(local, server.url)
        result = train(load_config(remote), progress=False)
        assert result.status == "completed"
    finally:
        server.stop()
    train(load_config(local), progress=False)
    wire_rows, local_rows = rows(remote), rows(local)
    assert [r["split"] for r in wire_rows if r["step"] == 1].count("train") == 1
    assert_same_metrics(wire_rows, local_rows)
