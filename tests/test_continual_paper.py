"""The paper's continual-learning experiment (examples/paper/continual.yaml) validated offline on
the shared evaluation shards of the reference data, with the paper's scorers.

The shared copy of the reference data has the evaluation shards but not the training shards, so
the test builds training shards with upstream's schema from the evaluation rows (a stand-in for
the missing files, used only to check the layout, field mapping and prompts). Skipped when the
shared folder is absent (third-party data, not part of the repository).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdft.continual.command import experiment_checks
from sdft.continual.scoring import load_tasks
from sdft.continual.spec import load_experiment

SHARED = Path("/work/shared/data/self-distillation/data")
PAPER = Path(__file__).resolve().parents[1] / "examples" / "paper" / "continual.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SHARED / "tooluse_data" / "eval_data").is_dir():
        pytest.skip(f"the paper's evaluation data is not available here ({SHARED} is absent)")
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("paper-data")
    for task in ("tooluse_data", "science_data"):
        (root / task).mkdir()
        (root / task / "eval_data").symlink_to(SHARED / task / "eval_data")
    tool = datasets.load_from_disk(str(SHARED / "tooluse_data" / "eval_data"))
    tool_rows = []
    for row in tool.select(range(12)):
        lines: list[str] = []
        for call in row["golden_answer"]:
            lines += ["Thought: I should call the tool.", f"Action: {call['Action']}"]
            lines.append(f"Action Input: {call['Action_Input']}")
        tool_rows.append({**row, "golden_response": lines})
    datasets.Dataset.from_list(tool_rows).save_to_disk(str(root / "tooluse_data" / "train_data"))
    science = datasets.load_from_disk(str(SHARED / "science_data" / "eval_data"))
    science_rows = [
        {
            "messages": row["prompt"],
            "output_text": f"<reasoning>\nchemistry\n</reasoning>\n<answer>\n{row['answer']}\n</answer>",
        }
        for row in science.select(range(12))
    ]
    datasets.Dataset.from_list(science_rows).save_to_disk(str(root / "science_data" / "train_data"))
    return root


def by_name(rows: list[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
    return {name: (status, detail) for name, status, detail in rows}


def test_paper_experiment_validates_offline(data_root: Path) -> None:
    rows = experiment_checks(PAPER, deep=True, data_root=data_root)
    assert [row for row in rows if row[1] == "FAIL"] == []
    checks = by_name(rows)
    assert checks["experiment"][1].startswith(
        "3 methods × 3 learning rates × 1 seeds = 9 chains of 2 stages (18 runs"
    )
    assert checks["stage 1 data"] == (
        "ok",
        f"tooluse: 12 examples (hf) from {data_root / 'tooluse_data' / 'train_data'}",
    )
    assert checks["stage 2 data"][0] == "ok"
    assert checks["benchmark tooluse"][1].startswith("97 tasks, pass@1 (stage 1's task;")
    assert checks["benchmark science"][1].startswith("507 tasks, pass@1 (stage 2's task;")


def test_paper_runs_use_the_papers_settings(data_root: Path) -> None:
    experiment = load_experiment(PAPER, data_root=data_root)
    assert [m.name for m in experiment.spec.methods] == ["sft", "sdft_topk", "sdft_is"]
    assert experiment.spec.learning_rates == [1e-4, 5e-4, 1e-3]
    for (chain, stage), run in experiment.runs.items():
        config = run.config
        assert config.backend.kind == "tinker"
        assert config.model.name == "Qwen/Qwen3-4B-Instruct-2507"
        assert config.params.learning_rate == chain.learning_rate
        assert config.algorithm.kind == ("sft" if chain.method == "sft" else "sdft")
        assert config.params.topk == (0 if chain.method == "sdft_is" else 20)
        assert config.params.max_steps == (126 if stage == 1 else 56)
        expected = data_root / ("tooluse_data" if stage == 1 else "science_data") / "train_data"
        assert config.data.path == expected


def test_the_papers_scorers_through_the_benchmark_definitions(data_root: Path) -> None:
    experiment = load_experiment(PAPER, data_root=data_root)
    specs = {spec.name: spec for spec in experiment.benchmarks}
    tool = load_tasks(specs["tooluse"])
    assert len(tool.groups) == 1 and tool.groups[0][0] is None
    tasks: list[Any] = list(tool.groups[0][1].tasks)
    # the golden calls rendered as ReAct text, scored by the paper's rule: 95 of 97
    assert sum(task.verify(task.expected) for task in tasks) == 95
    science = load_tasks(specs["science"])
    assert len(science.groups) == 1
    system, benchmark = science.groups[0]
    assert system is not None and system.startswith("\nGiven a question and four options")
    assert all(task.verify(f"<answer>\n{task.expected}\n</answer>") for task in benchmark.tasks)
    assert sum(task.verify("<answer>\nA\n</answer>") for task in benchmark.tasks) == 123


def test_the_shared_folder_alone_lacks_the_training_shards() -> None:
    if not (SHARED / "tooluse_data" / "eval_data").is_dir():
        pytest.skip(f"{SHARED} is absent")
    checks = by_name(experiment_checks(PAPER, deep=False, data_root=SHARED))
    status, detail = checks["stage 1 data"]
    assert status == "FAIL"
    assert "tooluse_data/train_data: not a dataset saved with save_to_disk" in detail
    assert checks["benchmark tooluse"][0] == "ok"
