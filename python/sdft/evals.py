"""Benchmarks: ``tasks.jsonl`` directories, answer verifiers, and the pass@k runner.

A benchmark is a directory holding ``tasks.jsonl``, one task per line::

    {"task_id": "val_0", "instruction": "What is the capital of Germany? Answer with just the city name.",
     "verifier": {"kind": "in_process", "fn_name": "contains", "expected": "Berlin"}}

The verifier ``fn_name`` picks a registered pure function ``(response, expected) -> bool``; its
``expected`` value is checked when the benchmark is loaded, so a bad pattern or letter fails before
any sampling. :func:`run_benchmark` samples every task from a Tinker-style sampling client (all
requests in flight at once), scores the responses and computes ``pass@k``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import regex as regex_engine
import tinker

from sdft.data import build_student_prompt
from sdft.datasets import iter_jsonl

_log = logging.getLogger(__name__)

Verifier = Callable[[str, Any], bool]
ExpectedCheck = Callable[[Any], object]


@dataclass(frozen=True, slots=True)
class RegisteredVerifier:
    """A verifier and the check that validates its ``expected`` value at load time."""

    name: str
    fn: Verifier
    check_expected: ExpectedCheck


_REGISTRY: dict[str, RegisteredVerifier] = {}


def register_verifier(
    name: str, *, check_expected: ExpectedCheck | None = None
) -> Callable[[Verifier], Verifier]:
    """Register ``fn`` under ``name`` for ``tasks.jsonl``'s ``verifier.fn_name``.

    ``check_expected(value)`` raises ``ValueError``/``TypeError`` for an unusable ``expected``
    (its return value is ignored); benchmarks call it when they are loaded."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"verifier name must be a non-empty string, got {name!r}")

    def decorator(fn: Verifier) -> Verifier:
        if name in _REGISTRY:
            raise ValueError(f"verifier {name!r} is already registered")
        _REGISTRY[name] = RegisteredVerifier(name, fn, check_expected or (lambda value: value))
        return fn

    return decorator


def verifier_names() -> list[str]:
    """The registered verifier names, sorted."""
    return sorted(_REGISTRY)


def get_verifier(name: str) -> RegisteredVerifier:
    """The verifier registered as ``name``; ``KeyError`` lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown verifier {name!r}; known verifiers: {', '.join(verifier_names())}"
        ) from None


# --------------------------------------------------------------------------------------------
# Text verifiers


def normalize_text(text: str) -> str:
    """The comparison form used by ``contains`` and ``exact``.

    Unicode compatibility decomposition (NFKD) with combining marks removed, so ``Brasília`` ==
    ``Brasilia`` and ``H₂O`` == ``H2O``; case folded; every whitespace run becomes one space; leading
    and trailing whitespace removed."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(char for char in decomposed if not unicodedata.combining(char))
    return " ".join(stripped.casefold().split())


_TRAILING_PUNCTUATION = ".,;:!?"


def normalize_answer(text: str) -> str:
    """``normalize_text`` plus removal of trailing punctuation (``.,;:!?``) and of quotes, backticks
    or ``*`` emphasis wrapped around the whole answer (``"**Rome.**"`` -> ``rome``)."""
    previous = None
    current = normalize_text(text)
    while current != previous:
        previous = current
        current = current.rstrip(_TRAILING_PUNCTUATION).strip()
        for left, right in (('"', '"'), ("'", "'"), ("`", "`"), ("*", "*"), ("“", "”")):
            if len(current) >= 2 and current.startswith(left) and current.endswith(right):
                current = current[len(left) : -len(right)].strip()
    return current


def _string_options(value: Any) -> tuple[str, ...]:
    """``expected`` as one string or a non-empty list of accepted strings."""
    options = [value] if isinstance(value, str) else value
    if not isinstance(options, list) or not options:
        raise TypeError(f"expected must be a string or a non-empty list of strings, got {value!r}")
    for option in options:
        if not isinstance(option, str):
            raise TypeError(f"expected must contain only strings, got {option!r}")
        if not normalize_text(option):
            raise ValueError("expected must not be empty or whitespace")
    return tuple(options)


@register_verifier("contains", check_expected=_string_options)
def contains(response: str, expected: str | Sequence[str]) -> bool:
    """True when the normalized response contains a normalized expected string (any of a list)."""
    haystack = normalize_text(response)
    return any(normalize_text(option) in haystack for option in _string_options(expected))


@register_verifier("exact", check_expected=_string_options)
def exact(response: str, expected: str | Sequence[str]) -> bool:
    """True when the response equals an expected string after :func:`normalize_answer` on both."""
    answer = normalize_answer(response)
    return any(normalize_answer(option) == answer for option in _string_options(expected))


#: How long the user-supplied patterns of one ``regex`` verification may run, in seconds, before
#: the answer counts as wrong (a pattern such as ``(x+x+)+y`` backtracks exponentially).
REGEX_TIMEOUT_S = 0.5


class VerifierTimeout(TimeoutError):
    """A verifier gave up on a response because it ran past its time limit."""


def _patterns(value: Any) -> tuple[regex_engine.Pattern[str], ...]:
    options = [value] if isinstance(value, str) else value
    if not isinstance(options, list) or not options:
        raise TypeError(
            f"expected must be a pattern or a non-empty list of patterns, got {value!r}"
        )
    compiled = []
    for option in options:
        if not isinstance(option, str) or not option:
            raise TypeError(f"expected patterns must be non-empty strings, got {option!r}")
        try:
            compiled.append(regex_engine.compile(option))
        except (regex_engine.error, ValueError, OverflowError) as exc:
            raise ValueError(f"invalid regular expression {option!r}: {exc}") from exc
    return tuple(compiled)


def _check_patterns(value: Any) -> Any:
    _patterns(value)
    return value


@register_verifier("regex", check_expected=_check_patterns)
def regex(response: str, expected: str | Sequence[str]) -> bool:
    """True when a pattern matches anywhere in the raw response (a search; case-sensitive unless
    the pattern says ``(?i)``).

    Patterns run on the ``regex`` engine (``re`` syntax) with a time limit of
    :data:`REGEX_TIMEOUT_S` for all patterns together; past it :class:`VerifierTimeout` is raised
    (a benchmark counts the answer as wrong and reports it)."""
    deadline = time.monotonic() + REGEX_TIMEOUT_S
    for pattern in _patterns(expected):
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            if pattern.search(response, timeout=remaining):
                return True
        except TimeoutError:
            raise VerifierTimeout(
                f"regex {pattern.pattern!r} ran past the {REGEX_TIMEOUT_S:g} s limit on a "
                f"{len(response)}-character response"
            ) from None
    return False


# --------------------------------------------------------------------------------------------
# Multiple choice

_LETTER = "[A-J]"
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.DOTALL | re.IGNORECASE)
_TAG_CONTENT = re.compile(rf"\(?({_LETTER})\)?[.:)]?")
_ANSWER_PHRASE = re.compile(
    rf"(?i:\banswer\s*(?:is\s*:?|:))\s*(?:option\s+)?\**\s*\(?({_LETTER})\)?(?![A-Za-z0-9])"
)
_LONE_LETTER_LINE = re.compile(rf"^[ \t*]*\(?({_LETTER})\)?[.:)]?[ \t*]*$", re.MULTILINE)
_STANDALONE_LETTER = re.compile(rf"(?<![A-Za-z0-9])({_LETTER})(?![A-Za-z0-9])")


def extract_choice(response: str) -> str | None:
    """The multiple-choice letter (A-J) a response commits to, or ``None``.

    Rules, first match wins:
    1. the last ``<answer>...</answer>`` block (an unclosed final ``<answer>`` runs to the end, as in
       the paper's ``split("<answer>")[-1]``) whose content is a lone letter, optionally ``(B)``,
       ``B.``, ``B)`` or ``B:``;
    2. the last phrase ``answer is X`` / ``answer: X`` / ``answer is (X)`` (any case for the words;
       the letter must be a capital, so "the answer is a molecule" does not count);
    3. the last line that is a lone letter (optionally bracketed or followed by ``.``/``)``/``:``);
    4. the last standalone capital letter A-J anywhere (a weak fallback: "I think..." yields I).
    """
    for block in reversed(_ANSWER_TAG.findall(response)):
        match = _TAG_CONTENT.fullmatch(block.strip())
        if match:
            return match.group(1)
    for pattern in (_ANSWER_PHRASE, _LONE_LETTER_LINE, _STANDALONE_LETTER):
        found = pattern.findall(response)
        if found:
            return found[-1]
    return None


def _choice_letter(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected must be a letter A-J, got {value!r}")
    match = re.fullmatch(rf"\s*\(?({_LETTER})\)?\s*", value.upper())
    if not match:
        raise ValueError(f"expected must be a letter A-J, got {value!r}")
    return match.group(1)


@register_verifier("mcq", check_expected=_choice_letter)
def mcq(response: str, expected: str) -> bool:
    """True when :func:`extract_choice` finds the expected letter (case of ``expected`` ignored)."""
    return extract_choice(response) == _choice_letter(expected)


# --------------------------------------------------------------------------------------------
# Tool use (the paper's ToolAlpaca evaluation)

_PAPER_ACTION = re.compile(r"Action:\s*(\w+)")
_PAPER_ACTION_INPUT = re.compile(r"Action Input:\s*({.*?})", re.DOTALL)
_ACTION_LINE = re.compile(r"^[ \t]*Action:[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_ACTION_INPUT_START = re.compile(r"Action Input:\s*")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One ``Action`` / ``Action Input`` pair; ``arguments`` is the parsed JSON (``None`` if the
    input was not valid JSON)."""

    action: str
    arguments: Any


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The ``Action:`` / ``Action Input:`` pairs of a ReAct response, JSON parsed in full.

    The action is the rest of its line; the input is the complete JSON value after
    ``Action Input:`` (nested objects included, decoded with ``json.JSONDecoder.raw_decode``). An
    action without a following input gets ``arguments=None``."""
    calls: list[ToolCall] = []
    decoder = json.JSONDecoder()
    actions = list(_ACTION_LINE.finditer(text))
    for index, match in enumerate(actions):
        end = actions[index + 1].start() if index + 1 < len(actions) else len(text)
        arguments: Any = None
        start = _ACTION_INPUT_START.search(text, match.end(), end)
        if start:
            try:
                arguments, _ = decoder.raw_decode(text, start.end())
            except (ValueError, RecursionError):  # not JSON, too deep, or an oversized integer
                arguments = None
        calls.append(ToolCall(match.group(1), arguments))
    return calls


def _golden_calls(value: Any) -> list[ToolCall]:
    """``expected`` of the tool-use verifiers: the paper's ``golden_answer`` list of
    ``{"Action", "Action_Input"}`` records (input as a JSON string or an object), or a ReAct text
    parsed with :func:`parse_tool_calls`."""
    if isinstance(value, str):
        calls = parse_tool_calls(value)
        if not calls:
            raise ValueError("expected text contains no 'Action:' line")
        return calls
    if not isinstance(value, list) or not value:
        raise TypeError(
            "expected must be a non-empty list of {Action, Action_Input} records or a ReAct text, "
            f"got {value!r}"
        )
    calls = []
    for position, item in enumerate(value):
        if not isinstance(item, Mapping) or "Action" not in item or "Action_Input" not in item:
            raise ValueError(f"expected[{position}] must have Action and Action_Input")
        action, arguments = item["Action"], item["Action_Input"]
        if not isinstance(action, str) or not action:
            raise ValueError(f"expected[{position}].Action must be a non-empty string")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                arguments = None  # the paper's scorer skips golden inputs that do not parse
        calls.append(ToolCall(action, arguments))
    return calls


def _merged_arguments(arguments: Iterable[Any]) -> dict[Any, Any]:
    merged: dict[Any, Any] = {}
    for value in arguments:
        if isinstance(value, dict):
            merged.update(value)
    return merged


def _check_golden_calls(value: Any) -> Any:
    _golden_calls(value)
    return value


@register_verifier("tooluse", check_expected=_check_golden_calls)
def tooluse(response: str, expected: Any) -> bool:
    """The paper's tool-use scorer (``eval_tooluse.py`` of Shenfeld et al.), reproduced exactly.

    Correct iff the multiset of actions found by ``Action:\\s*(\\w+)`` equals the multiset of golden
    actions, and the dict merged (``dict.update`` in order) from every ``Action Input:\\s*({.*?})``
    block that parses as JSON equals the dict merged from the golden inputs. Inherited quirks: the
    non-greedy ``{.*?}`` stops at the first ``}``, so a nested JSON input never matches (2 of the 97
    golden answers fail for this reason); a key repeated across calls keeps only its last value;
    call order is ignored; an action name with non-word characters (``[Optional]x``) is not found.
    Use ``tooluse_strict`` for a comparison without these quirks."""
    golden = _golden_calls(expected)
    predicted_actions = Counter(_PAPER_ACTION.findall(response))
    predicted_inputs: list[Any] = []
    for block in _PAPER_ACTION_INPUT.findall(response):
        try:
            predicted_inputs.append(json.loads(block))
        except (ValueError, RecursionError):
            continue
    return predicted_actions == Counter(call.action for call in golden) and _merged_arguments(
        predicted_inputs
    ) == _merged_arguments(call.arguments for call in golden)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@register_verifier("tooluse_strict", check_expected=_check_golden_calls)
def tooluse_strict(response: str, expected: Any) -> bool:
    """Tool calls compared one by one: the multiset of ``(action, parsed JSON input)`` pairs from
    :func:`parse_tool_calls` must equal the golden one (order of calls ignored, as in the paper;
    nested inputs and repeated keys compared in full)."""
    predicted = Counter(
        (call.action, _canonical(call.arguments)) for call in parse_tool_calls(response)
    )
    golden = Counter((call.action, _canonical(call.arguments)) for call in _golden_calls(expected))
    return predicted == golden


# --------------------------------------------------------------------------------------------
# Benchmarks


@dataclass(frozen=True, slots=True)
class BenchmarkTask:
    """One task: the instruction shown to the model and how its answer is verified."""

    task_id: str
    instruction: str
    fn_name: str
    expected: Any

    def verify(self, response: str) -> bool:
        """Whether ``response`` is correct; a verifier that times out counts it as wrong."""
        return self.score(response)[0]

    def score(self, response: str) -> tuple[bool, str | None]:
        """``(correct, problem)``: ``problem`` says why the verifier gave up (a time limit), or is
        ``None`` when it ran to completion."""
        try:
            return bool(get_verifier(self.fn_name).fn(response, self.expected)), None
        except VerifierTimeout as exc:
            return False, f"task {self.task_id}: {exc}"


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    tasks: tuple[BenchmarkTask, ...]
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.tasks)


def task_from_row(row: Any, where: str) -> BenchmarkTask:
    """Validate one ``tasks.jsonl`` row; errors start with ``where`` (e.g. ``tasks.jsonl:3:``)."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} expected a JSON object, got {type(row).__name__}")
    for key in ("task_id", "instruction", "verifier"):
        if key not in row:
            raise ValueError(f"{where} missing field {key!r}")
    task_id, instruction, verifier = row["task_id"], row["instruction"], row["verifier"]
    if not isinstance(task_id, str) or not task_id.strip():
        raise ValueError(f"{where} task_id must be a non-empty string, got {task_id!r}")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where} instruction must be a non-empty string")
    if not isinstance(verifier, Mapping):
        raise ValueError(f"{where} verifier must be an object")
    for key in ("kind", "fn_name", "expected"):
        if key not in verifier:
            raise ValueError(f"{where} missing field 'verifier.{key}'")
    if verifier["kind"] != "in_process":
        raise ValueError(f"{where} verifier.kind must be 'in_process', got {verifier['kind']!r}")
    fn_name = verifier["fn_name"]
    if not isinstance(fn_name, str) or fn_name not in _REGISTRY:
        raise ValueError(
            f"{where} unknown verifier.fn_name {fn_name!r}; known verifiers: "
            f"{', '.join(verifier_names())}"
        )
    try:
        _REGISTRY[fn_name].check_expected(verifier["expected"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} verifier.expected for {fn_name}: {exc}") from exc
    return BenchmarkTask(task_id, instruction, fn_name, verifier["expected"])


def benchmark_from_rows(name: str, rows: Iterable[Any], *, path: Path | None = None) -> Benchmark:
    """A benchmark from ``tasks.jsonl``-shaped rows held in memory."""
    return _build(name, ((f"rows[{i}]:", row) for i, row in enumerate(rows)), path, "rows")


def _build(
    name: str, located: Iterable[tuple[str, Any]], path: Path | None, source: str
) -> Benchmark:
    tasks: list[BenchmarkTask] = []
    seen: dict[str, str] = {}
    for where, row in located:
        task = task_from_row(row, where)
        if task.task_id in seen:
            raise ValueError(
                f"{where} duplicate task_id {task.task_id!r} (first at {seen[task.task_id].rstrip(':')})"
            )
        seen[task.task_id] = where
        tasks.append(task)
    if not tasks:
        raise ValueError(f"{source}: the benchmark has no tasks")
    return Benchmark(name=name, tasks=tuple(tasks), path=path)


def load_benchmark(path: str | os.PathLike[str], *, name: str | None = None) -> Benchmark:
    """Load ``<path>/tasks.jsonl`` (or ``path`` itself when it is a ``.jsonl`` file).

    ``name`` defaults to the directory name. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` starting with ``file:line:`` for a malformed row, a duplicate ``task_id``, an
    unknown ``fn_name`` (the message lists the known ones) or an unusable ``expected``."""
    target = Path(path)
    tasks_file = (
        target if target.suffix == ".jsonl" and not target.is_dir() else target / "tasks.jsonl"
    )
    if not tasks_file.is_file():
        raise FileNotFoundError(f"benchmark tasks not found: {tasks_file}")
    benchmark_name = name or (
        tasks_file.parent.name if tasks_file.name == "tasks.jsonl" else tasks_file.stem
    )

    rows = ((where, row) for where, _, row in iter_jsonl(tasks_file))
    return _build(benchmark_name, rows, target, str(tasks_file))


# --------------------------------------------------------------------------------------------
# pass@k and the runner


_PASS_AT = re.compile(r"pass@([1-9][0-9]*)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``
    (Chen et al. 2021), computed exactly with integers."""
    for label, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{label} must be an int, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def parse_metric(metric: str) -> int:
    """The ``k`` of a ``pass@k`` metric name."""
    match = _PASS_AT.fullmatch(metric) if isinstance(metric, str) else None
    if not match:
        raise ValueError(f"unknown metric {metric!r}; use pass@K (pass@1, pass@4, ...)")
    return int(match.group(1))


@dataclass
class BenchmarkResult:
    """``metrics`` maps each requested ``pass@k`` to its mean over tasks; ``predictions`` has one
    row per task (``predictions/<name>.jsonl``)."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)


def run_benchmark(
    sampling_client: Any,
    tokenizer: Any,
    benchmark: Benchmark,
    *,
    user_template: str = "{question}",
    system_prompt: str | None = None,
    max_tokens: int = 256,
    num_samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    metrics: Sequence[str] = ("pass@1",),
    enable_thinking: bool | None = None,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BenchmarkResult:
    """Sample ``num_samples`` responses per task, verify them, and compute ``pass@k``.

    Each instruction is rendered as the student prompt (``user_template`` with ``{question}``, the
    chat template, ``system_prompt``). All requests are submitted before the first result is awaited.
    ``temperature=0`` is greedy decoding. Responses are decoded with
    ``tokenizer.decode(tokens, skip_special_tokens=True)``. ``limit`` keeps the first tasks only;
    ``progress(done, total)`` is called as results arrive.

    Prediction rows: ``task_id``, ``instruction``, ``expected``, ``fn_name`` and, for one sample,
    ``response`` and ``correct`` (bool); for several, ``responses``, ``correct`` (list of bools) and
    ``num_correct``; ``verifier_errors`` lists the samples whose verifier gave up (a ``regex`` past
    its time limit), which count as wrong and are also logged as warnings."""
    ks = [parse_metric(metric) for metric in metrics]
    if not ks:
        raise ValueError("metrics must name at least one pass@k")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    too_large = [metric for metric, k in zip(metrics, ks, strict=True) if k > num_samples]
    if too_large:
        raise ValueError(
            f"{', '.join(too_large)} needs at least {max(ks)} samples per task; "
            f"num_samples is {num_samples}"
        )
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tasks = benchmark.tasks if limit is None else benchmark.tasks[:limit]

    params = tinker.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=seed, stop=None
    )
    futures = [
        sampling_client.sample(
            build_student_prompt(
                question=task.instruction,
                tokenizer=tokenizer,
                user_template=user_template,
                system_prompt=system_prompt,
                enable_thinking=enable_thinking,
            ),
            num_samples,
            params,
        )
        for task in tasks
    ]

    predictions: list[dict[str, Any]] = []
    totals = dict.fromkeys(metrics, 0.0)
    for done, (task, future) in enumerate(zip(tasks, futures, strict=True), start=1):
        response = future.result()
        if len(response.sequences) != num_samples:
            raise RuntimeError(
                f"task {task.task_id}: asked for {num_samples} samples, got {len(response.sequences)}"
            )
        texts = [
            tokenizer.decode(list(sequence.tokens), skip_special_tokens=True)
            for sequence in response.sequences
        ]
        scores = [task.score(text) for text in texts]
        correct = [ok for ok, _ in scores]
        problems = [problem for _, problem in scores if problem is not None]
        for problem in problems:
            _log.warning("verifier gave up, answer counted as wrong: %s", problem)
        for metric, k in zip(metrics, ks, strict=True):
            totals[metric] += pass_at_k(num_samples, sum(correct), k)
        row: dict[str, Any] = {
            "task_id": task.task_id,
            "instruction": task.instruction,
            "fn_name": task.fn_name,
            "expected": task.expected,
        }
        if num_samples == 1:
            row.update(response=texts[0], correct=correct[0])
        else:
            row.update(responses=texts, correct=correct, num_correct=sum(correct))
        if problems:
            row["verifier_errors"] = problems
        predictions.append(row)
        if progress is not None:
            progress(done, len(tasks))
    count = len(tasks)
    return BenchmarkResult(
        metrics={metric: (total / count if count else 0.0) for metric, total in totals.items()},
        predictions=predictions,
    )


__all__ = [
    "Benchmark",
    "BenchmarkResult",
    "BenchmarkTask",
    "RegisteredVerifier",
    "ToolCall",
    "Verifier",
    "VerifierTimeout",
    "benchmark_from_rows",
    "contains",
    "exact",
    "extract_choice",
    "get_verifier",
    "load_benchmark",
    "mcq",
    "normalize_answer",
    "normalize_text",
    "parse_metric",
    "parse_tool_calls",
    "pass_at_k",
    "regex",
    "register_verifier",
    "run_benchmark",
    "task_from_row",
    "tooluse",
    "tooluse_strict",
    "verifier_names",
]
