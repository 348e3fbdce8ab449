"""Custom losses for ``TrainingClient.forward_backward_custom``.

torch is imported inside the functions: ``import sdft`` itself never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import tinker

if TYPE_CHECKING:
    import torch

__all__ = ["reverse_kl_custom_loss"]


def reverse_kl_custom_loss(
    data: Sequence[tinker.Datum], logprobs_list: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reverse KL from the student to the teacher over the teacher's top-K (REINFORCE form).

    ``data`` are datums from :func:`sdft.build_reverse_kl_datums`: ``weights`` ``(N, K)`` holds
    the renormalized teacher probability ``q`` at valid slots and 0 elsewhere. ``logprobs_list``
    holds per datum the student's log-probs ``(N, K)`` at those ``target_tokens``. Per position
    with valid slots ``S`` (``weights > 0``): the student is renormalized over ``S``
    (``p = softmax(logprobs[S])``) and the loss is ``sum_{k in S} p_k * stopgrad(log p_k - log q_k)``,
    summed over positions and datums. Its value is ``KL(p || q)``; its gradient equals the exact
    gradient of that KL (the extra term ``sum p grad log p`` vanishes since ``sum p = 1``).

    Metrics: ``sdft/reverse_kl_loss`` (the summed loss), ``sdft/reverse_kl_positions`` (positions
    with valid slots) and, when there are any, ``sdft/reverse_kl_mean`` and
    ``sdft/student_entropy_mean`` (entropy of the renormalized student) per position.
    """
    import torch

    if len(data) != len(logprobs_list):
        raise ValueError(
            f"one logprobs tensor per datum is required, got {len(logprobs_list)} for {len(data)} datums"
        )
    if not data:
        raise ValueError("reverse_kl_custom_loss needs at least one datum")

    total = None
    kl_sum = 0.0
    entropy_sum = 0.0
    positions = 0
    for index, (datum, student_logprobs) in enumerate(zip(data, logprobs_list, strict=True)):
        weights_data = datum.loss_fn_inputs.get("weights")
        if weights_data is None:
            raise ValueError(
                f"datum {index}: loss_fn_inputs has no 'weights'; build datums with build_reverse_kl_datums"
            )
        weights = torch.as_tensor(weights_data.to_numpy(), device=student_logprobs.device)
        if tuple(student_logprobs.shape) != tuple(weights.shape) or weights.ndim != 2:
            raise ValueError(
                f"datum {index}: student logprobs have shape {tuple(student_logprobs.shape)}, "
                f"expected the (N, K) shape of weights {tuple(weights.shape)}"
            )
        valid = weights > 0
        position_valid = valid.any(dim=-1, keepdim=True)
        logprobs = student_logprobs.to(torch.promote_types(student_logprobs.dtype, torch.float32))
        # Invalid slots get -inf before the softmax; rows without any valid slot are replaced by
        # zeros so that no -inf - -inf appears (their slots are all masked out below).
        masked = torch.where(valid, logprobs, torch.full_like(logprobs, float("-inf")))
        masked = torch.where(position_valid, masked, torch.zeros_like(masked))
        log_p = masked - torch.logsumexp(masked, dim=-1, keepdim=True)
        log_p = torch.where(valid, log_p, torch.zeros_like(log_p))
        p = torch.where(valid, log_p.exp(), torch.zeros_like(log_p))
        log_q = torch.where(
            valid, weights.to(log_p.dtype).clamp_min(1e-30).log(), torch.zeros_like(log_p)
        )
        advantage = (log_p - log_q).detach()
        datum_loss = (p * advantage).sum()
        total = datum_loss if total is None else total + datum_loss
        with torch.no_grad():
            kl_sum += float((p * advantage).sum())
            entropy_sum += float(-(p * log_p).sum())
            positions += int(position_valid.sum())

    assert total is not None
    metrics = {
        "sdft/reverse_kl_loss": float(total.detach()),
        "sdft/reverse_kl_positions": float(positions),
    }
    if positions > 0:
        metrics["sdft/reverse_kl_mean"] = kl_sum / positions
        metrics["sdft/student_entropy_mean"] = entropy_sum / positions
    return total, metrics
