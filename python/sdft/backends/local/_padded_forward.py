"""The training forward every loss runs through: datums packed into right-padded micro-batches,
one causal forward per micro-batch, then the log-probs of each datum's targets."""

from __future__ import annotations

import torch

from sdft.backends.local._inputs import PreparedDatum
from sdft.backends.local._runtime import ModelRuntime


def micro_batches(prepared: list[PreparedDatum], budget: int) -> list[list[PreparedDatum]]:
    """Datums packed into padded batches of at most ``budget`` tokens (longest first; a datum
    longer than the budget gets a batch of its own)."""
    ordered = sorted(prepared, key=lambda d: d.length, reverse=True)
    batches: list[list[PreparedDatum]] = []
    current: list[PreparedDatum] = []
    width = 0
    for d in ordered:
        new_width = max(width, d.length)
        if current and new_width * (len(current) + 1) > budget:
            batches.append(current)
            current, new_width = [], d.length
        current.append(d)
        width = new_width
    if current:
        batches.append(current)
    return batches


def padded_hidden(rt: ModelRuntime, batch: list[PreparedDatum]) -> list[torch.Tensor]:
    """Last hidden states ``(length, H)`` of each datum of one micro-batch (one forward).

    Right padding with pure causal attention: real positions never see the pads.
    """
    width = max(d.length for d in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    for i, d in enumerate(batch):
        ids[i, : d.length] = d.tokens
    hidden, _ = rt.hidden_states(ids)
    return [hidden[i, : d.length] for i, d in enumerate(batch)]


def datum_logprobs(
    rt: ModelRuntime, batch: list[PreparedDatum], need_grad: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """``log p(targets)`` ``(N, K)`` of each datum of one micro-batch.

    ``need_grad`` marks per datum the rows that enter the loss; the others are computed
    without a graph (they only feed ``loss_fn_outputs``). None = all rows need gradients
    (when grad is enabled).
    """
    rows = torch.cat(padded_hidden(rt, batch))
    k_max = max(d.targets.shape[1] for d in batch)
    targets = torch.zeros((rows.shape[0], k_max), dtype=torch.long)
    offset = 0
    for d in batch:
        targets[offset : offset + d.length, : d.targets.shape[1]] = d.targets
        offset += d.length
    targets = targets.to(rt.device)
    if need_grad is None or not torch.is_grad_enabled():
        logprobs = rt.target_logprobs(rows, targets)
    else:
        grad_rows = torch.cat(need_grad).to(rt.device)
        grad_index = torch.nonzero(grad_rows).squeeze(1)
        rest_index = torch.nonzero(~grad_rows).squeeze(1)
        with_grad = rt.target_logprobs(rows[grad_index], targets[grad_index])
        with torch.no_grad():
            without = rt.target_logprobs(rows[rest_index].detach(), targets[rest_index])
        logprobs = (
            torch.zeros((rows.shape[0], k_max), dtype=torch.float32, device=rt.device)
            .index_copy(0, grad_index, with_grad)
            .index_copy(0, rest_index, without)
        )
    out = []
    offset = 0
    for d in batch:
        out.append(logprobs[offset : offset + d.length, : d.targets.shape[1]])
        offset += d.length
    return out
