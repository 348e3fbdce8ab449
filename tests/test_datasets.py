"""Data loaders (JSONL formats, field mappings, HF datasets, Arrow) and the batching dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from sdft.datasets import (
    SDFTBatch,
    SDFTExample,
    SimpleSDFTDataset,
    batches,
    detect_row_format,
    epoch_permutation,
    examples_from_rows,
    load_arrow_examples,
    load_examples,
    load_hf_examples,
    load_jsonl_examples,
    load_located_examples,
    validate_field_mapping,
)

PAPER_DATA = Path("/work/shared/data/self-distillation/data")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
        encoding="utf-8",
    )
    return path


# ---------------------------------------------------------------------------------------------
# JSONL formats


def test_prompt_example_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"inputs": {"question": "What is the capital of Italy?"}, "expected": "Rome."},
            "",
            {
                "inputs": {"question": "Capital of Spain?", "extra": 1},
                "expected": "Madrid.",
                "id": 7,
            },
        ],
    )
    assert load_jsonl_examples(path) == [
        SDFTExample("What is the capital of Italy?", "Rome.", "train:1"),
        SDFTExample("Capital of Spain?", "Madrid.", "7"),
    ]
    assert load_examples(path) == load_jsonl_examples(path)


def test_trl_rows_with_text_and_conversational_prompts(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "trl.jsonl",
        [
            {"prompt": "Solve 2+2.", "privileged_context": "Example answer: 4."},
            {
                "prompt": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Solve 3+3."},
                ],
                "privileged_context": "Example answer: 6.",
            },
            {"prompt": [{"role": "user", "content": "Solve 1+1."}], "privileged_context": "2"},
        ],
    )
    assert load_jsonl_examples(path) == [
        SDFTExample("Solve 2+2.", "Example answer: 4.", "trl:1"),
        SDFTExample("Solve 3+3.", "Example answer: 6.", "trl:2", system_prompt="You are terse."),
        SDFTExample("Solve 1+1.", "2", "trl:3"),
    ]


def test_plain_rows_and_golden_answer_conversions(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "plain.jsonl",
        [
            {"question": "q1", "golden_answer": "a1", "system_prompt": "sys"},
            {"question": "q2", "golden_answer": ["Thought: look", "Action: find"]},
            {
                "question": "q3",
                "golden_answer": [
                    {"Action": "getImage", "Action_Input": "{}"},
                    {"Action": "search", "Action_Input": {"color": "wild"}},
                ],
            },
        ],
    )
    assert load_jsonl_examples(path) == [
        SDFTExample("q1", "a1", "plain:1", system_prompt="sys"),
        SDFTExample("q2", "Thought: look\nAction: find", "plain:2"),
        SDFTExample(
            "q3",
            'Action: getImage\nAction Input: {}\nAction: search\nAction Input: {"color": "wild"}',
            "plain:3",
        ),
    ]


def test_detect_row_format() -> None:
    assert detect_row_format({"inputs": {}, "expected": ""}) == "prompt_example"
    assert detect_row_format({"prompt": "", "privileged_context": ""}) == "trl"
    assert detect_row_format({"question": "", "golden_answer": ""}) == "simple"
    assert detect_row_format({"instruction": "", "output": ""}) is None


BAD_ROWS = [
    (
        "{not json",
        r"invalid JSON \(Expecting property name enclosed in double quotes at column 2\)",
    ),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"inputs": {"q": "x"}, "expected": "y"}, "missing field 'inputs.question'"),
    ({"inputs": "x", "expected": "y"}, "inputs must be an object, got str"),
    (
        {"inputs": {"question": 3}, "expected": "y"},
        "inputs.question must be a string or a list of chat messages, got int",
    ),
    ({"inputs": {"question": "   "}, "expected": "y"}, "inputs.question is empty"),
    ({"inputs": {"question": "x"}, "expected": None}, "expected must be a string, got null"),
    ({"inputs": {"question": "x"}, "expected": ""}, "expected is empty"),
    (
        {"inputs": {"question": "x"}, "expected": [1, 2]},
        "expected must be a string, a list of strings or a list of",
    ),
    (
        {"inputs": {"question": "x"}, "expected": "y", "id": 1.5},
        "id must be a string or an integer, got float",
    ),
    (
        {"prompt": "x", "privileged_context": "y"},
        r"row does not match the prompt_example format detected at .*data.jsonl:1",
    ),
    (
        {"inputs": {"question": "q"}, "expected": "a"},
        r"duplicate id 'dup' \(first used at .*data.jsonl:1\)",
    ),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_malformed_rows_name_file_and_line(tmp_path: Path, row: Any, message: str) -> None:
    first = {"inputs": {"question": "ok"}, "expected": "fine", "id": "dup"}
    bad = dict(row, id="dup") if "duplicate" in message else row
    path = write_jsonl(tmp_path / "data.jsonl", [first, bad])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}/data\.jsonl:2: {message}"):
        load_jsonl_examples(path)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "prompt is an empty message list"),
        ([{"role": "user"}], r"prompt\[0\] must be a message"),
        (
            [{"role": "user", "content": [{"type": "text"}]}],
            r"prompt\[0\].content must be a string \(text-only prompts\), got list",
        ),
        (
            [{"role": "tool", "content": "x"}],
            r"prompt\[0\].role must be system, user or assistant, got 'tool'",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}],
            r"prompt\[1\]: a system message must come first",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "prompt must end with a user message",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y"},
                {"role": "user", "content": "z"},
            ],
            r"prompt has 3 user/assistant turns; only single-turn prompts \(\[system,\] user\) are supported",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": " "}],
            "prompt user message is empty",
        ),
    ],
)
def test_malformed_chat_prompts(tmp_path: Path, prompt: Any, message: str) -> None:
    path = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": prompt, "privileged_context": "c"}])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}/trl\.jsonl:1: {message}"):
        load_jsonl_examples(path)


def test_undetectable_empty_missing_and_non_utf8_files(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(
        ValueError,
        match=r"alpaca\.jsonl:1: cannot detect the data format from the keys \(instruction, output\)",
    ):
        load_jsonl_examples(path)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"empty\.jsonl: no examples"):
        load_jsonl_examples(empty)
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*missing\.jsonl"):
        load_jsonl_examples(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"data file must be a file"):
        load_jsonl_examples(tmp_path)
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(b'{"question": "caf\xe9", "golden_answer": "x"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:1: not valid UTF-8"):
        load_jsonl_examples(binary)


# ---------------------------------------------------------------------------------------------
# Field mapping


def test_field_mapping_with_dotted_paths(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "q1", "output": "a1", "meta": {"uid": "u1", "sys": "S"}},
            {"instruction": "q2", "output": "a2", "meta": {"uid": "u2", "sys": "S"}},
        ],
    )
    fields = {
        "question": "instruction",
        "golden_answer": "output",
        "id": "meta.uid",
        "system_prompt": "meta.sys",
    }
    assert load_jsonl_examples(path, fields=fields) == [
        SDFTExample("q1", "a1", "u1", "S"),
        SDFTExample("q2", "a2", "u2", "S"),
    ]
    # a partial mapping keeps the default column name of the other field
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"instruction": "q", "golden_answer": "a"}])
    assert load_jsonl_examples(partial, fields={"question": "instruction"}) == [
        SDFTExample("q", "a", "partial:1")
    ]
    # a literal key containing a dot wins over the nested walk
    dotted = write_jsonl(
        tmp_path / "dotted.jsonl",
        [{"inputs.question": "flat", "inputs": {"question": "nested"}, "a": "x"}],
    )
    assert (
        load_jsonl_examples(dotted, fields={"question": "inputs.question", "golden_answer": "a"})[
            0
        ].question
        == "flat"
    )
    nested = write_jsonl(tmp_path / "nested.jsonl", [{"inputs": {"question": "nested"}, "a": "x"}])
    assert (
        load_jsonl_examples(nested, fields={"question": "inputs.question", "golden_answer": "a"})[
            0
        ].question
        == "nested"
    )


def test_field_mapping_errors(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": "q1", "output": "a1", "meta": {}}]
    )
    with pytest.raises(
        ValueError, match=r"alpaca\.jsonl:1: missing field 'meta.uid' \(mapped to id\)"
    ):
        load_jsonl_examples(
            path, fields={"question": "instruction", "golden_answer": "output", "id": "meta.uid"}
        )
    with pytest.raises(ValueError, match=r"alpaca\.jsonl:1: missing field 'golden_answer'$"):
        load_jsonl_examples(path, fields={"question": "instruction"})
    with pytest.raises(
        ValueError,
        match="field mapping: unknown key\\(s\\) 'answer'; known keys: question, golden_answer, id, system_prompt",
    ):
        validate_field_mapping({"question": "q", "answer": "a"})
    with pytest.raises(ValueError, match="field mapping: question must name a column, got ''"):
        validate_field_mapping({"question": ""})
    with pytest.raises(TypeError, match="field mapping must be a mapping, got list"):
        validate_field_mapping(["question"])  # type: ignore[arg-type]


def test_load_examples_dispatch_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "golden_answer": "a"}])
    with pytest.raises(ValueError, match="split applies to source_kind 'hf' only"):
        load_examples(path, split="train")
    with pytest.raises(ValueError, match="unknown source_kind 'csv'; use jsonl, hf or arrow"):
        load_examples(path, source_kind="csv")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# HF datasets on disk and Arrow files

ROWS = [
    {"instruction": "What is the capital of Italy?", "output": "Rome."},
    {"instruction": "What is the capital of Spain?", "output": "Madrid."},
    {"instruction": "What is the capital of Turkey?", "output": "Ankara."},
]
MAPPING = {"question": "instruction", "golden_answer": "output"}


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_hf_examples(tmp_path / "ds", fields=MAPPING) == [
        SDFTExample("What is the capital of Italy?", "Rome.", "ds:0"),
        SDFTExample("What is the capital of Spain?", "Madrid.", "ds:1"),
        SDFTExample("What is the capital of Turkey?", "Ankara.", "ds:2"),
    ]
    assert load_examples(tmp_path / "ds", source_kind="hf", fields=MAPPING) == load_hf_examples(
        tmp_path / "ds", fields=MAPPING
    )
    # PromptExample rows stored as structs are detected like JSONL rows
    datasets.Dataset.from_list([{"inputs": {"question": "q"}, "expected": "a"}]).save_to_disk(
        str(tmp_path / "pe")
    )
    assert load_hf_examples(tmp_path / "pe") == [SDFTExample("q", "a", "pe:0")]


def test_hf_dataset_dict_needs_a_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:2]),
            "test": datasets.Dataset.from_list(ROWS[2:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"dd: has splits test, train; set split"):
        load_hf_examples(tmp_path / "dd", fields=MAPPING)
    with pytest.raises(ValueError, match=r"dd: no split 'val' \(splits: test, train\)"):
        load_hf_examples(tmp_path / "dd", fields=MAPPING, split="val")
    assert [
        e.question for e in load_hf_examples(tmp_path / "dd", fields=MAPPING, split="test")
    ] == ["What is the capital of Turkey?"]


def test_hf_errors_name_the_row(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([*ROWS, {"instruction": "", "output": "x"}]).save_to_disk(
        str(tmp_path / "ds")
    )
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(tmp_path))}/ds: row 3: instruction is empty"
    ):
        load_hf_examples(tmp_path / "ds", fields=MAPPING)
    with pytest.raises(FileNotFoundError, match="HF dataset directory not found"):
        load_hf_examples(tmp_path / "nope", fields=MAPPING)
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(FileNotFoundError, match="not a dataset saved with save_to_disk"):
        load_hf_examples(tmp_path / "not_a_dataset", fields=MAPPING)


def test_arrow_stream_shards_and_arrow_file_format(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    shard = next((tmp_path / "ds").glob("*.arrow"))
    from_shard = load_arrow_examples(shard, fields=MAPPING)
    assert [e.golden_answer for e in from_shard] == ["Rome.", "Madrid.", "Ankara."]
    assert from_shard[0].id == f"{shard.name}:0"
    # IPC file (random access) format, two shards in a directory read in name order
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, part in (("b.arrow", ROWS[2:]), ("a.arrow", ROWS[:2])):
        table = pa.Table.from_pylist(part)
        with pa.ipc.new_file(str(shards / name), table.schema) as writer:
            writer.write_table(table)
    loaded = load_examples(shards, source_kind="arrow", fields=MAPPING)
    assert [(e.id, e.golden_answer) for e in loaded] == [
        ("shards:0", "Rome."),
        ("shards:1", "Madrid."),
        ("shards:2", "Ankara."),
    ]
    bad = pa.Table.from_pylist([{"instruction": "  ", "output": "x"}])
    with pa.ipc.new_file(str(shards / "c.arrow"), bad.schema) as writer:
        writer.write_table(bad)
    with pytest.raises(ValueError, match=r"shards/c\.arrow: row 0: instruction is empty"):
        load_arrow_examples(shards, fields=MAPPING)
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match=r"junk\.arrow: not an Arrow IPC stream or file"):
        load_arrow_examples(tmp_path / "junk.arrow", fields=MAPPING)
    with pytest.raises(FileNotFoundError, match="Arrow data not found"):
        load_arrow_examples(tmp_path / "none.arrow")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.arrow files in"):
        load_arrow_examples(tmp_path / "emptydir")


# ---------------------------------------------------------------------------------------------
# The paper's evaluation sets (read from the shared folder at test time)


def _paper_dir(name: str) -> Path:
    path = PAPER_DATA / name / "eval_data"
    if not path.is_dir():
        pytest.skip(f"the paper's data is not available here ({path} is absent)")
    pytest.importorskip("datasets")
    return path


def test_paper_science_eval_loads_with_the_documented_mapping() -> None:
    examples = load_examples(
        _paper_dir("science_data"),
        source_kind="hf",
        fields={"question": "prompt", "golden_answer": "answer"},
    )
    assert len(examples) == 507
    assert {e.golden_answer for e in examples} == {"A", "B", "C", "D"}
    assert len({e.system_prompt for e in examples}) == 1
    assert examples[0].system_prompt.startswith("\nGiven a question and four options")
    assert examples[0].question.startswith(
        "Which of the following molecules is the only correct reactant"
    )
    assert examples[0].id == "eval_data:0"


def test_paper_tooluse_eval_loads_with_the_documented_mapping() -> None:
    examples = load_examples(
        _paper_dir("tooluse_data"),
        source_kind="hf",
        fields={"question": "prompt", "golden_answer": "golden_answer"},
    )
    assert len(examples) == 97
    assert examples[0].question.endswith(
        "Begin!\nQuestion: Hey, can you show me a random picture of an axolotl?"
    )
    assert examples[0].golden_answer == "Action: getRandomAxolotlImage\nAction Input: {}"
    assert all(e.system_prompt is None for e in examples)
    short = load_examples(
        _paper_dir("tooluse_data") / "data-00000-of-00001.arrow",
        source_kind="arrow",
        fields={"question": "instruction", "golden_answer": "golden_answer"},
    )
    assert short[0].question == "Hey, can you show me a random picture of an axolotl?"
    assert [e.golden_answer for e in short] == [e.golden_answer for e in examples]


# ---------------------------------------------------------------------------------------------
# Datasets and batching


def _rows(n: int) -> list[dict[str, str]]:
    return [{"question": f"q{i}", "golden_answer": f"a{i}"} for i in range(n)]


PINNED_SEED0_EPOCH0 = [5, 4, 3, 9, 2, 7, 6, 8, 1, 0]
PINNED_SEED0_EPOCH1 = [4, 0, 2, 5, 7, 9, 6, 1, 8, 3]
PINNED_SEED1_EPOCH0 = [2, 4, 8, 6, 5, 7, 9, 3, 1, 0]


def test_epoch_permutation_is_pinned() -> None:
    # the exact order is part of the resume contract: changing it breaks resumed runs
    assert epoch_permutation(10, 0, 0) == PINNED_SEED0_EPOCH0
    assert epoch_permutation(10, 0, 1) == PINNED_SEED0_EPOCH1
    assert epoch_permutation(10, 1, 0) == PINNED_SEED1_EPOCH0
    assert epoch_permutation(0, 0, 0) == [] and epoch_permutation(1, 5, 5) == [0]
    for seed in range(5):
        assert sorted(epoch_permutation(37, seed, 3)) == list(range(37))


def test_simple_dataset_batches_cover_each_epoch_and_are_reproducible() -> None:
    dataset = SimpleSDFTDataset(_rows(10), batch_size=4, num_epochs=3, seed=0)
    assert (dataset.batches_per_epoch, len(dataset)) == (3, 9)
    for epoch in range(3):
        epoch_batches = [dataset.get_batch(epoch * 3 + b) for b in range(3)]
        assert [len(b) for b in epoch_batches] == [4, 4, 2]
        assert all(b.epoch == epoch for b in epoch_batches)
        ids = [i for b in epoch_batches for i in b.ids]
        assert ids == [str(i) for i in epoch_permutation(10, 0, epoch)]
    first = dataset.get_batch(0)
    assert first == SDFTBatch(index=0, epoch=0, examples=first.examples)
    assert first.questions == [f"q{i}" for i in epoch_permutation(10, 0, 0)[:4]]
    assert first.golden_answers == [f"a{i}" for i in epoch_permutation(10, 0, 0)[:4]]
    assert first.system_prompts == [None] * 4
    # a fresh dataset (a restarted run) gives the same batch i; epochs differ from each other
    again = SimpleSDFTDataset(_rows(10), batch_size=4, num_epochs=3, seed=0)
    assert [again.get_batch(i) for i in range(9)] == [dataset.get_batch(i) for i in range(9)]
    assert dataset.get_batch(0).ids != dataset.get_batch(3).ids
    other_seed = SimpleSDFTDataset(_rows(10), batch_size=4, num_epochs=3, seed=1)
    assert other_seed.get_batch(0).ids == [str(i) for i in epoch_permutation(10, 1, 0)[:4]]
    assert [b.index for b in batches(dataset, start=7)] == [7, 8]


def test_simple_dataset_options_and_errors(tmp_path: Path) -> None:
    ordered = SimpleSDFTDataset(_rows(5), batch_size=2, shuffle=False, num_epochs=2)
    assert [ordered.get_batch(i).ids for i in range(len(ordered))] == [
        ["0", "1"],
        ["2", "3"],
        ["4"],
        ["0", "1"],
        ["2", "3"],
        ["4"],
    ]
    dropped = SimpleSDFTDataset(_rows(5), batch_size=2, shuffle=False, drop_last=True)
    assert [dropped.get_batch(i).ids for i in range(len(dropped))] == [["0", "1"], ["2", "3"]]
    with pytest.raises(IndexError, match="batch index 2 out of range: the dataset has 2 batches"):
        dropped.get_batch(2)
    with pytest.raises(IndexError, match="batch index -1 out of range"):
        dropped.get_batch(-1)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        SimpleSDFTDataset(_rows(5), batch_size=0)
    with pytest.raises(TypeError, match="num_epochs must be an int, got float"):
        SimpleSDFTDataset(_rows(5), batch_size=1, num_epochs=1.5)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="batch_size 6 is larger than the 5 examples and drop_last is set"
    ):
        SimpleSDFTDataset(_rows(5), batch_size=6, drop_last=True)
    with pytest.raises(ValueError, match="rows: no examples"):
        SimpleSDFTDataset([], batch_size=1)
    with pytest.raises(ValueError, match=r"rows\[1\]: golden_answer must be a string, got int"):
        SimpleSDFTDataset(
            [{"question": "q", "golden_answer": "a"}, {"question": "q", "golden_answer": 3}],
            batch_size=1,
        )
    with pytest.raises(
        ValueError, match=r"rows\[1\]: duplicate id 'x' \(first used at rows\[0\]\)"
    ):
        SimpleSDFTDataset([SDFTExample("q", "a", "x"), SDFTExample("r", "b", "x")], batch_size=1)
    big = SimpleSDFTDataset(_rows(3), batch_size=8)
    assert len(big) == 1 and len(big.get_batch(0)) == 3


def test_simple_dataset_from_jsonl_and_from_source(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [{"inputs": {"question": f"q{i}"}, "expected": f"a{i}"} for i in range(4)],
    )
    dataset = SimpleSDFTDataset.from_jsonl(path, batch_size=2, seed=3)
    assert dataset.examples[0] == SDFTExample("q0", "a0", "train:1")
    assert dataset.get_batch(0).ids == [f"train:{i + 1}" for i in epoch_permutation(4, 3, 0)[:2]]
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "q", "output": "a"}])
    mapped = SimpleSDFTDataset.from_source(alpaca, fields=MAPPING, batch_size=1)
    assert mapped.examples == (SDFTExample("q", "a", "alpaca:1"),)
    mixed = examples_from_rows(
        [SDFTExample("q", "a", "x"), {"question": "r", "golden_answer": "b"}]
    )
    assert mixed == [SDFTExample("q", "a", "x"), SDFTExample("r", "b", "1")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"question": "q\\ud800", "golden_answer": "a"}',
            r"bad\.jsonl:2: contains a lone surrogate \\ud800, which is not valid Unicode text",
        ),
        (
            '{"id": ' + "9" * 5000 + ', "question": "q", "golden_answer": "a"}',
            r"bad\.jsonl:2: unreadable JSON value \(Exceeds the limit \(4300 digits\)",
        ),
        ("[" * 100_000 + "]" * 100_000, r"bad\.jsonl:2: JSON nested too deeply to read"),
        ("42", r"bad\.jsonl:2: expected a JSON object, got int$"),
    ],
)
def test_unreadable_rows_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q0", "golden_answer": "a0"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_jsonl_examples(path)


def test_located_examples_carry_the_row_location(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"question": "q1", "golden_answer": "a1"}\n\n{"question": "q2", "golden_answer": "a2"}\n'
    )
    located = load_located_examples(path)
    assert [(where, example.question) for where, example in located] == [
        (f"{path}:1:", "q1"),
        (f"{path}:3:", "q2"),
    ]
    assert [example for _, example in located] == load_examples(path)
