"""The optimizer side of a step: learning-rate schedule, Adam parameters, and the cookbook's
pipelined ``forward_backward`` + ``optim_step`` over substeps (backend-neutral)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from tinker import types

from sdft import data as sdft_data
from sdft.clients import resolve
from sdft.config import Config


def learning_rate_at(config: Config, step: int) -> float:
    """Learning rate of 1-based ``step`` under ``lr_schedule`` (decaying towards 0 at the end).

    The schedule spans the config's ``max_steps``; a resumed run may not change ``max_steps``
    under a decaying schedule (:mod:`sdft.rundir` refuses), so the curve is never re-based."""
    params = config.params
    progress = (step - 1) / params.max_steps
    if params.lr_schedule == "linear":
        return params.learning_rate * (1.0 - progress)
    if params.lr_schedule == "cosine":
        return params.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return params.learning_rate


def adam_params(config: Config, step: int) -> types.AdamParams:
    params = config.params
    return types.AdamParams(
        learning_rate=learning_rate_at(config, step),
        beta1=params.beta1,
        beta2=params.beta2,
        eps=params.eps,
        weight_decay=params.weight_decay,
        grad_clip_norm=params.grad_clip_norm,
    )


def split_evenly(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` cut into ``min(parts, len(items))`` contiguous chunks of near-equal size."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(list(items[start:end]))
        start = end
    return chunks


async def train_pipelined(
    training_client: Any,
    datums: list[types.Datum],
    submit: Callable[[list[types.Datum]], Any],
    adam: types.AdamParams,
    num_substeps: int,
) -> float:
    """The cookbook's ``train_step``: one optimizer step per substep, the next
    forward-backward + optim_step submitted before the current ones are awaited.
    Returns the summed ``loss:sum`` of every substep."""
    batches = split_evenly(datums, num_substeps)

    def enqueue(batch: list[types.Datum]) -> tuple[Any, Any]:
        forward_backward = submit([sdft_data.strip_mask(datum) for datum in batch])
        return forward_backward, training_client.optim_step(adam)

    loss_sum = 0.0
    pending = enqueue(batches[0])
    for index in range(len(batches)):
        following = enqueue(batches[index + 1]) if index + 1 < len(batches) else None
        output = await resolve(pending[0])
        await resolve(pending[1])
        loss_sum += float(output.metrics["loss:sum"])
        if following is not None:
            pending = following
    return loss_sum
