"""The service's built-in losses, per datum, all summed (never averaged).

``logprobs`` is the training model's ``log p(target_tokens)`` shaped ``(N, K)`` (``K = 1`` for 1-D
targets); ``values`` are the datum's float inputs shaped the same way.
"""

from __future__ import annotations

import torch


def datum_loss(
    loss_fn: str, logprobs: torch.Tensor, values: dict[str, torch.Tensor], config: dict[str, float]
) -> torch.Tensor:
    if loss_fn == "cross_entropy":
        return -(values["weights"] * logprobs).sum()
    sampler_logprobs = values["logprobs"]
    advantages = values["advantages"]
    ratio = torch.exp(logprobs - sampler_logprobs)
    if loss_fn == "importance_sampling":
        return -(ratio * advantages).sum()
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    if loss_fn == "ppo":
        clipped = torch.clamp(ratio, low, high)
        return -torch.minimum(ratio * advantages, clipped * advantages).sum()
    if loss_fn == "cispo":
        clipped = torch.clamp(ratio, low, high).detach()
        return -(clipped * logprobs * advantages).sum()
    raise ValueError(f"unknown loss_fn {loss_fn!r}")


def rows_with_gradient(loss_fn: str, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rows ``(N,)`` whose log-probs influence the loss (the others need no backward pass)."""
    key = "weights" if loss_fn == "cross_entropy" else "advantages"
    return (values[key] != 0).any(dim=1)


def forward_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """``sum_rows KL(teacher || student)`` over full-vocabulary log-prob rows ``(R, V)``.

    Written as ``sum p_T (log p_T - log p_S)``; cells where the teacher probability is 0 add 0.
    """
    p = teacher_logprobs.exp()
    terms = p * (teacher_logprobs - student_logprobs)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum()
