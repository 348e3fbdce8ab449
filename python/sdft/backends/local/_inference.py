"""Batched inference on one runtime: prefill with shared-prefix reuse, prompt scoring and
KV-cache generation. Runs on the runtime's worker thread, under ``torch.inference_mode``.

Layout: every sequence is right-padded; pads anywhere are masked through a 2-D attention mask and
positions are passed explicitly, so no query row is ever fully masked. Prompts that share a long
prefix (the teacher prompt of several rollouts of one question, or one prompt sampled by several
requests) are prefilled once: phase A runs the shared prefixes, their KV cache is replicated to
the member rows, and phase B runs only the suffixes on top of it.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tinker import types
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

from sdft.backends.local._inputs import SampleRequest
from sdft.backends.local._runtime import ModelRuntime

# Prompts sharing at least this many leading tokens are prefilled once.
MIN_SHARED_PREFIX = 32


@dataclass
class Prefill:
    """Hidden states of a batch of prompts (and the KV cache when generation follows)."""

    lengths: list[int]
    prefix_len: torch.Tensor  # (n,) tokens taken from the shared prefix (0 = none)
    group: torch.Tensor  # (n,) shared-prefix group, -1 = none
    hidden_a: torch.Tensor | None  # (G, T_A, H) shared prefixes
    hidden_b: torch.Tensor  # (n, T_B, H) suffixes
    cache: Any
    mask: torch.Tensor  # (n, T_A + T_B) 1 = real token

    def select(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states of prompt ``rows[i]`` at token ``positions[i]`` -> ``(len, H)``."""
        hidden = self.hidden_b.shape[-1]
        out = torch.empty(
            (rows.shape[0], hidden), dtype=self.hidden_b.dtype, device=self.hidden_b.device
        )
        if rows.numel() == 0:
            return out
        prefix = self.prefix_len[rows]
        in_a = positions < prefix
        in_b = ~in_a
        t_b = self.hidden_b.shape[1]
        flat_b = self.hidden_b.reshape(-1, hidden)
        index_b = rows[in_b] * t_b + positions[in_b] - prefix[in_b]
        out[in_b.to(out.device)] = flat_b[index_b.to(flat_b.device)]
        if bool(in_a.any()):
            assert self.hidden_a is not None
            t_a = self.hidden_a.shape[1]
            flat_a = self.hidden_a.reshape(-1, hidden)
            index_a = self.group[rows[in_a]] * t_a + positions[in_a]
            out[in_a.to(out.device)] = flat_a[index_a.to(flat_a.device)]
        return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    i = 0
    while i < limit and a[i] == b[i]:
        i += 1
    return i


def shared_prefix_groups(prompts: list[list[int]]) -> list[tuple[list[int], int]]:
    """Groups of prompt indices that share a prefix worth computing once, with its length.

    Over the prompts in sorted order, a range is either one group (prefix = the smallest common
    prefix of neighbours) or split where that smallest common prefix occurs, whichever saves more
    recomputed tokens (``(members - 1) * prefix``). So rollouts of one question share their long
    teacher prompt even when all questions also share a system prompt. Every member keeps at
    least one suffix token; prefixes shorter than MIN_SHARED_PREFIX are not worth a second pass.
    """
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    lcp = [
        min(_common_prefix(prompts[a], prompts[b]), len(prompts[a]) - 1, len(prompts[b]) - 1)
        for a, b in itertools.pairwise(order)
    ]

    def best(lo: int, hi: int) -> tuple[int, list[tuple[list[int], int]]]:
        if hi - lo < 2:
            return 0, []
        shortest = min(lcp[lo : hi - 1])
        single = (hi - lo - 1) * shortest if shortest >= MIN_SHARED_PREFIX else 0
        saved, groups, start = 0, [], lo
        for i in range(lo, hi - 1):
            if lcp[i] == shortest:
                part_saved, part_groups = best(start, i + 1)
                saved, start = saved + part_saved, i + 1
                groups.extend(part_groups)
        part_saved, part_groups = best(start, hi)
        saved += part_saved
        groups.extend(part_groups)
        if single > 0 and single >= saved:
            return single, [(order[lo:hi], shortest)]
        return saved, groups

    return best(0, len(order))[1]


def _padded(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def prefill(rt: ModelRuntime, prompts: list[list[int]], *, need_cache: bool) -> Prefill:
    n = len(prompts)
    groups = shared_prefix_groups(prompts)
    prefix_len = torch.zeros(n, dtype=torch.long)
    group = torch.full((n,), -1, dtype=torch.long)
    for g, (members, length) in enumerate(groups):
        for i in members:
            prefix_len[i] = length
            group[i] = g
    cache = None
    hidden_a = None
    mask_prefix = torch.zeros((n, 0), dtype=torch.long)
    if groups:
        prefixes = [prompts[members[0]][:length] for members, length in groups]
        t_a = max(len(p) for p in prefixes)
        ids_a, _ = _padded(prefixes, t_a)
        hidden_a, cache = rt.hidden_states(ids_a, use_cache=True)
        cache.batch_select_indices(group.clamp(min=0).to(rt.device))
        mask_prefix = torch.zeros((n, t_a), dtype=torch.long)
        for i in range(n):
            mask_prefix[i, : int(prefix_len[i])] = 1
    suffixes = [prompts[i][int(prefix_len[i]) :] for i in range(n)]
    t_b = max(len(s) for s in suffixes)
    ids_b, mask_b = _padded(suffixes, t_b)
    if groups:
        mask = torch.cat([mask_prefix, mask_b], dim=1)
        positions = prefix_len[:, None] + torch.arange(t_b)[None, :]
        hidden_b, cache = rt.hidden_states(
            ids_b,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
    else:
        mask = mask_b
        hidden_b, cache = rt.hidden_states(ids_b, use_cache=need_cache)
    return Prefill(
        lengths=[len(p) for p in prompts],
        prefix_len=prefix_len,
        group=group,
        hidden_a=hidden_a,
        hidden_b=hidden_b,
        cache=cache if need_cache else None,
        mask=mask,
    )


# --- prompt scoring -----------------------------------------------------------------------


@dataclass
class PromptScores:
    prompt_logprobs: np.ndarray | None  # (L,) float32, NaN where not computed
    topk: TopkLogprobs | None
    target_logprobs: types.TensorData | None


def score_prompts(
    rt: ModelRuntime, pre: Prefill, requests: list[SampleRequest], prompt_index: list[int]
) -> list[PromptScores | None]:
    """Prompt log-probs / top-K / target log-probs for every request that asks for them."""
    wanted = [i for i, r in enumerate(requests) if r.scores_prompt]
    results: list[PromptScores | None] = [None] * len(requests)
    if not wanted:
        return results
    row_u, row_pos, row_token, spans = [], [], [], []
    for i in wanted:
        r = requests[i]
        length = len(r.prompt)
        first = 1 if r.target_prompt_ids is not None else r.first_scored_row
        rows = np.arange(first, length)
        spans.append((i, first, len(rows)))
        row_u.append(np.full(len(rows), prompt_index[i]))
        row_pos.append(rows - 1)
        row_token.append(np.asarray(r.prompt, dtype=np.int64)[first:])
    us = torch.from_numpy(np.concatenate(row_u)).long()
    positions = torch.from_numpy(np.concatenate(row_pos)).long()
    tokens = torch.from_numpy(np.concatenate(row_token)).long()
    k_max = max(requests[i].topk_prompt_logprobs for i in wanted)
    k_target = max(
        (r.target_prompt_ids.shape[1] for r in requests if r.target_prompt_ids is not None),
        default=0,
    )
    targets = None
    if k_target:
        targets = torch.full((tokens.shape[0], k_target), -1, dtype=torch.long)
        offset = 0
        for i, first, count in spans:
            ids = requests[i].target_prompt_ids
            if ids is not None:
                # target row j scores prompt position j + 1 (row `first - 1` onwards)
                targets[offset : offset + count, : ids.shape[1]] = ids[first - 1 :]
            offset += count

    total = tokens.shape[0]
    token_lp = torch.empty(total, dtype=torch.float32)
    top_ids = torch.empty((total, k_max), dtype=torch.int32)
    top_lp = torch.empty((total, k_max), dtype=torch.float32)
    target_lp = torch.zeros((total, k_target), dtype=torch.float32)
    chunk = rt.chunk_rows()
    for start in range(0, total, chunk):
        end = min(total, start + chunk)
        hidden = pre.select(us[start:end], positions[start:end])
        logprobs = rt.full_logprobs(hidden)
        token_lp[start:end] = (
            logprobs.gather(1, tokens[start:end, None].to(logprobs.device)).squeeze(1).cpu()
        )
        if k_max:
            values, ids = torch.topk(logprobs, k_max, dim=-1)
            top_ids[start:end] = ids.to(torch.int32).cpu()
            top_lp[start:end] = values.cpu()
        if targets is not None:
            chunk_targets = targets[start:end].to(logprobs.device)
            gathered = logprobs.gather(1, chunk_targets.clamp(min=0))
            target_lp[start:end] = torch.where(
                chunk_targets >= 0, gathered, torch.zeros_like(gathered)
            ).cpu()

    offset = 0
    for i, first, count in spans:
        r = requests[i]
        length = len(r.prompt)
        lo = offset + (r.first_scored_row - first)  # rows before first_scored_row stay empty
        hi = offset + count
        scored = slice(r.first_scored_row, length)
        prompt_lp = None
        if r.include_prompt_logprobs:
            prompt_lp = np.full(length, np.nan, dtype=np.float32)
            prompt_lp[scored] = token_lp[lo:hi].numpy()
        topk = None
        if r.topk_prompt_logprobs:
            k = r.topk_prompt_logprobs
            ids = np.zeros((length, k), dtype=np.int32)
            lps = np.full((length, k), MASK_LOGPROB, dtype=np.float32)
            ids[scored] = top_ids[lo:hi, :k].numpy()
            lps[scored] = top_lp[lo:hi, :k].numpy()
            topk = TopkLogprobs(token_ids=ids, logprobs=lps)
        target = None
        if r.target_prompt_ids is not None:
            k = r.target_prompt_ids.shape[1]
            values = target_lp[offset:hi, :k].numpy().copy()
            target = types.TensorData.from_numpy(values)
        results[i] = PromptScores(prompt_lp, topk, target)
        offset += count
    return results


def prompt_full_logprobs(
    rt: ModelRuntime, prompts: list[list[int]], rows: list[list[int]]
) -> list[torch.Tensor]:
    """Full-vocabulary log-softmax rows (row ``i`` = the distribution predicting prompt token
    ``i``) of each prompt -> one ``(len(rows[j]), V)`` float32 tensor per prompt."""
    pre = prefill(rt, prompts, need_cache=False)
    out = []
    for j, wanted in enumerate(rows):
        if not wanted:
            out.append(torch.zeros((0, rt.vocab_size), dtype=torch.float32, device=rt.device))
            continue
        positions = torch.tensor(wanted, dtype=torch.long) - 1
        hidden = pre.select(torch.full_like(positions, j), positions)
        out.append(rt.full_logprobs(hidden))
    return out


# --- generation ---------------------------------------------------------------------------


@dataclass
class _Row:
    request: int
    sample: int
    prompt: int
    tokens: list[int]
    logprobs: list[float]
    topk_ids: list[np.ndarray]
    topk_lps: list[np.ndarray]
    stop_reason: str | None = None


_CDF_BLOCK = 256


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index ``i`` of each row with ``cdf[i - 1] <= u * total < cdf[i]``, exact up to float32
    rounding: float64 cumulative sums over blocks of 256 entries, then inside the chosen block
    (a float32 cumsum over 50k-150k entries would be off by ~1e-4)."""
    rows, vocab = probs.shape
    blocks = -(-vocab // _CDF_BLOCK)
    padded = torch.nn.functional.pad(probs, (0, blocks * _CDF_BLOCK - vocab)).view(
        rows, blocks, _CDF_BLOCK
    )
    block_mass = padded.sum(dim=-1, dtype=torch.float64)
    block_cdf = block_mass.cumsum(dim=-1)
    draw = uniforms.to(torch.float64) * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, draw[:, None], right=True).clamp(max=blocks - 1)
    inside_draw = draw - (block_cdf.gather(1, block) - block_mass.gather(1, block)).squeeze(1)
    row_index = torch.arange(rows, device=probs.device)
    inner = padded[row_index, block.squeeze(1)]
    inner_cdf = inner.to(torch.float64).cumsum(dim=-1)
    offset = torch.searchsorted(inner_cdf, inside_draw[:, None], right=True).squeeze(1)
    # Rounding can push the draw past the block's last positive entry: take that entry then.
    last_positive = _CDF_BLOCK - 1 - (inner > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    offset = torch.minimum(offset, last_positive)
    return block.squeeze(1) * _CDF_BLOCK + offset


def _choose_tokens(
    logprobs: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of full-vocabulary log-probs ``(B, V)`` -> (tokens, log-prob under
    the distribution actually sampled).

    Temperature 0 is greedy (log-prob 0). Otherwise: temperature, then top-k, then top-p on the
    renormalized distribution, then inverse-CDF sampling with the row's uniform draw (so a seeded
    request is reproducible whatever else shares its batch).
    """
    rows, vocab = logprobs.shape
    tokens = torch.empty(rows, dtype=torch.long, device=logprobs.device)
    chosen_lp = torch.zeros(rows, dtype=torch.float32, device=logprobs.device)
    greedy = temperature <= 0
    if bool(greedy.any()):
        tokens[greedy] = logprobs[greedy].argmax(dim=-1)
    sampled = ~greedy
    if not bool(sampled.any()):
        return tokens, chosen_lp
    scaled = logprobs[sampled] / temperature[sampled, None]
    k = top_k[sampled]
    p = top_p[sampled]
    u = uniforms[sampled]
    if bool((k > 0).any()) or bool((p < 1).any()):
        values, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(values, dim=-1)
        limit = torch.where(k > 0, k, torch.full_like(k, vocab))
        ranks = torch.arange(vocab, device=logprobs.device)[None, :]
        probs = torch.where(ranks < limit[:, None], probs, torch.zeros_like(probs))
        probs = probs / probs.sum(dim=-1, keepdim=True)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each candidate (sorted)
        probs = torch.where(before < p[:, None], probs, torch.zeros_like(probs))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    else:
        order = None
        probs = torch.softmax(scaled, dim=-1)
    index = _inverse_cdf(probs, u)
    picked_prob = probs.gather(1, index[:, None]).squeeze(1)
    tokens[sampled] = index if order is None else order.gather(1, index[:, None]).squeeze(1)
    chosen_lp[sampled] = torch.log(picked_prob)
    return tokens, chosen_lp


def _stop_string_hit(tokenizer: Any, tokens: list[int], stops: tuple[str, ...]) -> bool:
    window = max(len(s) for s in stops) + 8
    text = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
    return any(s in text for s in stops)


def generate(
    rt: ModelRuntime,
    pre: Prefill,
    requests: list[SampleRequest],
    prompt_index: list[int],
    *,
    tempered_logprobs: bool,
) -> list[list[_Row]]:
    """Sample every request's ``num_samples`` completions in one KV-cached batch."""
    generators = []
    for r in requests:
        seed = r.seed if r.seed is not None else random.SystemRandom().getrandbits(63)
        generators.append(torch.Generator(device="cpu").manual_seed(seed))
    rows: list[_Row] = []
    for ri, r in enumerate(requests):
        for k in range(r.num_samples):
            rows.append(_Row(ri, k, prompt_index[ri], [], [], [], []))
    n_rows = len(rows)
    device = rt.device
    temperature = torch.tensor([requests[row.request].temperature for row in rows], device=device)
    top_k = torch.tensor([requests[row.request].top_k for row in rows], device=device)
    top_p = torch.tensor([requests[row.request].top_p for row in rows], device=device)
    k_sample = max(r.topk_sample_logprobs for r in requests)

    def draws(active_rows: list[int]) -> torch.Tensor:
        # Every live request draws num_samples uniforms per step, used or not, so its stream
        # depends on nothing but its own progress.
        per_request: dict[int, torch.Tensor] = {}
        for row_id in active_rows:
            ri = rows[row_id].request
            if ri not in per_request:
                per_request[ri] = torch.rand(requests[ri].num_samples, generator=generators[ri])
        return torch.tensor(
            [float(per_request[rows[i].request][rows[i].sample]) for i in active_rows],
            device=device,
        )

    def step(active: list[int], logits: torch.Tensor) -> list[int]:
        """Append one token to each row of ``active`` (row ids, aligned with ``logits``)."""
        index = torch.tensor(active, device=device)
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens, sampled_lp = _choose_tokens(
            logprobs, temperature[index], top_k[index], top_p[index], draws(active)
        )
        raw_lp = logprobs.gather(1, tokens[:, None]).squeeze(1)
        reported = (sampled_lp if tempered_logprobs else raw_lp).cpu().tolist()
        top = None
        if k_sample:
            values, ids = torch.topk(logprobs, k_sample, dim=-1)
            top = (ids.to(torch.int32).cpu().numpy(), values.cpu().numpy())
        token_list = tokens.cpu().tolist()
        finished = []
        for j, row_id in enumerate(active):
            row = rows[row_id]
            r = requests[row.request]
            token = token_list[j]
            row.tokens.append(token)
            row.logprobs.append(reported[j])
            if top is not None and r.topk_sample_logprobs:
                row.topk_ids.append(top[0][j, : r.topk_sample_logprobs])
                row.topk_lps.append(top[1][j, : r.topk_sample_logprobs])
            if token in r.stop_tokens or (
                r.stop_strings and _stop_string_hit(rt.tokenizer, row.tokens, r.stop_strings)
            ):
                row.stop_reason = "stop"
            elif len(row.tokens) >= r.max_tokens:
                row.stop_reason = "length"
            if row.stop_reason is not None:
                finished.append(row_id)
        return finished

    # First token of every row: from the last prompt position, computed once per unique prompt.
    last = torch.tensor([pre.lengths[u] - 1 for u in range(len(pre.lengths))], dtype=torch.long)
    first_logits = rt.logits(pre.select(torch.arange(len(pre.lengths)), last))
    all_rows = list(range(n_rows))
    row_prompt = torch.tensor([row.prompt for row in rows], dtype=torch.long, device=device)
    step(all_rows, first_logits[row_prompt])

    active = [i for i in all_rows if rows[i].stop_reason is None]
    if not active:
        return _group_rows(rows, len(requests))
    cache = pre.cache
    assert cache is not None, "generation past the first token needs the prefill cache"
    batch = list(active)  # row ids in cache order
    cache_index = torch.tensor([rows[i].prompt for i in batch], dtype=torch.long, device=device)
    cache.batch_select_indices(cache_index)
    mask = pre.mask.to(device)[cache_index]
    positions = torch.tensor([pre.lengths[rows[i].prompt] for i in batch], device=device)
    live = set(batch)
    while live:
        last_tokens = torch.tensor([rows[i].tokens[-1] for i in batch], device=device)[:, None]
        mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=device)], 1)
        hidden, cache = rt.hidden_states(
            last_tokens,
            attention_mask=mask,
            position_ids=positions[:, None],
            cache=cache,
            use_cache=True,
        )
        positions = positions + 1
        live_slots = [j for j, row_id in enumerate(batch) if row_id in live]
        slot_index = torch.tensor(live_slots, device=device)
        logits = rt.logits(hidden[slot_index, -1])
        for row_id in step([batch[j] for j in live_slots], logits):
            live.discard(row_id)
        # Drop finished rows from the batch once they are a quarter of it.
        if live and len(batch) - len(live) >= max(1, len(batch) // 4):
            keep = [j for j, row_id in enumerate(batch) if row_id in live]
            keep_index = torch.tensor(keep, device=device)
            cache.batch_select_indices(keep_index)
            mask = mask[keep_index]
            positions = positions[keep_index]
            batch = [batch[j] for j in keep]
    return _group_rows(rows, len(requests))


def _group_rows(rows: list[_Row], n_requests: int) -> list[list[_Row]]:
    grouped: list[list[_Row]] = [[] for _ in range(n_requests)]
    for row in rows:
        grouped[row.request].append(row)
    return grouped


def sampled_sequence(row: _Row, sequence_id: str, topk_k: int) -> types.SampledSequence:
    topk = None
    if topk_k:
        topk = TopkLogprobs(
            token_ids=np.stack(row.topk_ids).astype(np.int32),
            logprobs=np.stack(row.topk_lps).astype(np.float32),
        )
    assert row.stop_reason in ("stop", "length")
    return types.SampledSequence(
        stop_reason=row.stop_reason,  # type: ignore[arg-type]
        sequence_id=sequence_id,
        tokens_np=np.asarray(row.tokens, dtype=np.int32),
        logprobs_np=np.asarray(row.logprobs, dtype=np.float32),
        topk_logprobs_np=topk,
    )
