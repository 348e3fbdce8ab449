"""The data path before its fast path (``student_datum_from_rollout``, ``extract_completion_tokens``,
``build_teacher_forced_sequence``), kept verbatim as reference twins for
``tests/test_data_fastpath.py`` and ``benches/bench_client_cpu.py``. Self-contained: they do not
use ``sdft.data``'s helpers, so they cannot drift with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tinker

import sdft

MAX_TOKEN_ID = 2**31 - 1


def ref_token_array(name: str, tokens: Any) -> np.ndarray:
    array = np.asarray(tokens)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of token ids, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must contain ints, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > MAX_TOKEN_ID:
        bad = int(np.flatnonzero((array < 0) | (array > MAX_TOKEN_ID))[0])
        raise ValueError(f"{name}[{bad}] = {int(array[bad])} is outside [0, {MAX_TOKEN_ID}]")
    return array.astype(np.int64, copy=False)


def ref_student_datum(
    *, prompt: tinker.ModelInput, completion_tokens: Any, completion_logprobs: Any = None
) -> tinker.Datum:
    prompt_tokens = prompt.to_ints()
    completion = ref_token_array("completion_tokens", completion_tokens)
    p, c = len(prompt_tokens), len(completion)
    if p == 0:
        raise ValueError("prompt must contain at least one token")
    n = p + c - 1
    if c >= 2:
        model_input = prompt.append(tinker.EncodedTextChunk(tokens=completion[:-1].tolist()))
    elif c == 1:
        model_input = prompt
    else:
        model_input = tinker.ModelInput.from_ints(prompt_tokens[:-1])
    targets = np.empty(n, dtype=np.int64)
    targets[: p - 1] = prompt_tokens[1:]
    targets[p - 1 :] = completion
    mask = np.zeros(n, dtype=np.float32)
    mask[p - 1 :] = 1.0
    loss_fn_inputs = {
        "target_tokens": tinker.TensorData(data=targets, dtype="int64", shape=[n]),
        "mask": tinker.TensorData(data=mask, dtype="float32", shape=[n]),
    }
    if completion_logprobs is not None:
        sampled = np.asarray(completion_logprobs, dtype=np.float64)
        if sampled.shape != (c,):
            raise ValueError(
                f"completion_logprobs has shape {sampled.shape}, expected ({c},) (one per completion token)"
            )
        if not np.all(np.isfinite(sampled)):
            bad = int(np.flatnonzero(~np.isfinite(sampled))[0])
            raise ValueError(
                f"completion_logprobs[{bad}] is {sampled[bad]}; log-probs must be finite"
            )
        logprobs = np.zeros(n, dtype=np.float32)
        logprobs[p - 1 :] = sampled
        loss_fn_inputs["logprobs"] = tinker.TensorData(data=logprobs, dtype="float32", shape=[n])
    return tinker.Datum(model_input=model_input, loss_fn_inputs=loss_fn_inputs)


def ref_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def ref_loss_input(datum: Any, key: str) -> np.ndarray:
    if not isinstance(datum, tinker.Datum):
        raise TypeError(f"datum: expected a tinker.Datum, got {type(datum).__name__}")
    tensor = datum.loss_fn_inputs.get(key)
    if tensor is None:
        present = ", ".join(sorted(datum.loss_fn_inputs)) or "none"
        raise ValueError(
            f"datum: loss_fn_inputs has no {key!r} (keys: {present}); build student datums "
            "with student_datum_from_rollout"
        )
    array = tensor.to_numpy()
    length = datum.model_input.length
    if array.shape != (length,):
        raise ValueError(
            f"datum: {key} has shape {tuple(array.shape)}, expected ({length},) = model_input.length"
        )
    return array


def ref_extract(datum: Any, teacher_prompt_len: Any, *, max_context_length: Any) -> Any:
    teacher_prompt_len = ref_non_negative_int("teacher_prompt_len", teacher_prompt_len)
    max_context_length = ref_non_negative_int("max_context_length", max_context_length)
    mask = ref_loss_input(datum, "mask")
    targets = ref_loss_input(datum, "target_tokens")
    positions = np.flatnonzero(mask > 0)
    if positions.size == 0:
        return sdft.CompletionSlice(tokens=[], teacher_prompt_len=teacher_prompt_len)
    tokens = targets[positions[0] :].tolist()
    available = max_context_length - teacher_prompt_len
    if available <= 0:
        return sdft.CompletionSlice(
            tokens=[], teacher_prompt_len=teacher_prompt_len, truncated=True
        )
    truncated = len(tokens) > available
    return sdft.CompletionSlice(
        tokens=tokens[:available] if truncated else tokens,
        teacher_prompt_len=teacher_prompt_len,
        truncated=truncated,
    )


def ref_teacher_forced(
    teacher_prompt: tinker.ModelInput, completion_tokens: Sequence[int]
) -> tinker.ModelInput:
    completion = ref_token_array("completion_tokens", completion_tokens).tolist()
    if not completion:
        return teacher_prompt
    if all(isinstance(chunk, tinker.EncodedTextChunk) for chunk in teacher_prompt.chunks):
        return tinker.ModelInput.from_ints(teacher_prompt.to_ints() + completion)
    return teacher_prompt.append(tinker.EncodedTextChunk(tokens=completion))
