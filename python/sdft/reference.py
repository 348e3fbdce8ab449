"""Plain-Python oracle of the top-K kernel and of the reverse-KL loss, written for clarity.

Tests compare :func:`sdft.build_topk_targets` and :func:`sdft.losses.reverse_kl_custom_loss`
against these. Nothing here is fast; nothing here is used on the training path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tinker

__all__ = ["reference_reverse_kl_loss", "reference_topk_targets"]


def _renormalize(logprobs: list[float]) -> list[float]:
    """``lp - logsumexp(lp)`` for each entry (float64, max-shifted)."""
    largest = max(logprobs)
    log_total = largest + math.log(sum(math.exp(lp - largest) for lp in logprobs))
    return [lp - log_total for lp in logprobs]


def reference_topk_targets(
    *,
    student_data: Sequence[tinker.Datum],
    completion_slices: Sequence,
    teacher_topk_logprobs: Sequence[Sequence[Sequence[tuple[int, float]] | None] | None],
    topk: int = 20,
    vocab_size: int | None = None,
    skip_first_n: int = 3,
    weight_scale: float = 1.0,
) -> tuple[list[tuple[list[list[int]], list[list[float]]]], dict[str, float]]:
    """What :func:`sdft.build_topk_targets` computes, from the list view.

    Returns per datum ``(target_tokens, weights)`` as nested lists of shape ``(N, topk)`` (weights
    as Python floats, before the float32 cast) and the metrics dict with the same keys.
    """
    outputs = []
    completion_tokens = 0
    distilled = 0
    skipped = 0
    missing = 0
    vocab_filtered = 0
    vocab_emptied = 0
    truncated_positions = 0
    entropy_sum = 0.0

    for datum, completion_slice, teacher_rows in zip(
        student_data, completion_slices, teacher_topk_logprobs, strict=True
    ):
        mask = datum.loss_fn_inputs["mask"].tolist()
        num_rows = len(mask)
        target_tokens = [[0] * topk for _ in range(num_rows)]
        weights = [[0.0] * topk for _ in range(num_rows)]

        # Student positions that predict completion tokens, in order.
        positions = [j for j, value in enumerate(mask) if value > 0]
        n = min(len(completion_slice.tokens), len(positions))
        completion_tokens += n
        truncated_positions += len(positions) - n
        rows = teacher_rows if teacher_rows is not None else []

        for t in range(n):
            if t < skip_first_n:
                skipped += 1
                continue
            # Teacher row q + t and student position positions[t] both predict completion token t.
            teacher_row = completion_slice.teacher_prompt_len + t
            row = rows[teacher_row] if teacher_row < len(rows) else None
            if not row:
                missing += 1
                continue
            taken = list(row[:topk])  # the top-K cut first ...
            kept = [
                (token_id, logprob)
                for token_id, logprob in taken
                if vocab_size is None or token_id < vocab_size
            ]  # ... then the vocabulary filter
            vocab_filtered += len(taken) - len(kept)
            if not kept:
                vocab_emptied += 1
                continue
            renormalized = _renormalize([float(logprob) for _, logprob in kept])
            probabilities = [math.exp(lp) for lp in renormalized]
            entropy_sum += -sum(
                p * lp for p, lp in zip(probabilities, renormalized, strict=True) if p > 0
            )
            student_row = positions[t]
            for k, ((token_id, _), p) in enumerate(zip(kept, probabilities, strict=True)):
                target_tokens[student_row][k] = int(token_id)
                weights[student_row][k] = p * weight_scale
            distilled += 1

        outputs.append((target_tokens, weights))

    metrics = {
        "sdft/teacher_truncated_count": float(sum(bool(s.truncated) for s in completion_slices)),
        "sdft/num_datums": float(len(outputs)),
        "sdft/topk": float(topk),
    }
    if completion_tokens > 0:
        metrics["sdft/total_completion_tokens"] = float(completion_tokens)
        metrics["sdft/mean_teacher_entropy"] = entropy_sum / completion_tokens
    metrics["sdft/distilled_positions"] = float(distilled)
    metrics["sdft/mean_teacher_entropy_distilled"] = entropy_sum / distilled if distilled else 0.0
    metrics["sdft/skipped_positions"] = float(skipped)
    metrics["sdft/missing_teacher_rows"] = float(missing)
    metrics["sdft/vocab_filtered_ids"] = float(vocab_filtered)
    metrics["sdft/vocab_emptied_positions"] = float(vocab_emptied)
    metrics["sdft/truncated_positions"] = float(truncated_positions)
    return outputs, metrics


def reference_reverse_kl_loss(
    weights: Sequence[Sequence[Sequence[float]]],
    student_logprobs: Sequence[Sequence[Sequence[float]]],
) -> tuple[float, dict[str, float]]:
    """The value of :func:`sdft.losses.reverse_kl_custom_loss` and its metrics.

    ``weights[d][n][k]`` is the teacher's renormalized probability (0 = invalid slot) and
    ``student_logprobs[d][n][k]`` the student's log-prob of the same token. At every position with
    valid slots the student is renormalized over them and ``KL(p || q)`` is added.
    """
    loss = 0.0
    entropy = 0.0
    positions = 0
    for datum_weights, datum_logprobs in zip(weights, student_logprobs, strict=True):
        for row_weights, row_logprobs in zip(datum_weights, datum_logprobs, strict=True):
            valid = [k for k, w in enumerate(row_weights) if w > 0]
            if not valid:
                continue
            positions += 1
            log_p = _renormalize([float(row_logprobs[k]) for k in valid])
            for lp, k in zip(log_p, valid, strict=True):
                p = math.exp(lp)
                loss += p * (lp - math.log(row_weights[k]))
                entropy -= p * lp
    metrics = {"sdft/reverse_kl_loss": loss, "sdft/reverse_kl_positions": float(positions)}
    if positions:
        metrics["sdft/reverse_kl_mean"] = loss / positions
        metrics["sdft/student_entropy_mean"] = entropy / positions
    return loss, metrics
