"""Benchmark of ``sdft validate --deep`` on a large data file: every one of 2,000 examples is
rendered as a student and a teacher prompt and length-checked (tokenizer only, no weights).

Run: ``python -m pytest benches/bench_validate.py --benchmark-only``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdft.cli import run_checks

ROWS = 2_000


@pytest.fixture(scope="module")
def large_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("validate")
    (root / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "question": f"Question {i}: what is {i} plus {i}? Explain briefly.",
                    "golden_answer": f"{i} plus {i} is {2 * i}.",
                }
            )
            + "\n"
            for i in range(ROWS)
        )
    )
    config = root / "config.yaml"
    config.write_text(
        "model: {name: sdft/tiny-random}\nbackend: {kind: local, device: cpu}\n"
        "data: {path: train.jsonl}\noutput_dir: out\n"
    )
    return config


def test_validate_deep_2000_rows(benchmark, large_config: Path) -> None:
    run_checks(large_config, deep=True)  # warm the tokenizer cache
    checks = benchmark.pedantic(
        run_checks, args=(large_config,), kwargs={"deep": True}, rounds=3, iterations=1
    )
    prompts = [check for check in checks if check.name == "prompts"]
    assert [check.status for check in prompts] == ["ok"]
    assert prompts[0].detail.startswith(f"{ROWS} examples rendered")
    benchmark.extra_info["rows"] = ROWS
    benchmark.extra_info["ms_per_row"] = benchmark.stats.stats.min * 1e3 / ROWS
