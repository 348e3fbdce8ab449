"""Data shaping for SDFT: prompts, student datums, completion slices and the training datums of the
three SDFT losses (top-K cross-entropy, reverse KL over the teacher's top-K, importance sampling).

Index alignment (one rollout; prompt ``P`` of length ``p``, completion ``C`` of length ``c``,
teacher prompt ``Q`` of length ``q``): the student datum has ``model_input = (P + C)[:-1]`` and
``target_tokens = (P + C)[1:]``, so student position ``j = p - 1 + t`` predicts ``C[t]``. The
teacher scores ``Q + C``; its prompt top-K row ``i`` is the distribution that predicts token ``i``,
so teacher row ``q + t`` predicts ``C[t]`` too. :func:`build_topk_targets` writes teacher row
``q + t`` into student row ``p - 1 + t``.

Exception policy: a Python object of the wrong type or dtype raises ``TypeError``; a well-typed
value that is out of range, of the wrong shape or inconsistent with the rest raises ``ValueError``.
Messages start with ``datum <i>:`` when they concern one datum, and name the completion position,
student position, teacher row and entry when they concern one value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Self, TypeAlias

import numpy as np
import tinker
from tinker.types.topk_logprobs import TopkLogprobs

from sdft import _kernel

__all__ = [
    "DEFAULT_DEMO_TEMPLATE",
    "MAX_TOPK",
    "CompletionSlice",
    "TeacherTopk",
    "build_importance_sampling_datums",
    "build_reverse_kl_datums",
    "build_student_prompt",
    "build_teacher_forced_sequence",
    "build_teacher_prompt",
    "build_topk_targets",
    "extract_completion_tokens",
    "messages_to_model_input",
    "strip_mask",
    "student_datum_from_rollout",
]

DEFAULT_DEMO_TEMPLATE = (
    "{question}\n\n"
    "This is an example for a response to the question:\n"
    "{golden_answer}\n\n"
    "Now answer with a response of your own, including the thinking process."
)

MAX_TOPK: int = _kernel.MAX_TOPK
"""Largest accepted ``topk`` (output rows are ``topk`` wide; this bounds memory per position)."""

_MAX_TOKEN_ID: int = _kernel.MAX_TOKEN_ID
# Larger values of these arguments mean the same as these (no id reaches them; no completion is
# this long), so they are clamped before crossing into the kernel's 64-bit integers.
_VOCAB_CLAMP = _MAX_TOKEN_ID + 1
_SKIP_CLAMP = 2**62

ListView: TypeAlias = Sequence[Sequence[tuple[int, float]] | None]
TeacherTopk: TypeAlias = ListView | TopkLogprobs | tinker.SampleResponse | None
"""One datum's teacher top-K response: the list view (rows of ``(token_id, logprob)`` pairs or
``None``), Tinker's dense ``TopkLogprobs`` or a whole ``SampleResponse``; ``None`` = no teacher."""


@dataclass(frozen=True)
class CompletionSlice:
    """The completion tokens of one student datum, as appended to the teacher prompt.

    ``tokens`` may be cut short so that ``teacher_prompt_len + len(tokens)`` fits the teacher's
    context (``truncated`` is then True).
    """

    tokens: list[int]
    teacher_prompt_len: int
    truncated: bool = False


class _CheckedTokens(list[int]):
    """The ``tokens`` list of a :class:`CompletionSlice` made by :func:`extract_completion_tokens`:
    an ordinary list whose elements were Python ints in ``[0, _MAX_TOKEN_ID]`` when it was made.

    :func:`build_teacher_forced_sequence` uses such a list as it is instead of converting it to an
    array and back to check it again. Any change that can add a value clears ``checked``, so a list
    edited in place is checked like any other input.
    """

    __slots__ = ("checked",)

    def __init__(self, tokens: list[int]) -> None:
        super().__init__(tokens)
        self.checked = True

    def __setitem__(self, index: Any, value: Any) -> None:
        self.checked = False
        super().__setitem__(index, value)

    def __iadd__(self, values: Iterable[int]) -> Self:  # type: ignore[misc,override]  # as typeshed has for list
        self.checked = False
        return super().__iadd__(values)

    def append(self, value: Any) -> None:
        self.checked = False
        super().append(value)

    def extend(self, values: Any) -> None:
        self.checked = False
        super().extend(values)

    def insert(self, index: Any, value: Any) -> None:
        self.checked = False
        super().insert(index, value)


# --------------------------------------------------------------------------------------------
# Prompts


def messages_to_model_input(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    enable_thinking: bool | None = None,
) -> tinker.ModelInput:
    """Render chat ``messages`` with the tokenizer's chat template (``add_generation_prompt=True``).

    ``enable_thinking`` is passed to the template when not None (Qwen3-style templates read it).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; SDFT prompts are rendered "
            "with apply_chat_template, so use an instruct/chat tokenizer or set tokenizer.chat_template"
        )
    rendered_messages = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TypeError(
                f"messages[{index}] must be a mapping with 'role' and 'content', got {message!r}"
            )
        rendered_messages.append(dict(message))
    template_kwargs: dict[str, Any] = {}
    if enable_thinking is not None:
        template_kwargs["enable_thinking"] = enable_thinking
    encoded = tokenizer.apply_chat_template(
        rendered_messages,
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
        **template_kwargs,
    )
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if len(encoded) > 0 and isinstance(encoded[0], (list, tuple)):
        if len(encoded) != 1:
            raise ValueError(
                f"chat template produced a batch of {len(encoded)} sequences, expected 1"
            )
        encoded = encoded[0]
    return tinker.ModelInput.from_ints([int(token) for token in encoded])


def _format_template(template: str, template_name: str, **fields: str) -> str:
    try:
        return template.format(**fields)
    except KeyError as exc:
        available = ", ".join("{" + name + "}" for name in fields)
        raise ValueError(
            f"{template_name} refers to {{{exc.args[0]}}}, but only {available} can be filled in "
            "(write literal braces as {{ and }})"
        ) from exc
    except (IndexError, ValueError) as exc:
        raise ValueError(f"{template_name} is not a valid format string: {exc}") from exc


def _chat_messages(system_prompt: str | None, user_content: str) -> list[dict[str, str]]:
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_content})
    return messages


def build_teacher_prompt(
    *,
    question: str,
    golden_answer: str,
    tokenizer: Any,
    system_prompt: str | None = None,
    demo_template: str = DEFAULT_DEMO_TEMPLATE,
    enable_thinking: bool | None = None,
) -> tinker.ModelInput:
    """The teacher prompt: optional system message + the user turn with the golden answer shown as
    an in-context demonstration (``demo_template``), rendered with ``add_generation_prompt=True``."""
    content = _format_template(
        demo_template, "demo_template", question=question, golden_answer=golden_answer
    )
    return messages_to_model_input(
        tokenizer, _chat_messages(system_prompt, content), enable_thinking=enable_thinking
    )


def build_student_prompt(
    *,
    question: str,
    tokenizer: Any,
    user_template: str = "{question}",
    system_prompt: str | None = None,
    enable_thinking: bool | None = None,
) -> tinker.ModelInput:
    """The student prompt: optional system message + ``user_template`` filled with the question
    (no demonstration), rendered with ``add_generation_prompt=True``."""
    content = _format_template(user_template, "user_template", question=question)
    return messages_to_model_input(
        tokenizer, _chat_messages(system_prompt, content), enable_thinking=enable_thinking
    )


# --------------------------------------------------------------------------------------------
# Student datums and completion slices


def _token_array(name: str, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(tokens)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of token ids, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must contain ints, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > _MAX_TOKEN_ID:
        bad = int(np.flatnonzero((array < 0) | (array > _MAX_TOKEN_ID))[0])
        raise ValueError(f"{name}[{bad}] = {int(array[bad])} is outside [0, {_MAX_TOKEN_ID}]")
    return array.astype(np.int64, copy=False)


def _text_chunk(tokens: list[int]) -> tinker.EncodedTextChunk:
    """A text chunk of ``tokens``, a list of Python ints already checked by :func:`_token_array`.

    Built without pydantic's per-element validation, which would only repeat that check (it costs
    more than the rest of the student datum on a 1,500-token completion)."""
    return tinker.EncodedTextChunk.model_construct(tokens=tokens)


def _model_input(chunks: list[Any]) -> tinker.ModelInput:
    """A ``ModelInput`` of chunks that are already validated ``ModelInputChunk`` instances."""
    return tinker.ModelInput.model_construct(chunks=chunks)


def student_datum_from_rollout(
    *,
    prompt: tinker.ModelInput,
    completion_tokens: Sequence[int],
    completion_logprobs: Sequence[float] | None = None,
) -> tinker.Datum:
    """Wrap a student rollout (prompt + sampled completion) as a ``tinker.Datum``.

    ``model_input = (prompt + completion)[:-1]``, ``target_tokens = (prompt + completion)[1:]``
    (int64), ``mask`` (float32) 1.0 on the completion targets (positions ``[p - 1, p - 1 + c)``),
    0.0 on prompt positions. With ``completion_logprobs`` (the sampler's log-probs of the
    completion tokens) the datum also carries ``logprobs`` (0.0 on prompt positions), which
    :func:`build_importance_sampling_datums` reads.
    """
    prompt_tokens = prompt.to_ints()
    completion = _token_array("completion_tokens", completion_tokens)
    p, c = len(prompt_tokens), completion.size
    if p == 0:
        raise ValueError("prompt must contain at least one token")
    n = p + c - 1
    if c >= 2:
        model_input = _model_input([*prompt.chunks, _text_chunk(completion[:-1].tolist())])
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


def _loss_input(datum: Any, where: str, key: str) -> np.ndarray:
    """A 1-D ``loss_fn_inputs[key]`` of length ``model_input.length``; ``where`` names the datum."""
    if not isinstance(datum, tinker.Datum):
        raise TypeError(f"{where}: expected a tinker.Datum, got {type(datum).__name__}")
    tensor = datum.loss_fn_inputs.get(key)
    if tensor is None:
        present = ", ".join(sorted(datum.loss_fn_inputs)) or "none"
        raise ValueError(
            f"{where}: loss_fn_inputs has no {key!r} (keys: {present}); build student datums "
            "with student_datum_from_rollout"
        )
    array = tensor.to_numpy()
    length = datum.model_input.length
    if array.shape != (length,):
        raise ValueError(
            f"{where}: {key} has shape {tuple(array.shape)}, expected ({length},) = model_input.length"
        )
    return array


def _mask(datum: Any, index: int) -> np.ndarray:
    mask = _loss_input(datum, f"datum {index}", "mask")
    if mask.dtype != np.float32:
        mask = mask.astype(np.float32)
    return mask


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def extract_completion_tokens(
    datum: tinker.Datum, teacher_prompt_len: int, *, max_context_length: int
) -> CompletionSlice:
    """The completion tokens of a student datum (the targets from the first mask position on),
    cut to ``max_context_length - teacher_prompt_len`` tokens when the teacher-forced sequence
    would not fit (``truncated=True``; no tokens at all when the teacher prompt alone fills it)."""
    teacher_prompt_len = _non_negative_int("teacher_prompt_len", teacher_prompt_len)
    max_context_length = _non_negative_int("max_context_length", max_context_length)
    mask = _loss_input(datum, "datum", "mask")
    targets = _loss_input(datum, "datum", "target_tokens")
    trained = mask > 0
    first = int(trained.argmax()) if trained.size else 0
    if trained.size == 0 or not trained[first]:
        return CompletionSlice(tokens=[], teacher_prompt_len=teacher_prompt_len, truncated=False)
    available = max_context_length - teacher_prompt_len
    if available <= 0:
        return CompletionSlice(tokens=[], teacher_prompt_len=teacher_prompt_len, truncated=True)
    truncated = targets.size - first > available
    kept = targets[first : first + available] if truncated else targets[first:]
    return CompletionSlice(
        tokens=_CheckedTokens(kept.tolist()) if _valid_ids(kept) else kept.tolist(),
        teacher_prompt_len=teacher_prompt_len,
        truncated=truncated,
    )


def _valid_ids(tokens: np.ndarray) -> bool:
    """Whether a non-empty array holds only integer token ids in ``[0, _MAX_TOKEN_ID]``."""
    return (
        tokens.dtype.kind in "iu" and int(tokens.min()) >= 0 and int(tokens.max()) <= _MAX_TOKEN_ID
    )


def build_teacher_forced_sequence(
    teacher_prompt: tinker.ModelInput, completion_tokens: Sequence[int]
) -> tinker.ModelInput:
    """``teacher_prompt + completion_tokens`` as one ``EncodedTextChunk`` (the prompt's chunks are
    kept as they are when it holds non-text chunks)."""
    if type(completion_tokens) is _CheckedTokens and completion_tokens.checked:
        tokens: list[int] = completion_tokens
    else:
        tokens = _token_array("completion_tokens", completion_tokens).tolist()
    if not tokens:
        return teacher_prompt
    chunks = teacher_prompt.chunks
    # The prompt's chunks were validated when it was built; the completion was just checked.
    if all(isinstance(chunk, tinker.EncodedTextChunk) for chunk in chunks):
        return _model_input([_text_chunk(teacher_prompt.to_ints() + tokens)])
    return _model_input([*chunks, _text_chunk(list(tokens))])


def strip_mask(datum: tinker.Datum) -> tinker.Datum:
    """The datum without its ``mask`` (Tinker rejects unknown ``loss_fn_inputs`` keys)."""
    inputs = {key: value for key, value in datum.loss_fn_inputs.items() if key != "mask"}
    return replace(datum, loss_fn_inputs=inputs)


# --------------------------------------------------------------------------------------------
# Top-K targets (the Rust kernel)


def _int_argument(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _checked_arguments(
    topk: Any, vocab_size: Any, skip_first_n: Any, weight_scale: Any, sparse: Any
) -> tuple[int, int | None, int, float, bool]:
    topk = _int_argument("topk", topk)
    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be between 1 and {MAX_TOPK}, got {topk}")
    if vocab_size is not None:
        vocab_size = _int_argument("vocab_size", vocab_size)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 (or None), got {vocab_size}")
        vocab_size = min(vocab_size, _VOCAB_CLAMP)
    skip_first_n = _int_argument("skip_first_n", skip_first_n)
    if skip_first_n < 0:
        raise ValueError(f"skip_first_n must be >= 0, got {skip_first_n}")
    skip_first_n = min(skip_first_n, _SKIP_CLAMP)
    if isinstance(weight_scale, bool) or not isinstance(weight_scale, (int, float, np.number)):
        raise TypeError(f"weight_scale must be a number, got {type(weight_scale).__name__}")
    weight_scale = float(weight_scale)
    if not math.isfinite(weight_scale) or weight_scale < 0:
        raise ValueError(f"weight_scale must be a finite number >= 0, got {weight_scale}")
    if not isinstance(sparse, bool):
        raise TypeError(f"sparse must be a bool, got {type(sparse).__name__}")
    return topk, vocab_size, skip_first_n, weight_scale, sparse


def _same_lengths(**sequences: Any) -> int:
    lengths = {}
    for name, value in sequences.items():
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
        lengths[name] = len(value)
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} has {length}" for name, length in lengths.items())
        raise ValueError(f"one entry per datum is required, but {described}")
    return next(iter(lengths.values()))


def _kernel_teacher(index: int, teacher: Any) -> Any:
    """What the kernel takes: None, a list of rows, or a (token_ids, logprobs) tuple of arrays."""
    if teacher is None or isinstance(teacher, list):
        return teacher
    if isinstance(teacher, TopkLogprobs):
        return (teacher.token_ids, teacher.logprobs)
    if isinstance(teacher, tinker.SampleResponse):
        dense = teacher.topk_prompt_logprobs_np
        if dense is not None:
            return (dense.token_ids, dense.logprobs)
        # Built from lists (or top-K not requested): the property returns them without conversion.
        return _kernel_teacher(index, teacher.topk_prompt_logprobs)
    if isinstance(teacher, tuple):
        return list(teacher)
    raise TypeError(
        f"datum {index}: teacher top-K must be None, a list of rows of (token_id, logprob) pairs, "
        f"a tinker TopkLogprobs or a tinker SampleResponse, got {type(teacher).__name__}"
    )


def _kernel_threads() -> int:
    """``SDFT_KERNEL_THREADS`` (a positive int) fixes the kernel's thread count; unset or 0 lets
    it choose (one per core, up to 8, for large batches; results are identical either way)."""
    value = os.environ.get("SDFT_KERNEL_THREADS", "").strip()
    if not value:
        return 0
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"SDFT_KERNEL_THREADS must be a non-negative int, got {value!r}") from None
    if threads < 0:
        raise ValueError(f"SDFT_KERNEL_THREADS must be a non-negative int, got {value!r}")
    return threads


def _slice_fields(index: int, completion_slice: Any) -> tuple[int, Any]:
    try:
        tokens = completion_slice.tokens
        teacher_prompt_len = completion_slice.teacher_prompt_len
    except AttributeError:
        raise TypeError(
            f"datum {index}: expected a CompletionSlice, got {type(completion_slice).__name__}"
        ) from None
    return len(tokens), teacher_prompt_len


def build_topk_targets(
    *,
    student_data: Sequence[tinker.Datum],
    completion_slices: Sequence[CompletionSlice],
    teacher_topk_logprobs: Sequence[TeacherTopk],
    topk: int = 20,
    vocab_size: int | None = None,
    skip_first_n: int = 3,
    weight_scale: float = 1.0,
    sparse: bool = False,
) -> tuple[list[tinker.Datum], dict[str, float]]:
    """Build ``cross_entropy`` datums with ``(N, topk)`` soft targets from the teacher's top-K.

    For completion position ``t`` of each datum (skipping the first ``skip_first_n``), teacher row
    ``teacher_prompt_len + t`` is read: its first ``topk`` entries, minus ids ``>= vocab_size``,
    renormalized (log-sum-exp in float64) and written left-aligned into the student row predicting
    the same token. Prompt rows, skipped positions, positions past a truncated slice and missing /
    ``None`` / empty teacher rows stay zero. A teacher with fewer rows than the completion is not an
    error: the positions it does not cover are skipped.

    ``teacher_topk_logprobs`` holds per datum the list view, a ``TopkLogprobs`` (int32/int64
    ``token_ids`` and float32/float64 ``logprobs``, any strides; empty cells ``(0, -99999.0)``) or a
    ``SampleResponse`` (its ``topk_prompt_logprobs_np`` is read, never the list property; one built
    from lists, or without top-K, counts as its list / ``None``), or ``None``. The dense arrays are
    read in place with the GIL released. Every entry the kernel reads must have a token id in
    ``[0, 2**31 - 1]`` and a finite log-prob; otherwise a ``ValueError`` names the datum, the
    completion position, the student position, the teacher row and the entry. Entries it never
    reads (prompt rows, skipped positions, columns past ``topk``) are not inspected.

    Returns ``(datums, metrics)``: each datum keeps ``model_input`` and carries only
    ``target_tokens`` (int64) and ``weights`` (float32, times ``weight_scale``). The arrays are
    created by the kernel and wrapped without a copy; with ``sparse=True`` both are CSR
    ``TensorData`` (sharing read-only row/column index arrays) that list only the written cells.

    Metrics: the cookbook's ``sdft/teacher_truncated_count``, ``sdft/num_datums``, ``sdft/topk`` and,
    when there are completion positions, ``sdft/total_completion_tokens`` and
    ``sdft/mean_teacher_entropy`` (divided by all completion positions, as the cookbook does);
    plus ``sdft/distilled_positions``, ``sdft/mean_teacher_entropy_distilled`` (per written row),
    ``sdft/skipped_positions``, ``sdft/missing_teacher_rows``, ``sdft/vocab_filtered_ids``,
    ``sdft/vocab_emptied_positions`` and ``sdft/truncated_positions``.
    """
    topk, vocab_size, skip_first_n, weight_scale, sparse = _checked_arguments(
        topk, vocab_size, skip_first_n, weight_scale, sparse
    )
    _same_lengths(
        student_data=student_data,
        completion_slices=completion_slices,
        teacher_topk_logprobs=teacher_topk_logprobs,
    )
    items = []
    truncated_count = 0
    for index, (datum, completion_slice, teacher) in enumerate(
        zip(student_data, completion_slices, teacher_topk_logprobs, strict=True)
    ):
        completion_len, teacher_prompt_len = _slice_fields(index, completion_slice)
        truncated_count += bool(getattr(completion_slice, "truncated", False))
        items.append(
            (
                _mask(datum, index),
                completion_len,
                teacher_prompt_len,
                _kernel_teacher(index, teacher),
            )
        )
    outputs, stats = _kernel.build_topk_batch(
        items,
        topk=topk,
        vocab_size=vocab_size,
        skip_first_n=skip_first_n,
        weight_scale=weight_scale,
        sparse=sparse,
        threads=_kernel_threads(),
    )
    datums = [
        _topk_datum(datum.model_input, output, topk, sparse)
        for datum, output in zip(student_data, outputs, strict=True)
    ]
    return datums, _topk_metrics(stats, len(datums), topk, truncated_count)


def _topk_datum(
    model_input: tinker.ModelInput, output: tuple, topk: int, sparse: bool
) -> tinker.Datum:
    rows = model_input.length
    if sparse:
        crow, col, token_values, weight_values = output
        crow.flags.writeable = False
        col.flags.writeable = False
        target_tokens = tinker.TensorData(
            data=token_values,
            dtype="int64",
            shape=[rows, topk],
            sparse_crow_indices=crow,
            sparse_col_indices=col,
        )
        weights = tinker.TensorData(
            data=weight_values,
            dtype="float32",
            shape=[rows, topk],
            sparse_crow_indices=crow,
            sparse_col_indices=col,
        )
    else:
        token_array, weight_array = output
        target_tokens = tinker.TensorData(data=token_array, dtype="int64", shape=[rows, topk])
        weights = tinker.TensorData(data=weight_array, dtype="float32", shape=[rows, topk])
    return tinker.Datum(
        model_input=model_input,
        loss_fn_inputs={"target_tokens": target_tokens, "weights": weights},
    )


def _topk_metrics(
    stats: dict[str, Any], num_datums: int, topk: int, truncated_count: int
) -> dict[str, float]:
    completion_tokens = stats["completion_tokens"]
    distilled = stats["distilled_positions"]
    entropy_sum = stats["entropy_sum"]
    metrics = {
        "sdft/teacher_truncated_count": float(truncated_count),
        "sdft/num_datums": float(num_datums),
        "sdft/topk": float(topk),
    }
    if completion_tokens > 0:
        metrics["sdft/total_completion_tokens"] = float(completion_tokens)
        # The cookbook's divisor: every completion position, skipped and empty rows included.
        metrics["sdft/mean_teacher_entropy"] = entropy_sum / completion_tokens
    metrics["sdft/distilled_positions"] = float(distilled)
    metrics["sdft/mean_teacher_entropy_distilled"] = entropy_sum / distilled if distilled else 0.0
    metrics["sdft/skipped_positions"] = float(stats["skipped_positions"])
    metrics["sdft/missing_teacher_rows"] = float(stats["missing_teacher_rows"])
    metrics["sdft/vocab_filtered_ids"] = float(stats["vocab_filtered_ids"])
    metrics["sdft/vocab_emptied_positions"] = float(stats["vocab_emptied_positions"])
    metrics["sdft/truncated_positions"] = float(stats["truncated_positions"])
    return metrics


def build_reverse_kl_datums(
    *,
    student_data: Sequence[tinker.Datum],
    completion_slices: Sequence[CompletionSlice],
    teacher_topk_logprobs: Sequence[TeacherTopk],
    topk: int = 20,
    vocab_size: int | None = None,
    skip_first_n: int = 3,
    sparse: bool = False,
) -> tuple[list[tinker.Datum], dict[str, float]]:
    """Datums for :func:`sdft.losses.reverse_kl_custom_loss` (``forward_backward_custom``).

    The same ``(N, topk)`` encoding as :func:`build_topk_targets` with ``weight_scale=1``:
    ``weights`` holds the renormalized teacher probability ``q`` at valid slots and 0 at padding
    slots and untrained positions, which the loss reads back as ``weights > 0`` and ``log q``.
    """
    return build_topk_targets(
        student_data=student_data,
        completion_slices=completion_slices,
        teacher_topk_logprobs=teacher_topk_logprobs,
        topk=topk,
        vocab_size=vocab_size,
        skip_first_n=skip_first_n,
        weight_scale=1.0,
        sparse=sparse,
    )


# --------------------------------------------------------------------------------------------
# Importance-sampling fallback (topk = 0)


def _teacher_logprob_array(index: int, teacher: Any) -> np.ndarray:
    """Per teacher row, the log-prob of its token (NaN where not computed)."""
    if teacher is None:
        return np.zeros(0, dtype=np.float64)
    if isinstance(teacher, np.ndarray):
        if teacher.ndim != 1 or teacher.dtype.kind != "f":
            raise TypeError(
                f"datum {index}: teacher log-probs must be a 1-D float array, got "
                f"{teacher.ndim}-D {teacher.dtype}"
            )
        return teacher.astype(np.float64, copy=False)
    if isinstance(teacher, (str, bytes)) or not isinstance(teacher, Sequence):
        raise TypeError(
            f"datum {index}: teacher log-probs must be a list of float | None (compute_logprobs "
            f"output), got {type(teacher).__name__}"
        )
    values = np.empty(len(teacher), dtype=np.float64)
    for row, value in enumerate(teacher):
        if value is None:
            values[row] = np.nan
        elif isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise TypeError(
                f"datum {index}: teacher row {row}: log-prob must be a float or None, got "
                f"{type(value).__name__}"
            )
        else:
            values[row] = value
    return values


def build_importance_sampling_datums(
    *,
    student_data: Sequence[tinker.Datum],
    completion_slices: Sequence[CompletionSlice],
    teacher_logprobs: Sequence[Sequence[float | None] | np.ndarray | None],
    student_logprobs: Sequence[Sequence[float] | np.ndarray] | None = None,
    skip_first_n: int = 3,
) -> tuple[list[tinker.Datum], dict[str, float]]:
    """Datums for the ``importance_sampling`` loss (SDFT's ``topk = 0`` fallback).

    ``teacher_logprobs`` holds per datum the teacher's per-row log-probs of the teacher-forced
    sequence (``compute_logprobs(Q + C)``: row ``i`` scores token ``i``; ``None``/NaN = not
    computed). ``student_logprobs`` holds per datum the sampler's log-probs of the completion
    tokens (indexed like the completion); when None they are read from the datum's ``logprobs``.
    For completion position ``t >= skip_first_n`` with a teacher value, the advantage at student
    position ``positions[t]`` is ``teacher[q + t] - student[t]``; it is 0 everywhere else.

    Each datum carries ``target_tokens`` (N,), ``logprobs`` (N,, the sampler's, 0 on prompt
    positions) and ``advantages`` (N,).
    """
    skip_first_n = _non_negative_int("skip_first_n", skip_first_n)
    lengths: dict[str, Any] = {
        "student_data": student_data,
        "completion_slices": completion_slices,
        "teacher_logprobs": teacher_logprobs,
    }
    if student_logprobs is not None:
        lengths["student_logprobs"] = student_logprobs
    _same_lengths(**lengths)

    datums = []
    truncated_count = 0
    mask_total = 0.0
    advantage_sum = teacher_sum = student_sum = 0.0
    positions_with_advantage = 0
    for index, (datum, completion_slice) in enumerate(
        zip(student_data, completion_slices, strict=True)
    ):
        mask = _mask(datum, index)
        targets = _loss_input(datum, f"datum {index}", "target_tokens").astype(np.int64, copy=False)
        completion_len, teacher_prompt_len = _slice_fields(index, completion_slice)
        teacher_prompt_len = _non_negative_int(
            f"datum {index}: teacher_prompt_len", teacher_prompt_len
        )
        truncated_count += bool(getattr(completion_slice, "truncated", False))
        positions = np.flatnonzero(mask > 0)
        n = min(completion_len, positions.size)
        mask_total += float(mask.sum())

        if student_logprobs is None:
            sampled_logprobs = _loss_input(datum, f"datum {index}", "logprobs").astype(np.float32)
            student_values = sampled_logprobs[positions[:n]].astype(np.float64)
        else:
            student_values = np.asarray(student_logprobs[index], dtype=np.float64)
            if student_values.ndim != 1 or student_values.size < n:
                raise ValueError(
                    f"datum {index}: student_logprobs has shape {student_values.shape}, expected at "
                    f"least ({n},) (one per completion token)"
                )
            student_values = student_values[:n]
            sampled_logprobs = np.zeros(mask.size, dtype=np.float32)
            sampled_logprobs[positions[:n]] = student_values

        teacher_values = _teacher_logprob_array(index, teacher_logprobs[index])
        advantages = np.zeros(mask.size, dtype=np.float32)
        for t in range(min(skip_first_n, n), n):
            row = teacher_prompt_len + t
            if row >= teacher_values.size or np.isnan(teacher_values[row]):
                continue
            teacher_value = float(teacher_values[row])
            student_value = float(student_values[t])
            where = f"datum {index}: completion position {t} (student position {positions[t]}, teacher row {row})"
            if not math.isfinite(teacher_value):
                raise ValueError(f"{where}: teacher log-prob is {teacher_value}; it must be finite")
            if not math.isfinite(student_value):
                raise ValueError(f"{where}: student log-prob is {student_value}; it must be finite")
            advantages[positions[t]] = teacher_value - student_value
            advantage_sum += teacher_value - student_value
            teacher_sum += teacher_value
            student_sum += student_value
            positions_with_advantage += 1

        size = mask.size
        datums.append(
            tinker.Datum(
                model_input=datum.model_input,
                loss_fn_inputs={
                    "target_tokens": tinker.TensorData(data=targets, dtype="int64", shape=[size]),
                    "logprobs": tinker.TensorData(
                        data=sampled_logprobs, dtype="float32", shape=[size]
                    ),
                    "advantages": tinker.TensorData(data=advantages, dtype="float32", shape=[size]),
                },
            )
        )

    metrics: dict[str, float] = {}
    if mask_total > 0:
        # The cookbook's divisor: the mask sum (every completion position).
        metrics["sdft/mean_advantage"] = advantage_sum / mask_total
        metrics["sdft/mean_teacher_lp"] = teacher_sum / mask_total
        metrics["sdft/mean_student_lp"] = student_sum / mask_total
    metrics["sdft/teacher_truncated_count"] = float(truncated_count)
    metrics["sdft/num_datums"] = float(len(datums))
    metrics["sdft/advantage_positions"] = float(positions_with_advantage)
    return datums, metrics
