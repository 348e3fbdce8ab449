"""Local extra: exact full-vocabulary forward KL ``KL(teacher || student)`` at every distilled
completion position (what top-K cross-entropy approximates), with the teacher's rows computed
by a local sampler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tinker import types

from sdft.backends.local._errors import LocalBadRequestError
from sdft.backends.local._forward_backward import forward_output
from sdft.backends.local._inputs import PreparedDatum, model_input_tokens
from sdft.backends.local._losses import forward_kl
from sdft.backends.local._padded_forward import micro_batches, padded_hidden
from sdft.backends.local._runtime import ModelRuntime
from sdft.backends.local._sampling import LocalSamplingClient


@dataclass
class KlItem:
    """Which student positions of datum ``index`` pair with which rows of its teacher sequence."""

    index: int
    student_positions: list[int]
    teacher_tokens: list[int]
    teacher_rows: list[int]


def kl_plan(
    prepared: list[PreparedDatum],
    teacher_sequences: Sequence[types.ModelInput | None],
    completion_slices: Sequence[Any],
    skip_first_n: int,
    teacher: LocalSamplingClient,
) -> list[KlItem]:
    """Which student positions pair with which teacher rows (checked token by token)."""
    if isinstance(skip_first_n, bool) or not isinstance(skip_first_n, int) or skip_first_n < 0:
        raise LocalBadRequestError(f"skip_first_n must be an int >= 0, got {skip_first_n!r}")
    if not (len(prepared) == len(teacher_sequences) == len(completion_slices)):
        raise LocalBadRequestError(
            f"data ({len(prepared)}), teacher_sequences ({len(teacher_sequences)}) and "
            f"completion_slices ({len(completion_slices)}) must have the same length"
        )
    plan = []
    for d, sequence, completion in zip(prepared, teacher_sequences, completion_slices, strict=True):
        i = d.index
        tokens = list(getattr(completion, "tokens", None) or [])
        q = getattr(completion, "teacher_prompt_len", None)
        if not isinstance(q, int) or q < 0:
            raise LocalBadRequestError(
                f"datum {i}: completion slice has no valid teacher_prompt_len ({q!r})"
            )
        mask = d.values["mask"].reshape(-1)
        positions = torch.nonzero(mask > 0).squeeze(1).tolist()
        n = min(len(tokens), len(positions))
        if sequence is None or n <= skip_first_n:
            plan.append(KlItem(i, [], [], []))
            continue
        teacher_tokens = model_input_tokens(
            sequence,
            where=f"teacher sequence {i}",
            vocab_size=teacher.runtime.vocab_size,
            max_context=teacher.runtime.max_context,
        )
        if len(teacher_tokens) < q + n:
            raise LocalBadRequestError(
                f"datum {i}: teacher sequence has {len(teacher_tokens)} tokens, fewer than "
                f"teacher_prompt_len + completion = {q} + {n}"
            )
        targets = d.targets.reshape(-1)
        student_positions, teacher_rows = [], []
        for t in range(skip_first_n, n):
            position = positions[t]
            row = q + t
            if int(targets[position]) != teacher_tokens[row] or teacher_tokens[row] != tokens[t]:
                raise LocalBadRequestError(
                    f"datum {i}: completion token {t} is {tokens[t]} in the slice, "
                    f"{int(targets[position])} at student position {position} and "
                    f"{teacher_tokens[row]} at teacher row {row}; student and teacher sequences "
                    "are misaligned"
                )
            student_positions.append(position)
            teacher_rows.append(row)
        plan.append(KlItem(i, student_positions, teacher_tokens, teacher_rows))
    return plan


def run_full_kl(
    rt: ModelRuntime,
    prepared: list[PreparedDatum],
    teacher: LocalSamplingClient,
    plan: list[KlItem],
    *,
    batch_tokens: int,
) -> types.ForwardBackwardOutput:
    """Backpropagate the summed KL of ``plan``; per-target log-probs are reported as usual."""
    outputs: list[torch.Tensor | None] = [None] * len(prepared)
    total = 0.0
    positions_total = 0
    for batch in micro_batches(prepared, batch_tokens):
        items = [plan[d.index] for d in batch if plan[d.index].student_positions]
        teacher_rows = []
        if items:
            teacher_rows = teacher.full_logprob_rows(
                [item.teacher_tokens for item in items], [item.teacher_rows for item in items]
            )
        by_index = {item.index: rows for item, rows in zip(items, teacher_rows, strict=True)}
        with torch.enable_grad():
            hidden = padded_hidden(rt, batch)
            loss = torch.zeros((), device=rt.device)
            for d, rows_hidden in zip(batch, hidden, strict=True):
                with torch.no_grad():
                    outputs[d.index] = rt.target_logprobs(
                        rows_hidden.detach(), d.targets.to(rt.device)
                    )
                if d.index not in by_index:
                    continue
                index = torch.tensor(plan[d.index].student_positions, device=rt.device)
                # The teacher rows come from inference mode: clone them into ordinary tensors.
                teacher_rows_i = by_index[d.index].to(rt.device).clone()
                loss = loss + _kl_sum(rt, rows_hidden[index], teacher_rows_i)
                positions_total += len(plan[d.index].student_positions)
            if loss.requires_grad:
                loss.backward()
            total += float(loss.detach())
    return forward_output(
        prepared,
        outputs,
        {"loss:sum": total, "full_kl/positions:sum": float(positions_total)},
    )


def _kl_sum(rt: ModelRuntime, hidden: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
    """KL summed over rows, in chunks of bounded logits size (recomputed in the backward pass
    when there are several)."""
    chunk = rt.chunk_rows()
    total = torch.zeros((), device=rt.device)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk]
        t = teacher_rows[start : start + chunk]
        if hidden.shape[0] > chunk:
            total = total + torch.utils.checkpoint.checkpoint(
                lambda h, t: forward_kl(t, rt.full_logprobs(h)), h, t, use_reentrant=False
            )
        else:
            total = total + forward_kl(t, rt.full_logprobs(h))
    return total
