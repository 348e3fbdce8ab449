"""The shipped walkthrough configs are valid and compare SDFT with SFT on equal terms."""

from __future__ import annotations

from pathlib import Path

from sdft.config import load_config
from sdft.loop import load_benchmarks, load_dataset

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "capitals"


def test_walkthrough_configs_load_with_their_data_and_benchmarks() -> None:
    for name in ("config.yaml", "config_sft.yaml", "config_tinker.yaml"):
        config = load_config(EXAMPLE / name)
        dataset = load_dataset(config)
        assert len(dataset.examples) == 50, name
        benchmarks = load_benchmarks(config)
        assert sorted(benchmarks) == ["learned", "retained"], name
        assert [len(b.tasks) for b in benchmarks.values()] == [30, 30], name


def test_sdft_and_sft_runs_share_everything_but_the_algorithm() -> None:
    sdft_config = load_config(EXAMPLE / "config.yaml")
    sft_config = load_config(EXAMPLE / "config_sft.yaml")
    assert sdft_config.algorithm.kind == "sdft" and sft_config.algorithm.kind == "sft"
    assert sdft_config.model == sft_config.model
    assert sdft_config.backend.kind == sft_config.backend.kind == "local"
    assert sdft_config.data == sft_config.data
    assert sdft_config.metadata == sft_config.metadata
    assert sdft_config.seed == sft_config.seed
    for key in ("learning_rate", "max_steps", "batch_size", "lora_rank", "user_template"):
        assert getattr(sdft_config.params, key) == getattr(sft_config.params, key), key
    assert sdft_config.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_tinker_config_is_the_documented_real_run() -> None:
    local = load_config(EXAMPLE / "config.yaml")
    remote = load_config(EXAMPLE / "config_tinker.yaml")
    assert remote.backend.kind == "tinker"
    assert remote.model.name == "Qwen/Qwen3-4B-Instruct-2507"
    assert remote.algorithm.kind == "sdft"
    assert remote.params.topk == local.params.topk == 20
    assert remote.params.skip_first_n == local.params.skip_first_n == 3
    assert remote.data == local.data
