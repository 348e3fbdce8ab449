"""The drift metric: mean per-token KL(model || base) on the model's own samples, checked against a
direct torch computation on the tiny model (and exactly 0 for the base model itself)."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sdft.drift import DriftPrompt, DriftResult, load_drift_prompts, measure_drift
from sdft.models import load_model

TINY = "sdft/tiny-random"
PROMPTS = [
    DriftPrompt("joke", "Tell me a joke."),
    DriftPrompt("fruit", "Name a fruit.", system_prompt="Answer in one word."),
]


@pytest.fixture(scope="module")
def perturbed(local_service: Any) -> tuple[Any, Any]:
    """A full fine-tuning client of the tiny model with noise added to every weight, and a frozen
    torch copy of those weights."""
    client = local_service.create_full_training_client(TINY).result()
    with torch.no_grad():
        for param in client.runtime.hf_model.parameters():
            noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel()))
            param.add_(noise * 0.05)
    reference = copy.deepcopy(client.runtime.hf_model).eval()
    return client.save_weights_and_get_sampling_client().result(), reference


def drift(model: Any, base: Any, tokenizer: Any, **kwargs: Any) -> DriftResult:
    return asyncio.run(
        measure_drift(model, base, tokenizer, PROMPTS, max_tokens=6, num_samples=2, **kwargs)
    )


def test_base_model_against_itself_is_exactly_zero(local_service: Any, tiny_tokenizer: Any) -> None:
    base = local_service.create_sampling_client(base_model=TINY).result()
    result = drift(base, base, tiny_tokenizer)
    assert result.kl == 0.0 and result.kl_full == 0.0
    assert result.sequences == 4 and result.tokens == sum(r["tokens"] for r in result.per_sequence)


def test_drift_equals_a_direct_torch_computation(
    local_service: Any, tiny_tokenizer: Any, perturbed: tuple[Any, Any]
) -> None:
    model, reference = perturbed
    base = local_service.create_sampling_client(base_model=TINY).result()
    base_reference = load_model(TINY, dtype="float32", device="cpu").eval()
    result = drift(model, base, tiny_tokenizer, seed=3)
    sampled_total, full_total, tokens = 0.0, 0.0, 0
    for row in result.per_sequence:
        ids = row["sequence"]
        n = row["tokens"]
        with torch.no_grad():
            p = torch.log_softmax(reference(torch.tensor([ids])).logits[0].double(), dim=-1)
            q = torch.log_softmax(base_reference(torch.tensor([ids])).logits[0].double(), dim=-1)
        sampled = full = 0.0
        for position in range(len(ids) - n, len(ids)):
            row_p, row_q = p[position - 1], q[position - 1]  # row i - 1 predicts token i
            sampled += float(row_p[ids[position]] - row_q[ids[position]])
            full += float((row_p.exp() * (row_p - row_q)).sum())
        assert row["kl_sum"] == pytest.approx(sampled, abs=1e-4)
        assert row["kl_full_sum"] == pytest.approx(full, abs=1e-4)
        sampled_total += sampled
        full_total += full
        tokens += n
    assert result.tokens == tokens
    assert result.kl == pytest.approx(sampled_total / tokens, abs=1e-5)
    assert result.kl_full == pytest.approx(full_total / tokens, abs=1e-5)
    assert result.kl_full > 0.0
    # the prompts were rendered with their own system prompt where given
    fruit = next(r for r in result.per_sequence if r["id"] == "fruit")
    assert "Answer in one word." in tiny_tokenizer.decode(fruit["sequence"])


def test_sampled_estimate_only_when_a_client_has_no_full_distributions(
    local_service: Any, tiny_tokenizer: Any, perturbed: tuple[Any, Any]
) -> None:
    model, _ = perturbed
    base = local_service.create_sampling_client(base_model=TINY).result()

    class TinkerLike:
        """Only the Tinker surface (sample, compute_logprobs): no full_logprob_rows."""

        def __init__(self, inner: Any) -> None:
            self.sample = inner.sample
            self.compute_logprobs = inner.compute_logprobs

    exact = drift(model, base, tiny_tokenizer, seed=4)
    remote = drift(TinkerLike(model), TinkerLike(base), tiny_tokenizer, seed=4)
    assert remote.kl == exact.kl and remote.kl_full is None
    assert remote.metrics(["kl"]) == {"kl": exact.kl}
    with pytest.raises(ValueError, match="drift metric kl_full needs full next-token"):
        remote.metrics(["kl", "kl_full"])
    with pytest.raises(ValueError, match="kl_full needs sampling clients with full_logprob_rows"):
        drift(TinkerLike(model), base, tiny_tokenizer, full_vocab=True)


def test_drift_prompt_files(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "One?"},
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Two?"},
            ]
        },
        {"instruction": "Three?", "task_id": "t3"},
        {"question": "Four?"},
        {"inputs": {"question": "Five?"}, "expected": "5"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    prompts = load_drift_prompts(path)
    assert [(p.text, p.system_prompt) for p in prompts] == [
        ("One?", None),
        ("Two?", "Be brief."),
        ("Three?", None),
        ("Four?", None),
        ("Five?", None),
    ]
    assert prompts[2].id == "t3" and prompts[0].id == f"{path}:1"
    assert len(load_drift_prompts(path, limit=2)) == 2
    path.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ValueError) as caught:
        load_drift_prompts(path)
    assert str(caught.value) == (
        f"{path}:2: needs a prompt: a 'prompt', 'instruction', 'question' or 'inputs.question' field"
    )
    path.write_text('{"prompt": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(ValueError, match=r":1: prompt messages must be \[system\?, user\]"):
        load_drift_prompts(path)
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: invalid JSON"):
        load_drift_prompts(path)
    with pytest.raises(FileNotFoundError, match="drift prompts not found"):
        load_drift_prompts(tmp_path / "missing.jsonl")
