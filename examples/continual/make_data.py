"""Writes the stage-2 data of the embedded-model experiment (run from this folder; deterministic).

Stage 2 teaches a small tool-call syntax the base SmolLM2-135M-Instruct does not follow: given
three tools, answer with exactly

    Action: <tool>
    Action Input: {"<argument>": "<value>"}

scored by the paper's `tooluse` verifier (same tool names, same merged JSON arguments). The
training questions and the benchmark questions use different cities and countries.
"""

from __future__ import annotations

import json
from pathlib import Path

HEADER = (
    "You can call one of these tools: get_weather(city), get_time(city), "
    "get_population(country).\n"
    "Reply with exactly two lines:\n"
    "Action: <tool name>\n"
    'Action Input: {"<argument>": "<value>"}\n\n'
    "Question: "
)
WEATHER = [
    "What is the weather like in {x} today?",
    "Will it rain in {x}?",
    "How warm is it in {x} right now?",
]
TIME = [
    "What time is it in {x}?",
    "Tell me the current local time in {x}.",
    "Which hour is it now in {x}?",
]
POPULATION = [
    "How many people live in {x}?",
    "What is the population of {x}?",
    "How large is the population of {x}?",
]
TRAIN_CITIES = [
    "Oslo",
    "Lima",
    "Nairobi",
    "Madrid",
    "Hanoi",
    "Toronto",
    "Cairo",
    "Dublin",
    "Denver",
    "Manila",
    "Zurich",
    "Perth",
]
TRAIN_COUNTRIES = [
    "Chile",
    "Kenya",
    "Norway",
    "Vietnam",
    "Portugal",
    "Egypt",
    "Canada",
    "Poland",
    "Mexico",
    "Nepal",
    "Greece",
    "Finland",
]
TEST_CITIES = [
    "Lisbon",
    "Bogota",
    "Seoul",
    "Vienna",
    "Accra",
    "Boston",
    "Prague",
    "Dakar",
    "Quito",
    "Osaka",
]
TEST_COUNTRIES = [
    "Peru",
    "Ghana",
    "Austria",
    "Japan",
    "Sweden",
    "Morocco",
    "Brazil",
    "India",
    "Ireland",
    "Turkey",
]


def answer(tool: str, argument: str, value: str) -> str:
    return f"Action: {tool}\nAction Input: {json.dumps({argument: value})}"


def rows(cities: list[str], countries: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, city in enumerate(cities):
        out.append((WEATHER[i % 3].format(x=city), answer("get_weather", "city", city)))
        out.append((TIME[(i + 1) % 3].format(x=city), answer("get_time", "city", city)))
    for i, country in enumerate(countries):
        out.append(
            (POPULATION[i % 3].format(x=country), answer("get_population", "country", country))
        )
    return out


def main() -> None:
    data = Path("data")
    train = rows(TRAIN_CITIES, TRAIN_COUNTRIES)
    (data / "toolcall_train.jsonl").write_text(
        "".join(json.dumps({"question": HEADER + q, "golden_answer": a}) + "\n" for q, a in train)
    )
    bench = data / "benchmarks" / "toolcall"
    bench.mkdir(parents=True, exist_ok=True)
    (bench / "tasks.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "task_id": f"toolcall_{i:02d}",
                    "instruction": HEADER + q,
                    "verifier": {"kind": "in_process", "fn_name": "tooluse", "expected": a},
                }
            )
            + "\n"
            for i, (q, a) in enumerate(rows(TEST_CITIES, TEST_COUNTRIES))
        )
    )


if __name__ == "__main__":
    main()
