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


class StreamedTraining:
    """The cookbook's pipelined substeps, fed as the datums are built.

    The batch is cut into ``num_substeps`` contiguous chunks exactly as :func:`split_evenly` cuts
    the whole batch (so the chunk sizes need the batch's size, given by :meth:`expect`); each
    chunk's ``forward_backward`` and ``optim_step`` are submitted as soon as all of its datums have
    been added, in batch order. The requests, their contents and their order are those of
    :func:`train_pipelined` on the whole batch, so the results are too.
    """

    def __init__(
        self,
        training_client: Any,
        submit: Callable[[list[types.Datum]], Any],
        adam: types.AdamParams,
        num_substeps: int,
    ) -> None:
        self.training_client = training_client
        self.submit = submit
        self.adam = adam
        self.num_substeps = num_substeps
        self._sizes: list[int] | None = None
        self._waiting: list[types.Datum] = []
        self._submitted: list[tuple[Any, Any]] = []

    def expect(self, total: int) -> None:
        """The batch has ``total`` datums (known once every question is sampled)."""
        if self._sizes is not None:
            raise RuntimeError("StreamedTraining.expect was already called")
        if total < 1:
            raise ValueError(f"a training step needs at least one datum, got {total}")
        self._sizes = [len(chunk) for chunk in split_evenly(range(total), self.num_substeps)]
        self._flush()

    def add(self, datums: Sequence[types.Datum]) -> None:
        """The next datums in batch order."""
        self._waiting.extend(datums)
        self._flush()

    @property
    def complete(self) -> bool:
        """Every substep has been submitted."""
        return self._sizes is not None and len(self._submitted) == len(self._sizes)

    def _flush(self) -> None:
        if self._sizes is None:
            return
        while len(self._submitted) < len(self._sizes):
            size = self._sizes[len(self._submitted)]
            if len(self._waiting) < size:
                return
            chunk, self._waiting = self._waiting[:size], self._waiting[size:]
            forward_backward = self.submit([sdft_data.strip_mask(datum) for datum in chunk])
            self._submitted.append((forward_backward, self.training_client.optim_step(self.adam)))
        if self._waiting:
            raise ValueError(
                f"{len(self._waiting)} datum(s) more than the {sum(self._sizes)} expected"
            )

    async def loss_sum(self) -> float:
        """The summed ``loss:sum`` of every substep, once all are done."""
        if not self.complete:
            expected = "unknown" if self._sizes is None else sum(self._sizes)
            raise RuntimeError(
                f"{len(self._submitted)} substep(s) submitted, batch size {expected}: "
                "not every datum was added"
            )
        total = 0.0
        for forward_backward, optim in self._submitted:
            output = await resolve(forward_backward)
            await resolve(optim)
            total += float(output.metrics["loss:sum"])
        return total


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
