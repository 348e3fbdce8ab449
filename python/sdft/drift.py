"""Drift from the base model: mean per-token KL(model || base) on the model's own samples.

For held-out prompts unrelated to the training tasks, the model samples completions at
temperature 1 (so the samples follow its own distribution), both models score every sampled
sequence, and the drift is the per-token average over all sampled completion tokens of

    log p_model(y_t | prompt, y_<t) - log p_base(y_t | prompt, y_<t),

an unbiased estimate of the mean per-token KL(model || base) along the model's trajectories. It
needs only ``sample`` and ``compute_logprobs``, so it works on Tinker. When both sampling clients
expose the full next-token distribution (the local backend's ``full_logprob_rows``), the exact
full-vocabulary KL at each sampled position is reported as well (``kl_full``): the same
expectation with the inner sum over the whole vocabulary instead of the sampled token.

Both log-probs are computed by the same kind of request (``compute_logprobs``), so the base model
scored against itself gives exactly 0.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinker import types

from sdft import _atomic
from sdft.data import build_student_prompt


@dataclass(frozen=True)
class DriftPrompt:
    id: str
    text: str
    system_prompt: str | None = None


@dataclass
class DriftResult:
    """``kl``: sampled-token estimate; ``kl_full``: exact full-vocabulary value at the same
    positions (``None`` when a client cannot give full distributions)."""

    kl: float
    kl_full: float | None
    tokens: int
    sequences: int
    per_sequence: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self, names: Sequence[str] = ("kl", "kl_full")) -> dict[str, float]:
        values = {"kl": self.kl, "kl_full": self.kl_full}
        out = {}
        for name in names:
            value = values[name]
            if value is None:
                raise ValueError(
                    f"drift metric {name} needs full next-token distributions from both models "
                    "(the local backend); use kl on Tinker"
                )
            out[name] = value
        return out


def _prompt_of(row: Any, where: str) -> DriftPrompt:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} expected a JSON object, got {type(row).__name__}")
    system = None
    if "prompt" in row:
        value = row["prompt"]
        if isinstance(value, list):
            roles = [m.get("role") if isinstance(m, Mapping) else None for m in value]
            if roles not in (["user"], ["system", "user"]):
                raise ValueError(f"{where} prompt messages must be [system?, user], got {roles}")
            if len(value) == 2:
                system = value[0].get("content")
            value = value[-1].get("content")
        key = "prompt"
    elif "instruction" in row:
        value, key = row["instruction"], "instruction"
    elif "question" in row:
        value, key = row["question"], "question"
    elif isinstance(row.get("inputs"), Mapping) and "question" in row["inputs"]:
        value, key = row["inputs"]["question"], "inputs.question"
    else:
        raise ValueError(
            f"{where} needs a prompt: a 'prompt', 'instruction', 'question' or 'inputs.question' field"
        )
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} {key} must be a non-empty string")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where} the system message content must be a string")
    ident = row.get("id", row.get("task_id"))
    return DriftPrompt(str(ident) if ident is not None else where.rstrip(":"), value, system)


def load_drift_prompts(path: str | Path, *, limit: int | None = None) -> list[DriftPrompt]:
    """Held-out prompts from a JSONL file (or a folder's ``tasks.jsonl``); each row gives its text
    as ``prompt`` (a string or ``[system?, user]`` messages), ``instruction``, ``question`` or
    PromptExample ``inputs.question``. Malformed rows raise ``ValueError`` naming ``file:line:``."""
    target = Path(path)
    file = target / "tasks.jsonl" if target.is_dir() else target
    if not file.is_file():
        raise FileNotFoundError(f"drift prompts not found: {file}")
    prompts = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{file}:{number}:"
            prompts.append(_prompt_of(_atomic.parse_json_line(line, where), where))
    if not prompts:
        raise ValueError(f"{file}: no drift prompts")
    return prompts[:limit] if limit is not None else prompts


async def _resolve(value: Any) -> Any:
    if hasattr(value, "result_async"):
        return await value.result_async()
    if inspect.isawaitable(value):
        return await value
    return value


def _has_full_rows(client: Any) -> bool:
    return callable(getattr(client, "full_logprob_rows", None))


async def measure_drift(
    model: Any,
    base: Any,
    tokenizer: Any,
    prompts: Sequence[DriftPrompt],
    *,
    max_tokens: int,
    num_samples: int = 1,
    seed: int = 0,
    system_prompt: str | None = None,
    enable_thinking: bool | None = None,
    full_vocab: bool | None = None,
) -> DriftResult:
    """Drift of sampling client ``model`` from sampling client ``base`` (see the module doc).

    ``full_vocab``: ``None`` computes ``kl_full`` when both clients can; ``True`` requires it."""
    if max_tokens < 1 or num_samples < 1:
        raise ValueError("max_tokens and num_samples must be >= 1")
    exact = _has_full_rows(model) and _has_full_rows(base)
    if full_vocab and not exact:
        raise ValueError("kl_full needs sampling clients with full_logprob_rows (local backend)")
    exact = exact if full_vocab is None else bool(full_vocab)
    eos = getattr(tokenizer, "eos_token_id", None)
    stop = [int(eos)] if isinstance(eos, int) else None
    rendered = [
        build_student_prompt(
            question=p.text,
            tokenizer=tokenizer,
            system_prompt=p.system_prompt if p.system_prompt is not None else system_prompt,
            enable_thinking=enable_thinking,
        )
        for p in prompts
    ]
    requests = [
        model.sample(
            prompt,
            num_samples,
            types.SamplingParams(
                max_tokens=max_tokens, temperature=1.0, seed=seed * 7919 + index, stop=stop
            ),
        )
        for index, prompt in enumerate(rendered)
    ]
    responses = await asyncio.gather(*(_resolve(r) for r in requests))
    sequences: list[tuple[str, list[int], int]] = []
    for prompt, rendered_prompt, response in zip(prompts, rendered, responses, strict=True):
        for sequence in response.sequences:
            tokens = list(sequence.tokens)
            if tokens:
                sequences.append((prompt.id, rendered_prompt.to_ints() + tokens, len(tokens)))
    if not sequences:
        raise RuntimeError("drift: the model produced no completion tokens for any prompt")

    def score(client: Any) -> list[Any]:
        return [
            client.compute_logprobs(types.ModelInput.from_ints(ids), prompt_logprobs_last_n=n)
            for _, ids, n in sequences
        ]

    model_lps, base_lps = await asyncio.gather(
        asyncio.gather(*(_resolve(r) for r in score(model))),
        asyncio.gather(*(_resolve(r) for r in score(base))),
    )
    full: list[float] | None = None
    if exact:
        full = await asyncio.to_thread(_full_vocab_kl, model, base, sequences)

    total, count = 0.0, 0
    per_sequence = []
    for index, ((ident, ids, n), lp_m, lp_b) in enumerate(
        zip(sequences, model_lps, base_lps, strict=True)
    ):
        start = len(ids) - n
        diffs = []
        for position in range(start, len(ids)):
            a, b = lp_m[position], lp_b[position]
            if a is None or b is None or not math.isfinite(a) or not math.isfinite(b):
                raise RuntimeError(
                    f"drift: no finite log-prob for prompt {ident} position {position}"
                )
            diffs.append(float(a) - float(b))
        total += sum(diffs)
        count += n
        row: dict[str, Any] = {
            "id": ident,
            "tokens": n,
            "kl_sum": sum(diffs),
            "sequence": ids,
        }
        if full is not None:
            row["kl_full_sum"] = full[index]
        per_sequence.append(row)
    kl_full = sum(full) / count if full is not None else None
    return DriftResult(
        kl=total / count,
        kl_full=kl_full,
        tokens=count,
        sequences=len(sequences),
        per_sequence=per_sequence,
    )


def _full_vocab_kl(
    model: Any, base: Any, sequences: list[tuple[str, list[int], int]]
) -> list[float]:
    """Per sequence: the sum over its completion positions of the exact KL(model || base)."""
    import torch

    prompts = [ids for _, ids, _ in sequences]
    rows = [list(range(len(ids) - n, len(ids))) for _, ids, n in sequences]
    model_rows = model.full_logprob_rows(prompts, rows)
    base_rows = base.full_logprob_rows(prompts, rows)
    sums = []
    for p, q in zip(model_rows, base_rows, strict=True):
        p64, q64 = p.double(), q.double()
        sums.append(float(torch.sum(torch.exp(p64) * (p64 - q64)).item()))
    return sums


__all__ = ["DriftPrompt", "DriftResult", "load_drift_prompts", "measure_drift"]
