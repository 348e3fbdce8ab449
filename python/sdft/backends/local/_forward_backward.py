"""``forward`` / ``forward_backward`` / ``forward_backward_custom`` on one model: built-in losses
and user loss functions over the padded micro-batches, gradients accumulated in ``.grad``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from tinker import types

from sdft.backends.local._inputs import PreparedDatum
from sdft.backends.local._losses import datum_loss, rows_with_gradient
from sdft.backends.local._padded_forward import datum_logprobs, micro_batches
from sdft.backends.local._runtime import ModelRuntime

CustomLossFn = Callable[
    [list[types.Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]
]


def run_builtin_loss(
    rt: ModelRuntime,
    prepared: list[PreparedDatum],
    loss_fn: str,
    config: dict[str, float],
    *,
    backward: bool,
    batch_tokens: int,
) -> types.ForwardBackwardOutput:
    """The summed loss and per-target log-probs; with ``backward`` its gradient is added."""
    outputs: list[torch.Tensor | None] = [None] * len(prepared)
    total = 0.0
    grad_mode = torch.enable_grad() if backward else torch.no_grad()
    with grad_mode:
        for batch in micro_batches(prepared, batch_tokens):
            need_grad = None
            if backward:
                need_grad = [rows_with_gradient(loss_fn, d.values) for d in batch]
            logprobs = datum_logprobs(rt, batch, need_grad)
            loss = sum(
                (
                    datum_loss(loss_fn, lp, d.values_on(rt.device), config)
                    for d, lp in zip(batch, logprobs, strict=True)
                ),
                start=torch.zeros((), device=rt.device),
            )
            if backward and loss.requires_grad:
                loss.backward()
            total += float(loss.detach())
            for d, lp in zip(batch, logprobs, strict=True):
                outputs[d.index] = lp.detach()
    return forward_output(prepared, outputs, {"loss:sum": total})


def run_custom_loss(
    rt: ModelRuntime,
    data: list[types.Datum],
    prepared: list[PreparedDatum],
    loss_fn: CustomLossFn,
    *,
    batch_tokens: int,
) -> types.ForwardBackwardOutput:
    """``loss_fn(data, logprobs_list) -> (loss, metrics)`` on autograd-enabled log-probs shaped
    like each datum's ``target_tokens``; ``loss`` is backpropagated."""
    batches = micro_batches(prepared, batch_tokens)
    with torch.enable_grad():
        if len(batches) == 1:
            ordered = _ordered(batches[0], datum_logprobs(rt, batches[0], None), len(prepared))
            shaped = [lp.reshape(d.target_shape) for d, lp in zip(prepared, ordered, strict=True)]
            loss, metrics = _call_custom(loss_fn, data, shaped)
            if loss.requires_grad:
                loss.backward()
        else:
            # Two passes keep memory bounded: log-probs without a graph, the loss and its
            # gradient w.r.t. them, then per micro-batch the linear surrogate sum(g * logp).
            with torch.no_grad():
                ordered = [torch.empty(0)] * len(prepared)
                for batch in batches:
                    for d, lp in zip(batch, datum_logprobs(rt, batch, None), strict=True):
                        ordered[d.index] = lp
            leaves = [
                lp.reshape(d.target_shape).clone().requires_grad_(True)
                for d, lp in zip(prepared, ordered, strict=True)
            ]
            loss, metrics = _call_custom(loss_fn, data, leaves)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            for batch in batches:
                upstream = [
                    torch.zeros_like(ordered[d.index])
                    if grads[d.index] is None
                    else grads[d.index].reshape(ordered[d.index].shape).detach()
                    for d in batch
                ]
                need_grad = [(g != 0).any(dim=1) for g in upstream]
                logprobs = datum_logprobs(rt, batch, need_grad)
                surrogate = sum(
                    ((g * lp).sum() for g, lp in zip(upstream, logprobs, strict=True)),
                    start=torch.zeros((), device=rt.device),
                )
                if surrogate.requires_grad:
                    surrogate.backward()
    all_metrics = {"loss:sum": float(loss.detach())}
    all_metrics.update({key: float(value) for key, value in metrics.items()})
    return forward_output(prepared, [lp.detach() for lp in ordered], all_metrics)


def _ordered(
    batch: list[PreparedDatum], logprobs: list[torch.Tensor], n: int
) -> list[torch.Tensor]:
    out: list[torch.Tensor] = [torch.empty(0)] * n
    for d, lp in zip(batch, logprobs, strict=True):
        out[d.index] = lp
    return out


def _call_custom(
    loss_fn: CustomLossFn, data: list[types.Datum], logprobs: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    result = loss_fn(data, logprobs)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError("custom loss_fn must return (loss, metrics)")
    loss, metrics = result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("custom loss_fn must return a scalar torch.Tensor loss")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"custom loss_fn metrics must be a dict, got {type(metrics).__name__}")
    return loss.reshape(()), dict(metrics)


def forward_output(
    prepared: list[PreparedDatum],
    logprobs: Sequence[torch.Tensor | None],
    metrics: dict[str, float],
) -> types.ForwardBackwardOutput:
    """Tinker's response: per datum its log-probs shaped like ``target_tokens``, and metrics."""
    outputs = []
    for d, lp in zip(prepared, logprobs, strict=True):
        assert lp is not None
        array = lp.detach().to("cpu", torch.float32).reshape(d.target_shape).numpy()
        outputs.append({"logprobs": types.TensorData.from_numpy(array)})
    return types.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics=metrics
    )
