"""The training client's optimizer: torch's AdamW driven by Tinker's ``AdamParams``."""

from __future__ import annotations

from typing import Any

import torch
from tinker import types


def make_adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """torch's AdamW with Tinker's default hyper-parameters (each optim_step sets its own).

    The fused implementation (one kernel over all tensors; several times faster on CPU) is used
    where torch supports it for these parameters.
    """
    defaults = types.AdamParams()
    kwargs: dict[str, Any] = {
        "lr": defaults.learning_rate,
        "betas": (defaults.beta1, defaults.beta2),
        "eps": defaults.eps,
        "weight_decay": defaults.weight_decay,
    }
    fusable = all(
        p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in params
    )
    return torch.optim.AdamW(params, fused=fusable or None, **kwargs)


def adamw_step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    hyper: types.AdamParams,
) -> float:
    """One step with ``hyper`` (decoupled weight decay, global-norm clipping when
    ``grad_clip_norm > 0``), then clear the gradients; returns the gradient norm before
    clipping (0 without gradients)."""
    for group in optimizer.param_groups:
        group["lr"] = hyper.learning_rate
        group["betas"] = (hyper.beta1, hyper.beta2)
        group["eps"] = hyper.eps
        group["weight_decay"] = hyper.weight_decay
    with_grad = [p for p in params if p.grad is not None]
    grad_norm = 0.0
    if with_grad:
        if hyper.grad_clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, hyper.grad_clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
        grad_norm = float(norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
