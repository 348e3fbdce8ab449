"""Validation of requests, as strict as the Tinker service, into dense torch tensors.

Everything here runs in the caller's thread at submission time; a rejected request becomes a
failed future carrying a :class:`LocalBadRequestError` (the service answers 400 there too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tinker import types

from sdft.backends.local._errors import LocalBadRequestError

# Exact loss_fn_inputs key sets, as the service checks them.
LOSS_INPUT_KEYS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
}
# Accepted loss_fn_config keys and their defaults.
LOSS_CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}
_FLOAT_KEYS = {"weights", "logprobs", "advantages"}


def model_input_tokens(
    model_input: Any, *, where: str, vocab_size: int, max_context: int
) -> list[int]:
    """The token ids of a text-only ``ModelInput``, checked against the model."""
    if not isinstance(model_input, types.ModelInput):
        raise LocalBadRequestError(
            f"{where}: expected a tinker.ModelInput, got {type(model_input).__name__}"
        )
    tokens: list[int] = []
    for index, chunk in enumerate(model_input.chunks):
        if not isinstance(chunk, types.EncodedTextChunk):
            raise LocalBadRequestError(
                f"{where}: chunk {index} is a {type(chunk).__name__}; the local backend runs "
                "text-only models (EncodedTextChunk)"
            )
        if len(chunk.tokens) == 0:
            raise LocalBadRequestError(f"{where}: chunk {index} has empty tokens list")
        tokens.extend(int(t) for t in chunk.tokens)
    if not tokens:
        raise LocalBadRequestError(f"{where}: model_input is empty (no tokens)")
    if len(tokens) > max_context:
        raise LocalBadRequestError(
            f"{where}: {len(tokens)} tokens exceed the model's context window of {max_context}"
        )
    array = np.asarray(tokens, dtype=np.int64)
    bad = np.flatnonzero((array < 0) | (array >= vocab_size))
    if bad.size:
        position = int(bad[0])
        raise LocalBadRequestError(
            f"{where}: token id {tokens[position]} at position {position} is outside the "
            f"vocabulary [0, {vocab_size})"
        )
    return tokens


@dataclass
class PreparedDatum:
    """One validated datum: tokens ``(N,)``, targets ``(N, K)`` (K = 1 for 1-D targets) and the
    float inputs reshaped like the targets."""

    index: int
    tokens: torch.Tensor
    targets: torch.Tensor
    target_shape: tuple[int, ...]
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    def values_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {key: value.to(device) for key, value in self.values.items()}


def _dense(datum_index: int, key: str, tensor: Any, expected_dtype: str) -> np.ndarray:
    where = f"datum {datum_index}: loss_fn_inputs[{key!r}]"
    if not isinstance(tensor, types.TensorData):
        raise LocalBadRequestError(f"{where} is a {type(tensor).__name__}, expected TensorData")
    if tensor.dtype != expected_dtype:
        raise LocalBadRequestError(f"{where} has dtype {tensor.dtype}, expected {expected_dtype}")
    try:
        array = tensor.to_numpy()
    except (RuntimeError, ValueError, AssertionError, TypeError) as exc:
        raise LocalBadRequestError(f"{where}: invalid sparse CSR tensor ({exc})") from exc
    if tensor.shape is not None and list(array.shape) != list(tensor.shape):
        raise LocalBadRequestError(
            f"{where}: data of shape {list(array.shape)} does not match its declared shape "
            f"{list(tensor.shape)}"
        )
    return array


def prepare_datums(
    data: Any,
    loss_fn: str,
    *,
    vocab_size: int,
    max_context: int,
    loss_keys: Sequence[str] | None = None,
    allow_extra_keys: bool = False,
) -> list[PreparedDatum]:
    """Validate ``data`` for ``loss_fn`` (keys from :data:`LOSS_INPUT_KEYS` unless ``loss_keys``).

    ``allow_extra_keys`` is for the client-side paths (``forward_backward_custom``, full KL) whose
    extra keys are never sent to a server; they are ignored here.
    """
    if not isinstance(data, (list, tuple)):
        raise TypeError(f"data must be a list of tinker.Datum, got {type(data).__name__}")
    keys = tuple(loss_keys) if loss_keys is not None else LOSS_INPUT_KEYS[loss_fn]
    prepared = []
    for index, datum in enumerate(data):
        if not isinstance(datum, types.Datum):
            raise LocalBadRequestError(
                f"datum {index}: expected a tinker.Datum, got {type(datum).__name__}"
            )
        tokens = model_input_tokens(
            datum.model_input,
            where=f"datum {index}",
            vocab_size=vocab_size,
            max_context=max_context,
        )
        present = set(datum.loss_fn_inputs)
        missing = [key for key in keys if key not in present]
        if missing and not (allow_extra_keys and missing == ["weights"]):
            raise LocalBadRequestError(
                f"datum {index}: loss_fn_inputs is missing {missing} for loss_fn {loss_fn!r} "
                f"(expected exactly {sorted(keys)})"
            )
        extra = sorted(present - set(keys))
        if extra and not allow_extra_keys:
            hint = " (strip it with sdft.data.strip_mask)" if "mask" in extra else ""
            raise LocalBadRequestError(
                f"datum {index}: Could not convert loss function inputs to array record: unknown "
                f"loss_fn_inputs key(s) {extra} for loss_fn {loss_fn!r}; expected exactly "
                f"{sorted(keys)}{hint}"
            )
        n = len(tokens)
        targets = _dense(index, "target_tokens", datum.loss_fn_inputs["target_tokens"], "int64")
        two_d_allowed = loss_fn in ("cross_entropy", "custom")
        if targets.ndim not in ((1, 2) if two_d_allowed else (1,)) or targets.shape[0] != n:
            expected = f"({n},) or ({n}, K)" if two_d_allowed else f"({n},)"
            raise LocalBadRequestError(
                f"datum {index}: target_tokens has shape {tuple(targets.shape)}, expected "
                f"{expected} (leading dimension = model_input.length = {n})"
            )
        if targets.ndim == 2 and targets.shape[1] == 0:
            raise LocalBadRequestError(f"datum {index}: target_tokens has zero columns")
        bad = np.argwhere((targets < 0) | (targets >= vocab_size))
        if bad.size:
            cell = tuple(int(i) for i in bad[0])
            raise LocalBadRequestError(
                f"datum {index}: target_tokens{list(cell)} = {int(targets[cell])} is outside the "
                f"vocabulary [0, {vocab_size})"
            )
        target_shape = tuple(int(s) for s in targets.shape)
        targets_2d = torch.from_numpy(np.ascontiguousarray(targets)).reshape(n, -1)
        values: dict[str, torch.Tensor] = {}
        for key in keys:
            if key == "target_tokens" or key not in datum.loss_fn_inputs:
                continue
            array = _dense(index, key, datum.loss_fn_inputs[key], "float32")
            if tuple(array.shape) != target_shape:
                raise LocalBadRequestError(
                    f"datum {index}: {key} has shape {tuple(array.shape)}, expected the shape of "
                    f"target_tokens {target_shape}"
                )
            finite = np.isfinite(array)
            if not finite.all():
                cell = tuple(int(i) for i in np.argwhere(~finite)[0])
                raise LocalBadRequestError(
                    f"datum {index}: {key}{list(cell)} = {array[cell]} is not finite"
                )
            values[key] = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(n, -1)
        prepared.append(
            PreparedDatum(
                index=index,
                tokens=torch.tensor(tokens, dtype=torch.int64),
                targets=targets_2d,
                target_shape=target_shape,
                values=values,
            )
        )
    return prepared


def loss_config(loss_fn: str, config: Mapping[str, Any] | None) -> dict[str, float]:
    """``loss_fn_config`` with defaults filled in; unknown keys and non-numbers are rejected."""
    defaults = LOSS_CONFIG_DEFAULTS[loss_fn]
    resolved = dict(defaults)
    for key, value in (config or {}).items():
        if key not in defaults:
            accepted = sorted(defaults) or "none"
            raise LocalBadRequestError(
                f"loss_fn_config key {key!r} is not understood by loss_fn {loss_fn!r} "
                f"(accepted: {accepted})"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise LocalBadRequestError(
                f"loss_fn_config[{key!r}] must be a finite number, got {value!r}"
            )
        resolved[key] = float(value)
    return resolved


def check_loss_fn(loss_fn: Any) -> str:
    if loss_fn not in LOSS_INPUT_KEYS:
        unsupported = {"dro", "gspo", "stable_reinforce", "custom"}
        if loss_fn in unsupported:
            raise LocalBadRequestError(
                f"loss_fn {loss_fn!r} is not supported by the local backend (supported: "
                f"{sorted(LOSS_INPUT_KEYS)}; use forward_backward_custom for your own loss)"
            )
        raise LocalBadRequestError(
            f"unknown loss_fn {loss_fn!r}; expected one of {sorted(LOSS_INPUT_KEYS)}"
        )
    return loss_fn


# --- sampling -------------------------------------------------------------------------------


@dataclass
class SampleRequest:
    """A validated ``sample`` call."""

    prompt: list[int]
    num_samples: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    include_prompt_logprobs: bool
    topk_prompt_logprobs: int
    first_scored_row: int
    topk_sample_logprobs: int
    target_prompt_ids: torch.Tensor | None

    @property
    def scores_prompt(self) -> bool:
        return (
            self.include_prompt_logprobs
            or self.topk_prompt_logprobs > 0
            or self.target_prompt_ids is not None
        )


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LocalBadRequestError(f"{name} must be an int, got {value!r}")
    return int(value)


def prepare_sample_request(
    prompt: Any,
    num_samples: Any,
    sampling_params: Any,
    *,
    include_prompt_logprobs: bool,
    topk_prompt_logprobs: Any,
    topk_sample_logprobs: Any,
    target_prompt_logprobs: Any,
    prompt_alt_tokens_k: Any,
    prompt_logprobs_last_n: Any,
    vocab_size: int,
    max_context: int,
    eos_tokens: frozenset[int],
) -> SampleRequest:
    tokens = model_input_tokens(
        prompt, where="prompt", vocab_size=vocab_size, max_context=max_context
    )
    length = len(tokens)
    num_samples = _int("num_samples", num_samples)
    if num_samples < 1:
        raise LocalBadRequestError(f"num_samples must be >= 1, got {num_samples}")
    if not isinstance(sampling_params, types.SamplingParams):
        raise LocalBadRequestError(
            f"sampling_params must be a tinker.SamplingParams, got {type(sampling_params).__name__}"
        )
    params = sampling_params
    room = max_context - length
    if params.max_tokens is None:
        if room < 1:
            raise LocalBadRequestError(
                f"prompt of {length} tokens leaves no room to generate in the context window of "
                f"{max_context}"
            )
        max_tokens = room
    else:
        max_tokens = _int("sampling_params.max_tokens", params.max_tokens)
        if max_tokens < 1:
            raise LocalBadRequestError(f"sampling_params.max_tokens must be >= 1, got {max_tokens}")
        if max_tokens > room:
            raise LocalBadRequestError(
                f"prompt ({length} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"context window of {max_context}"
            )
    temperature = float(params.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise LocalBadRequestError(f"sampling_params.temperature must be >= 0, got {temperature}")
    top_p = float(params.top_p)
    if not (0.0 < top_p <= 1.0):
        raise LocalBadRequestError(f"sampling_params.top_p must be in (0, 1], got {top_p}")
    top_k = _int("sampling_params.top_k", params.top_k)
    if top_k != -1 and top_k < 1:
        raise LocalBadRequestError(
            f"sampling_params.top_k must be -1 (no limit) or >= 1, got {top_k}"
        )
    seed = params.seed
    if seed is not None:
        seed = _int("sampling_params.seed", seed)
    stop_tokens, stop_strings = _stop_conditions(params.stop, vocab_size, eos_tokens)

    k = _int("topk_prompt_logprobs", topk_prompt_logprobs)
    if k < 0 or k > vocab_size:
        raise LocalBadRequestError(f"topk_prompt_logprobs must be in [0, {vocab_size}], got {k}")
    k_sample = _int("topk_sample_logprobs", topk_sample_logprobs)
    if k_sample < 0 or k_sample > vocab_size:
        raise LocalBadRequestError(
            f"topk_sample_logprobs must be in [0, {vocab_size}], got {k_sample}"
        )
    if _int("prompt_alt_tokens_k", prompt_alt_tokens_k) != 0:
        raise LocalBadRequestError("prompt_alt_tokens_k is not supported by the local backend")
    target_ids = None
    if target_prompt_logprobs is not None:
        target_ids = _target_prompt_ids(target_prompt_logprobs, length, vocab_size)

    first_row = 1
    if prompt_logprobs_last_n is not None:
        last_n = _int("prompt_logprobs_last_n", prompt_logprobs_last_n)
        if not (include_prompt_logprobs or k > 0):
            raise LocalBadRequestError(
                "prompt_logprobs_last_n needs include_prompt_logprobs=True or topk_prompt_logprobs > 0"
            )
        if not (1 <= last_n <= length - 1):
            raise LocalBadRequestError(
                f"prompt_logprobs_last_n must be in [1, {length - 1}] for a prompt of {length} "
                f"tokens, got {last_n}"
            )
        first_row = length - last_n
    return SampleRequest(
        prompt=tokens,
        num_samples=num_samples,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_tokens=stop_tokens,
        stop_strings=stop_strings,
        include_prompt_logprobs=bool(include_prompt_logprobs),
        topk_prompt_logprobs=k,
        first_scored_row=first_row,
        topk_sample_logprobs=k_sample,
        target_prompt_ids=target_ids,
    )


def _stop_conditions(
    stop: Any, vocab_size: int, eos_tokens: frozenset[int]
) -> tuple[frozenset[int], tuple[str, ...]]:
    """``None`` -> EOS; ``[]`` -> nothing; a string, strings, or token ids -> those."""
    if stop is None:
        return eos_tokens, ()
    if isinstance(stop, str):
        stop = [stop]
    items = list(stop)
    if not items:
        return frozenset(), ()
    if all(isinstance(item, str) for item in items):
        if any(item == "" for item in items):
            raise LocalBadRequestError("sampling_params.stop contains an empty string")
        return frozenset(), tuple(items)
    if all(isinstance(item, (int, np.integer)) and not isinstance(item, bool) for item in items):
        for item in items:
            if not (0 <= int(item) < vocab_size):
                raise LocalBadRequestError(
                    f"sampling_params.stop token id {item} is outside the vocabulary [0, {vocab_size})"
                )
        return frozenset(int(item) for item in items), ()
    raise LocalBadRequestError(
        f"sampling_params.stop must be a string, a list of strings or a list of token ids, got {stop!r}"
    )


def _target_prompt_ids(target: Any, length: int, vocab_size: int) -> torch.Tensor:
    if not isinstance(target, types.TensorData):
        raise LocalBadRequestError(
            f"target_prompt_logprobs must be a TensorData, got {type(target).__name__}"
        )
    if target.dtype != "int64":
        raise LocalBadRequestError(
            f"target_prompt_logprobs has dtype {target.dtype}, expected int64"
        )
    ids = target.to_torch(pad_value=-1)
    if ids.ndim != 2 or ids.shape[0] != length - 1:
        raise LocalBadRequestError(
            f"target_prompt_logprobs has shape {tuple(ids.shape)}, expected ({length - 1}, K) "
            "(one row per prompt position after the first)"
        )
    bad = torch.nonzero((ids < -1) | (ids >= vocab_size))
    if bad.numel():
        row, col = (int(v) for v in bad[0])
        raise LocalBadRequestError(
            f"target_prompt_logprobs[{row}, {col}] = {int(ids[row, col])} is outside the "
            f"vocabulary [0, {vocab_size}) (use -1 for no token)"
        )
    return ids


def parse_adam_params(optim_params: Any, adam_params: Any) -> types.AdamParams:
    if optim_params is not None and adam_params is not None:
        raise LocalBadRequestError("pass either optim_params or adam_params, not both")
    chosen = optim_params if optim_params is not None else adam_params
    if chosen is None:
        return types.AdamParams()
    if not isinstance(chosen, types.AdamParams):
        raise LocalBadRequestError(
            f"the local backend runs AdamW; got {type(chosen).__name__} "
            f"(type={getattr(chosen, 'type', None)!r})"
        )
    for key in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
        value = getattr(chosen, key)
        if not math.isfinite(value):
            raise LocalBadRequestError(f"AdamParams.{key} must be finite, got {value}")
    if chosen.learning_rate < 0:
        raise LocalBadRequestError(
            f"AdamParams.learning_rate must be >= 0, got {chosen.learning_rate}"
        )
    for key in ("beta1", "beta2"):
        value = getattr(chosen, key)
        if not (0.0 <= value < 1.0):
            raise LocalBadRequestError(f"AdamParams.{key} must be in [0, 1), got {value}")
    if chosen.eps < 0 or chosen.weight_decay < 0 or chosen.grad_clip_norm < 0:
        raise LocalBadRequestError("AdamParams.eps, weight_decay and grad_clip_norm must be >= 0")
    return chosen
