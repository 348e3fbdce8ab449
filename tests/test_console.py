"""The ``sdft`` command prints sdft's own lines only; ``--debug`` / ``SDFT_DEBUG=1`` brings the
third-party progress bars, warnings and logs back (``sdft.console``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TINY = "sdft/tiny-random"

# Every line the quiet command may print. stdout: validate's check lines and verdict, train's
# closing summary ("Status:    completed", ...). stderr: the evaluation and per-step lines that
# replace the progress bar when stderr is not a terminal.
VALIDATE_LINE = re.compile(r"^(\[(ok|FAIL|warn|skip) *\] \S.*|all checks passed)$")
SUMMARY_LINE = re.compile(r"^[A-Z][a-z]+: +\S.*$")
STEP_LINE = re.compile(r"^(step \d+: \S+ = \d\.\d{3}.*|train \d+/\d+ loss \d+\.\d+.*)$")
# What the libraries print on their own: tqdm bars, warnings, log records.
THIRD_PARTY = re.compile(r"it/s\]|%\||Warning|warnings\.warn|Loading weights|^(WARNING|INFO)\b")


def write_tiny_run(root: Path) -> Path:
    """Two SDFT steps of LoRA on the tiny random model, one benchmark at steps 0 and 2."""
    data = root / "data"
    (data / "val").mkdir(parents=True)
    rows = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome")]
    (data / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {"inputs": {"question": f"What is the capital of {c}?"}, "expected": f"It is {a}."}
            )
            + "\n"
            for c, a in rows
        )
    )
    task = {
        "task_id": "val_0",
        "instruction": "Capital of France?",
        "verifier": {"kind": "in_process", "fn_name": "contains", "expected": "Paris"},
    }
    (data / "val" / "tasks.jsonl").write_text(json.dumps(task) + "\n")
    config = {
        "model": {"name": TINY},
        "backend": {"kind": "local", "device": "cpu"},
        "algorithm": {
            "kind": "sdft",
            "params": {
                "learning_rate": 1e-3,
                "max_steps": 2,
                "batch_size": 2,
                "group_size": 1,
                "lora_rank": 4,
                "topk": 5,
                "skip_first_n": 1,
                "max_tokens": 8,
                "max_context_length": 256,
                "save_every": 2,
            },
        },
        "data": {"source_kind": "jsonl", "path": "data/train.jsonl"},
        "metadata": {
            "benchmark": [
                {"name": "val", "path": "data/val", "run_every": 2, "metrics": ["pass@1"]}
            ]
        },
        "output_dir": "out",
        "seed": 0,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_sdft(
    args: list[str], cwd: Path, *, debug_env: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SDFT_DEBUG"}
    # The quiet settings are the command's own, not inherited from a verbose environment.
    for key in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS"):
        env.pop(key, None)
    if debug_env:
        env["SDFT_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "sdft.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def lines(text: str) -> list[str]:
    # A tqdm bar redraws with carriage returns; count each redraw as its own line.
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def test_validate_prints_only_its_check_lines(tmp_path: Path) -> None:
    config = write_tiny_run(tmp_path)
    result = run_sdft(["validate", str(config), "--deep"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    out = lines(result.stdout)
    assert [line for line in out if not VALIDATE_LINE.match(line)] == []
    assert out[-1] == "all checks passed"
    assert any(line.startswith("[ok  ] model ") for line in out)


def test_train_prints_only_sdft_lines_and_debug_restores_the_libraries_output(
    tmp_path: Path,
) -> None:
    config = write_tiny_run(tmp_path)
    quiet = run_sdft(["train", str(config)], tmp_path)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    out, err = lines(quiet.stdout), lines(quiet.stderr)
    assert [line for line in out if not SUMMARY_LINE.match(line)] == []
    assert [line for line in err if not STEP_LINE.match(line)] == []
    assert "Status:    completed" in out
    assert [line for line in err if line.startswith("train ")] == [
        line for line in err if re.match(r"train [12]/2 loss", line)
    ]
    assert len([line for line in err if line.startswith("train ")]) == 2

    verbose = run_sdft(["train", str(config), "--overwrite"], tmp_path, debug_env=True)
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    verbose_err = lines(verbose.stderr)
    # The same sdft lines (same seed, same run), plus what the libraries print themselves.
    assert [line for line in verbose_err if STEP_LINE.match(line)] == err
    third_party = [line for line in verbose_err if not STEP_LINE.match(line)]
    # transformers (>= 5) draws a "Loading weights" bar for every model it loads.
    assert any("Loading weights" in line for line in third_party), verbose.stderr
    assert all(THIRD_PARTY.search(line) for line in third_party), third_party


def test_errors_still_surface_as_one_line(tmp_path: Path) -> None:
    result = run_sdft(["train", str(tmp_path / "missing.yaml")], tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert lines(result.stderr) == [
        f"sdft: error: config file not found: {tmp_path / 'missing.yaml'}"
    ]


@pytest.mark.real_model
def test_converting_the_embedded_model_prints_nothing(tmp_path: Path) -> None:
    """The GGUF de-quantization bar ignores transformers' switch; sdft hides it in quiet mode."""
    example = Path(__file__).resolve().parents[1] / "examples" / "capitals" / "config.yaml"
    env = {k: v for k, v in os.environ.items() if k != "SDFT_DEBUG"}
    env["SDFT_CACHE"] = str(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-m", "sdft.cli", "validate", str(example), "--deep"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert "(embedded_gguf)" in result.stdout
    assert [line for line in lines(result.stdout) if not VALIDATE_LINE.match(line)] == []


PROBE = """
import logging, sys, warnings
from sdft.console import configure_output, third_party_output_hidden
configure_output(debug={debug})
warnings.warn_explicit("third-party advice", UserWarning, "peft/tuners.py", 1, module="peft.tuners")
warnings.warn_explicit("renamed", FutureWarning, "sdft/models.py", 2, module="sdft.models")
warnings.warn_explicit("sdft advice", UserWarning, "sdft/loop.py", 3, module="sdft.loop")
logging.getLogger("httpx").warning("third-party log record")
logging.getLogger("tinker.lib").error("third-party error record")
from transformers.utils import logging as transformers_logging
for _ in transformers_logging.tqdm(range(3), desc="third-party bar"):
    pass
with third_party_output_hidden():
    print("printed around a conversion", file=sys.stderr)
try:
    with third_party_output_hidden():
        raise RuntimeError("conversion failed")
except RuntimeError as exc:
    print("caught:", exc, file=sys.stderr)
"""


@pytest.mark.parametrize("debug", [False, True])
def test_configure_output_filters_exactly_the_third_party_output(debug: bool) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRANSFORMERS_", "HF_HUB_DISABLE", "PYTHONWARNINGS"))
    }
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(debug=debug)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    err = result.stderr
    # Always shown: sdft's own warnings, error records, and exceptions.
    assert "UserWarning: sdft advice" in err
    assert "third-party error record" in err
    assert "caught: conversion failed" in err
    noise = [
        "UserWarning: third-party advice",
        "FutureWarning: renamed",
        "third-party log record",
        "third-party bar",
        "printed around a conversion",
    ]
    if debug:
        assert [item for item in noise if item not in err] == []
    else:
        assert [item for item in noise if item in err] == []
