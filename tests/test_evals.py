"""Verifiers, benchmark loading, pass@k and the benchmark runner (fake sampling client)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tinker

from sdft import evals
from sdft.evals import (
    BenchmarkTask,
    ToolCall,
    benchmark_from_rows,
    contains,
    exact,
    extract_choice,
    load_benchmark,
    mcq,
    normalize_answer,
    normalize_text,
    parse_metric,
    parse_tool_calls,
    pass_at_k,
    regex,
    run_benchmark,
    tooluse,
    tooluse_strict,
)

# ---------------------------------------------------------------------------------------------
# contains / exact / regex


def test_normalize_text_folds_case_accents_compat_forms_and_whitespace() -> None:
    assert normalize_text("  Brasília\tIS\n\n the  CAPITAL ") == "brasilia is the capital"
    assert normalize_text("H₂O") == "h2o"
    assert normalize_text("STRASSE") == normalize_text("straße")


@pytest.mark.parametrize(
    ("response", "expected", "verdict"),
    [
        ("The capital of Italy is Rome.", "Rome", True),
        ("the capital of italy is ROME", "rome", True),
        ("The capital of Brazil is Brasília.", "Brasilia", True),
        ("It is Buenos   Aires.", "buenos aires", True),
        ("The capital of Italy is Milan.", "Rome", False),
        ("Kiev is the capital.", ["Kyiv", "Kiev"], True),
        ("Lviv is the capital.", ["Kyiv", "Kiev"], False),
        ("", "Rome", False),
    ],
)
def test_contains(response: str, expected: Any, verdict: bool) -> None:
    assert contains(response, expected) is verdict


@pytest.mark.parametrize(
    ("response", "expected", "verdict"),
    [
        ("Rome", "Rome", True),
        ("  rome.  ", "Rome", True),
        ("**Rome**!", "rome", True),
        ('"Rome."', "Rome", True),
        ("Rome?!", "Rome", True),
        ("Rome is the capital.", "Rome", False),
        ("Roma", "Rome", False),
        ("new   york", "New York", True),
        ("Kyiv", ["Kiev", "Kyiv"], True),
    ],
)
def test_exact(response: str, expected: Any, verdict: bool) -> None:
    assert exact(response, expected) is verdict


def test_normalize_answer_peels_nested_wrappers() -> None:
    assert normalize_answer(' "**Rome.**". ') == "rome"
    assert normalize_answer("`42`") == "42"


def test_regex_is_a_case_sensitive_search_unless_the_pattern_says_otherwise() -> None:
    assert regex("The answer is 24 hours.", r"\b24\b")
    assert not regex("12345", r"\b24\b")
    assert not regex("ROME", "Rome")
    assert regex("ROME", "(?i)rome")
    assert regex("it is twelve", [r"\b12\b", "twelve"])


# ---------------------------------------------------------------------------------------------
# mcq


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        # 1. answer tags win over everything else, the last complete tag counts
        ("<reasoning>\nA looks wrong, B too\n</reasoning>\n<answer>\nC\n</answer>", "C"),
        ("<answer>A</answer> on reflection <answer>(D)</answer>", "D"),
        ("The answer is B. <answer>C</answer>", "C"),
        ("<answer>\nB.", "B"),  # unclosed final tag (cut by max_tokens)
        # a tag without a letter falls through to the next rules
        ("<answer>not sure</answer>\nThe answer is (B)", "B"),
        # 2. answer phrases
        ("I think the answer is (B), not C.", "B"),
        ("Answer: D\nSome more words about A.", "D"),
        ("The correct answer is **C**.", "C"),
        ("the answer is a molecule; option B fits", "B"),  # lowercase 'a' is not a choice
        # 3. a line holding a lone letter
        ("Let me think about A and B.\nB\nThat was hard, I guess.", "B"),
        ("(C)", "C"),
        # 4. the last standalone capital letter
        ("Option A is wrong, so it must be D", "D"),
        ("No letters here", None),
        ("", None),
        ("ABC and BAD", None),
    ],
)
def test_extract_choice_order_of_rules(response: str, letter: str | None) -> None:
    assert extract_choice(response) == letter


def test_mcq_compares_with_the_expected_letter() -> None:
    assert mcq("<answer>\nA\n</answer>", "A")
    assert mcq("<answer>\nA\n</answer>", "a")
    assert not mcq("<answer>\nA\n</answer>", "B")
    assert not mcq("I have no idea", "A")


# ---------------------------------------------------------------------------------------------
# tool use


def test_parse_tool_calls_reads_complete_json_inputs() -> None:
    text = (
        'Thought: search first\nAction: search\nAction Input: {"q": {"nested": [1, 2]}}\n'
        "Observation: ...\nAction: finish\nAction Input: {}\nAction: broken\nAction Input: {oops"
    )
    assert parse_tool_calls(text) == [
        ToolCall("search", {"q": {"nested": [1, 2]}}),
        ToolCall("finish", {}),
        ToolCall("broken", None),
    ]


GOLDEN_TWO_CALLS = [
    {"Action": "getWeather", "Action_Input": '{"city": "Paris"}'},
    {"Action": "getTime", "Action_Input": '{"zone": "CET"}'},
]


def test_tooluse_matches_actions_as_a_multiset_and_merged_inputs() -> None:
    good = (
        'Action: getTime\nAction Input: {"zone": "CET"}\n'
        'Action: getWeather\nAction Input: {"city": "Paris"}'
    )
    assert tooluse(good, GOLDEN_TWO_CALLS)  # order of calls ignored
    assert not tooluse('Action: getWeather\nAction Input: {"city": "Paris"}', GOLDEN_TWO_CALLS)
    wrong_value = good.replace("CET", "UTC")
    assert not tooluse(wrong_value, GOLDEN_TWO_CALLS)
    # inputs are merged, so moving a key to another call still matches (the paper's behaviour)
    swapped = (
        'Action: getTime\nAction Input: {"city": "Paris"}\n'
        'Action: getWeather\nAction Input: {"zone": "CET"}'
    )
    assert tooluse(swapped, GOLDEN_TWO_CALLS)
    assert not tooluse_strict(swapped, GOLDEN_TWO_CALLS)
    assert tooluse_strict(good, GOLDEN_TWO_CALLS)


def test_tooluse_reproduces_the_paper_regex_quirks() -> None:
    nested = [{"Action": "update", "Action_Input": '{"id": 1, "data": {"a": 2}}'}]
    perfect = 'Action: update\nAction Input: {"id": 1, "data": {"a": 2}}'
    assert not tooluse(perfect, nested)  # {.*?} stops at the first "}"
    assert tooluse_strict(perfect, nested)
    # a repeated key across calls keeps its last value on both sides
    golden = [
        {"Action": "get", "Action_Input": '{"page": 1}'},
        {"Action": "get", "Action_Input": '{"page": 2}'},
    ]
    assert tooluse(
        'Action: get\nAction Input: {"page": 7}\nAction: get\nAction Input: {"page": 2}', golden
    )
    assert not tooluse_strict(
        'Action: get\nAction Input: {"page": 7}\nAction: get\nAction Input: {"page": 2}', golden
    )
    # action names are \w+ : "[Optional]x" is not found in a response
    optional = [{"Action": "[Optional]x", "Action_Input": "{}"}]
    assert not tooluse("Action: [Optional]x\nAction Input: {}", optional)
    assert tooluse_strict("Action: [Optional]x\nAction Input: {}", optional)
    # an unparsable golden input is skipped, as the paper's bare except does
    unparsable = [{"Action": "go", "Action_Input": "not json"}]
    assert tooluse("Action: go", unparsable)


def test_tooluse_accepts_a_react_text_as_expected() -> None:
    expected = 'Action: getWeather\nAction Input: {"city": "Paris"}'
    assert tooluse('Thought: easy\nAction: getWeather\nAction Input: {"city": "Paris"}', expected)
    assert not tooluse('Action: getWeather\nAction Input: {"city": "Rome"}', expected)


# ---------------------------------------------------------------------------------------------
# registry and benchmark files


def test_registry_lists_the_builtin_verifiers_and_rejects_duplicates() -> None:
    assert evals.verifier_names() == [
        "contains",
        "exact",
        "mcq",
        "regex",
        "tooluse",
        "tooluse_strict",
    ]
    with pytest.raises(ValueError, match="verifier 'contains' is already registered"):
        evals.register_verifier("contains")(lambda response, expected: True)
    with pytest.raises(KeyError, match="unknown verifier 'nope'; known verifiers: contains, exact"):
        evals.get_verifier("nope")


def test_a_registered_verifier_is_usable_from_tasks_jsonl(tmp_path: Path) -> None:
    def check(value: Any) -> None:
        if not isinstance(value, int):
            raise TypeError(f"expected must be an int, got {value!r}")

    @evals.register_verifier("word_count_test", check_expected=check)
    def word_count(response: str, expected: int) -> bool:
        return len(response.split()) == expected

    try:
        assert "word_count_test" in evals.verifier_names()
        bench = benchmark_from_rows("b", [_task("a", "word_count_test", 2)])
        assert bench.tasks[0].verify("two words")
        assert not bench.tasks[0].verify("three words here")
        with pytest.raises(
            ValueError,
            match=r"rows\[0\]: verifier.expected for word_count_test: expected must be an int, got 'x'",
        ):
            benchmark_from_rows("b", [_task("a", "word_count_test", "x")])
    finally:
        evals._REGISTRY.pop("word_count_test")


def _task(
    task_id: str = "t0", fn_name: str = "contains", expected: Any = "Rome", **extra: Any
) -> dict:
    return {
        "task_id": task_id,
        "instruction": "Which city is Italy's capital?",
        "verifier": {"kind": "in_process", "fn_name": fn_name, "expected": expected},
        **extra,
    }


def _write_tasks(directory: Path, lines: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tasks.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def test_load_benchmark_reads_tasks(tmp_path: Path) -> None:
    bench = _write_tasks(
        tmp_path / "learned",
        [json.dumps(_task("a")), "", json.dumps(_task("b", "mcq", "c", note="extra keys ignored"))],
    )
    loaded = load_benchmark(bench)
    assert loaded.name == "learned"
    assert loaded.path == bench
    assert loaded.tasks == (
        BenchmarkTask("a", "Which city is Italy's capital?", "contains", "Rome"),
        BenchmarkTask("b", "Which city is Italy's capital?", "mcq", "c"),
    )
    assert load_benchmark(bench / "tasks.jsonl", name="x").name == "x"
    assert loaded.tasks[1].verify("<answer>C</answer>")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"tasks.jsonl:2: invalid JSON \(Expecting property name"),
        ("[1, 2]", "tasks.jsonl:2: expected a JSON object, got list"),
        (
            json.dumps({"instruction": "q", "verifier": {}}),
            "tasks.jsonl:2: missing field 'task_id'",
        ),
        (
            json.dumps({**_task("b"), "task_id": 3}),
            "tasks.jsonl:2: task_id must be a non-empty string, got 3",
        ),
        (
            json.dumps({**_task("b"), "instruction": "  "}),
            "tasks.jsonl:2: instruction must be a non-empty string",
        ),
        (
            json.dumps({**_task("b"), "verifier": {"kind": "in_process", "fn_name": "contains"}}),
            "tasks.jsonl:2: missing field 'verifier.expected'",
        ),
        (
            json.dumps(
                {**_task("b"), "verifier": {"kind": "http", "fn_name": "contains", "expected": "x"}}
            ),
            "tasks.jsonl:2: verifier.kind must be 'in_process', got 'http'",
        ),
        (
            json.dumps(_task("b", "fuzzy")),
            "tasks.jsonl:2: unknown verifier.fn_name 'fuzzy'; known verifiers: contains, exact, mcq, "
            "regex, tooluse, tooluse_strict",
        ),
        (
            json.dumps(_task("a")),
            r"tasks.jsonl:2: duplicate task_id 'a' \(first at .*tasks.jsonl:1\)",
        ),
        (
            json.dumps(_task("b", "regex", "(unclosed")),
            r"tasks.jsonl:2: verifier.expected for regex: invalid regular expression '\(unclosed'",
        ),
        (
            json.dumps(_task("b", "mcq", "K")),
            "tasks.jsonl:2: verifier.expected for mcq: expected must be a letter A-J",
        ),
        (
            json.dumps(_task("b", "contains", 5)),
            "tasks.jsonl:2: verifier.expected for contains: expected must be a string",
        ),
        (json.dumps(_task("b", "contains", [])), "tasks.jsonl:2: verifier.expected for contains"),
        (
            json.dumps(_task("b", "exact", " ")),
            "tasks.jsonl:2: verifier.expected for exact: expected must not be empty",
        ),
        (
            json.dumps(_task("b", "tooluse", [{"Action": "x"}])),
            r"tasks.jsonl:2: verifier.expected for tooluse: expected\[0\] must have Action and Action_Input",
        ),
        (
            json.dumps(_task("b", "tooluse", "no calls")),
            "verifier.expected for tooluse: expected text contains no 'Action:' line",
        ),
    ],
)
def test_load_benchmark_rejects_malformed_rows_with_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    bench = _write_tasks(tmp_path / "b", [json.dumps(_task("a")), line])
    with pytest.raises(ValueError, match=message):
        load_benchmark(bench)


def test_load_benchmark_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"benchmark tasks not found: .*nowhere/tasks\.jsonl"
    ):
        load_benchmark(tmp_path / "nowhere")
    _write_tasks(tmp_path / "empty", [""])
    with pytest.raises(ValueError, match="the benchmark has no tasks"):
        load_benchmark(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize(
    ("n", "c", "k", "value"),
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (5, 2, 1, 0.4),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 0, 3, 0.0),
        (5, 5, 3, 1.0),
        (5, 3, 3, 1.0),  # n - c < k: some correct sample is always drawn
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    ],
)
def test_pass_at_k_exact_values(n: int, c: int, k: int, value: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(value, abs=1e-15)


def test_pass_at_k_large_n_stays_exact() -> None:
    assert pass_at_k(200, 1, 100) == 0.5
    assert pass_at_k(1000, 10, 1) == 0.01


def test_pass_at_k_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="need 1 <= k <= n, got k=3, n=2"):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="need 0 <= c <= n, got c=3, n=2"):
        pass_at_k(2, 3, 1)
    with pytest.raises(TypeError, match="k must be an int"):
        pass_at_k(2, 1, 1.0)  # type: ignore[arg-type]


def test_parse_metric() -> None:
    assert parse_metric("pass@1") == 1
    assert parse_metric("pass@16") == 16
    for bad in ("pass@0", "pass@", "accuracy", "pass@1 "):
        with pytest.raises(ValueError, match="unknown metric"):
            parse_metric(bad)


# ---------------------------------------------------------------------------------------------
# run_benchmark with a fake sampling client


class CharTokenizer:
    """A tiny chat tokenizer: one token per character (code point), specials 1 and 2."""

    BOS, EOS = 1, 2
    chat_template = "<role>content ... <assistant>"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, **kwargs):
        assert tokenize and add_generation_prompt
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        if kwargs.get("enable_thinking") is not None:
            text = f"[think={kwargs['enable_thinking']}]" + text
        return [self.BOS, *(ord(ch) for ch in text)]

    def encode(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def decode(self, tokens, skip_special_tokens=False) -> str:
        special = {self.BOS: "<s>", self.EOS: "</s>"}
        return "".join(
            "" if (t in special and skip_special_tokens) else special.get(t, chr(t)) for t in tokens
        )


class FakeFuture:
    def __init__(self, log: list[str], label: str, value: tinker.SampleResponse) -> None:
        self.log, self.label, self.value = log, label, value

    def result(self, timeout: float | None = None) -> tinker.SampleResponse:
        self.log.append(f"result {self.label}")
        return self.value


class FakeSamplingClient:
    """Answers each prompt with scripted completions (looked up by the user text)."""

    def __init__(self, tokenizer: CharTokenizer, script: dict[str, list[str]]) -> None:
        self.tokenizer, self.script = tokenizer, script
        self.requests: list[tuple[list[int], int, tinker.SamplingParams]] = []
        self.log: list[str] = []

    def sample(
        self, prompt: tinker.ModelInput, num_samples: int, sampling_params: tinker.SamplingParams
    ):
        tokens = prompt.to_ints()
        text = "".join(chr(t) for t in tokens[1:])
        user = text.split("<user>", 1)[1].split("<assistant>", 1)[0]
        self.requests.append((tokens, num_samples, sampling_params))
        self.log.append(f"sample {user}")
        completions = self.script[user][:num_samples]
        sequences = [
            tinker.SampledSequence(
                stop_reason="stop",
                sequence_id=f"{user}-{i}",
                tokens_np=np.array([*self.tokenizer.encode(c), CharTokenizer.EOS], dtype=np.int32),
                logprobs_np=np.zeros(len(c) + 1, dtype=np.float32),
            )
            for i, c in enumerate(completions)
        ]
        response = tinker.SampleResponse(
            sequences=sequences, prompt_logprobs_np=None, topk_prompt_logprobs_np=None
        )
        return FakeFuture(self.log, user, response)


CAPITALS = benchmark_from_rows(
    "learned",
    [
        {
            "task_id": "it",
            "instruction": "Italy?",
            "verifier": {"kind": "in_process", "fn_name": "contains", "expected": "Rome"},
        },
        {
            "task_id": "es",
            "instruction": "Spain?",
            "verifier": {"kind": "in_process", "fn_name": "exact", "expected": "Madrid"},
        },
        {
            "task_id": "tr",
            "instruction": "Turkey?",
            "verifier": {"kind": "in_process", "fn_name": "contains", "expected": "Ankara"},
        },
    ],
)


def test_run_benchmark_greedy_pass_at_1_predictions_and_requests() -> None:
    tokenizer = CharTokenizer()
    client = FakeSamplingClient(
        tokenizer,
        {"Q: Italy?": ["It is Rome."], "Q: Spain?": ["madrid."], "Q: Turkey?": ["Istanbul"]},
    )
    result = run_benchmark(
        client,
        tokenizer,
        CAPITALS,
        user_template="Q: {question}",
        system_prompt="Be brief.",
        max_tokens=40,
    )
    assert result.metrics == {"pass@1": pytest.approx(2 / 3)}
    assert result.predictions == [
        {
            "task_id": "it",
            "instruction": "Italy?",
            "fn_name": "contains",
            "expected": "Rome",
            "response": "It is Rome.",
            "correct": True,
        },
        {
            "task_id": "es",
            "instruction": "Spain?",
            "fn_name": "exact",
            "expected": "Madrid",
            "response": "madrid.",
            "correct": True,
        },
        {
            "task_id": "tr",
            "instruction": "Turkey?",
            "fn_name": "contains",
            "expected": "Ankara",
            "response": "Istanbul",
            "correct": False,
        },
    ]
    # every request is submitted before the first result is awaited
    assert client.log == [
        "sample Q: Italy?",
        "sample Q: Spain?",
        "sample Q: Turkey?",
        "result Q: Italy?",
        "result Q: Spain?",
        "result Q: Turkey?",
    ]
    tokens, num_samples, params = client.requests[0]
    assert tokens == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: Italy?"}],
        add_generation_prompt=True,
        tokenize=True,
    )
    assert num_samples == 1
    assert (params.max_tokens, params.temperature, params.seed, params.stop) == (40, 0.0, 0, None)


def test_run_benchmark_pass_at_k_with_samples_uses_the_unbiased_estimator() -> None:
    tokenizer = CharTokenizer()
    client = FakeSamplingClient(
        tokenizer,
        {
            "Italy?": ["Rome", "Milan", "Rome", "Turin"],  # c = 2
            "Spain?": ["Madrid", "Barcelona", "Seville", "Valencia"],  # c = 1
            "Turkey?": ["Istanbul", "Izmir", "Bursa", "Konya"],  # c = 0
        },
    )
    seen: list[tuple[int, int]] = []
    result = run_benchmark(
        client,
        tokenizer,
        CAPITALS,
        num_samples=4,
        temperature=1.0,
        seed=7,
        metrics=("pass@1", "pass@2", "pass@4"),
        enable_thinking=False,
        progress=lambda done, total: seen.append((done, total)),
    )
    pass2 = (pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2) + 0.0) / 3
    assert result.metrics == {
        "pass@1": pytest.approx((0.5 + 0.25 + 0.0) / 3),
        "pass@2": pytest.approx(pass2),
        "pass@4": pytest.approx(2 / 3),
    }
    assert pass2 == pytest.approx(((1 - 1 / 6) + 0.5) / 3)
    assert result.predictions[0] == {
        "task_id": "it",
        "instruction": "Italy?",
        "fn_name": "contains",
        "expected": "Rome",
        "responses": ["Rome", "Milan", "Rome", "Turin"],
        "correct": [True, False, True, False],
        "num_correct": 2,
    }
    tokens, num_samples, params = client.requests[0]
    assert num_samples == 4 and params.temperature == 1.0 and params.seed == 7
    assert "".join(map(chr, tokens[1:])).startswith("[think=False]<user>Italy?")
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_run_benchmark_limit_and_argument_errors() -> None:
    tokenizer = CharTokenizer()
    client = FakeSamplingClient(tokenizer, {"Italy?": ["Rome"]})
    result = run_benchmark(client, tokenizer, CAPITALS, limit=1)
    assert result.metrics == {"pass@1": 1.0} and len(result.predictions) == 1
    with pytest.raises(
        ValueError, match="pass@4 needs at least 4 samples per task; num_samples is 2"
    ):
        run_benchmark(client, tokenizer, CAPITALS, num_samples=2, metrics=("pass@1", "pass@4"))
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        run_benchmark(client, tokenizer, CAPITALS, metrics=("accuracy",))
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1, got 0"):
        run_benchmark(client, tokenizer, CAPITALS, max_tokens=0)
    assert client.requests == [client.requests[0]]  # nothing was sampled by the failing calls


def test_run_benchmark_rejects_a_short_response() -> None:
    tokenizer = CharTokenizer()
    client = FakeSamplingClient(tokenizer, {"Italy?": ["Rome"], "Spain?": [], "Turkey?": ["x"]})
    with pytest.raises(RuntimeError, match="task es: asked for 1 samples, got 0"):
        run_benchmark(client, tokenizer, CAPITALS)


def test_capitals_benchmarks_load_and_use_known_verifiers() -> None:
    root = Path(__file__).resolve().parents[1] / "examples" / "capitals" / "data" / "benchmarks"
    learned = load_benchmark(root / "learned")
    retained = load_benchmark(root / "retained")
    assert learned.name == "learned" and retained.name == "retained"
    assert len(learned) >= 20 and len(retained) >= 20
    for task in learned.tasks:
        assert task.fn_name == "contains"
        assert "Answer with just the city name." in task.instruction
    assert {task.fn_name for task in retained.tasks} <= {"contains", "regex"}


# ---------------------------------------------------------------------------------------------
# Time limit of user-supplied patterns


@pytest.mark.parametrize(
    ("pattern", "response"),
    [(r"(x+x+)+y", "x" * 5000), (r"(a|aa)+$", "a" * 60 + "b")],
)
def test_regex_verifier_stops_a_catastrophic_pattern_at_its_time_limit(
    monkeypatch, pattern: str, response: str
) -> None:
    monkeypatch.setattr(evals, "REGEX_TIMEOUT_S", 0.05)
    with pytest.raises(evals.VerifierTimeout, match=r"ran past the 0\.05 s limit on a \d+-char"):
        regex(response, pattern)
    task = BenchmarkTask("slow", "Say x.", "regex", pattern)
    assert task.verify(response) is False
    assert task.score(response) == (
        False,
        f"task slow: regex {pattern!r} ran past the 0.05 s limit on a "
        f"{len(response)}-character response",
    )


def test_regex_patterns_from_the_issue_are_answered() -> None:
    assert regex("a" * 5000, "(.*)*X") is False
    assert regex("word " * 5 + "!", r"^(\w+\s?)*$") is False
    assert regex("word " * 5, r"^(\w+\s?)*$") is True


def test_run_benchmark_counts_a_timed_out_verifier_as_wrong_and_reports_it(
    monkeypatch, caplog
) -> None:
    monkeypatch.setattr(evals, "REGEX_TIMEOUT_S", 0.05)
    tokenizer = CharTokenizer()
    slow = benchmark_from_rows(
        "slow",
        [
            {
                "task_id": "bomb",
                "instruction": "Say x.",
                "verifier": {"kind": "in_process", "fn_name": "regex", "expected": "(x+x+)+y"},
            },
            {
                "task_id": "ok",
                "instruction": "Say y.",
                "verifier": {"kind": "in_process", "fn_name": "regex", "expected": "y$"},
            },
        ],
    )
    client = FakeSamplingClient(tokenizer, {"Say x.": ["x" * 3000], "Say y.": ["xy"]})
    with caplog.at_level("WARNING", logger="sdft.evals"):
        result = run_benchmark(client, tokenizer, slow, max_tokens=4000)
    assert result.metrics == {"pass@1": 0.5}
    bomb, ok = result.predictions
    problem = "task bomb: regex '(x+x+)+y' ran past the 0.05 s limit on a 3000-character response"
    assert bomb["correct"] is False and bomb["verifier_errors"] == [problem]
    assert ok["correct"] is True and "verifier_errors" not in ok
    assert [record.getMessage() for record in caplog.records] == [
        f"verifier gave up, answer counted as wrong: {problem}"
    ]


def test_tool_use_verifiers_survive_hostile_json_in_a_response() -> None:
    golden = [{"Action": "search", "Action_Input": '{"q": "x"}'}]
    deep = "Action: search\nAction Input: {" + '"q": ' + "[" * 50_000 + "]" * 50_000 + "}"
    huge = 'Action: search\nAction Input: {"q": ' + "9" * 5000 + "}"
    for response in (deep, huge):
        assert tooluse(response, golden) is False
        assert tooluse_strict(response, golden) is False
        assert parse_tool_calls(response) == [ToolCall("search", None)]
