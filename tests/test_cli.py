"""The ``sdft`` command: train, validate, eval, compare; one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdft.cli import main
from sdft.runlog import RunLog
from support import write_config


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_then_eval_then_compare(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path, params={"max_steps": 2, "save_every": 1})
    code, out, err = run(capsys, "train", str(config), "--no-progress")
    assert code == 0, err
    lines = out.splitlines()
    assert "Status:    completed" in lines
    assert "Steps:     2/2" in lines
    assert any(line.startswith("Loss:      train/mean_loss ") for line in lines)
    assert any(line.startswith("Metric:    val/val/pass@1 ") for line in lines)
    assert any(line.startswith("Metric:    test/final/pass@1 ") for line in lines)
    assert f"Summary:   {tmp_path / 'out' / 'summary.md'}" in lines

    code, out, err = run(capsys, "eval", str(config), "--no-progress")
    assert code == 0, err
    base = tmp_path / "out" / "eval" / "base"
    assert "Evaluated: base (step 0)" in out
    assert sorted(p.name for p in (base / "predictions").iterdir()) == [
        "final.jsonl",
        "final.step0.jsonl",
        "val.jsonl",
        "val.step0.jsonl",
    ]
    assert [(r["step"], r["split"]) for r in RunLog(base).read_metrics()] == [
        (0, "val"),
        (0, "test"),
    ]

    code, out, err = run(capsys, "eval", str(config), "--checkpoint", "last", "--no-progress")
    assert code == 0, err
    assert "Evaluated: 000002 (step 2)" in out
    rows = RunLog(tmp_path / "out" / "eval" / "000002").read_metrics()
    assert [(r["step"], sorted(r["metrics"])) for r in rows] == [
        (2, ["val/val/pass@1"]),
        (2, ["test/final/pass@1"]),
    ]
    # The checkpoint is the trained model: its greedy answers equal the run's own final eval.
    trained = (tmp_path / "out" / "predictions" / "val.jsonl").read_text()
    assert (
        tmp_path / "out" / "eval" / "000002" / "predictions" / "val.jsonl"
    ).read_text() == trained

    code, out, err = run(
        capsys, "eval", str(config), "--checkpoint", "000001", "--output", str(tmp_path / "e1")
    )
    assert code == 0, err
    assert (tmp_path / "e1" / "predictions" / "val.step1.jsonl").is_file()

    code, out, err = run(
        capsys,
        "compare",
        str(tmp_path / "out"),
        str(tmp_path / "out"),
        "--labels",
        "a",
        "b",
        "--output",
        str(tmp_path / "cmp"),
    )
    assert code == 0, err
    assert out.startswith("| run | steps | final train/mean_loss |")
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cmp" / "comparison.md").read_text() in out


def test_max_steps_override_and_refusal_of_an_existing_run(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path, params={"max_steps": 5}, benchmarks=[])
    code, out, _ = run(capsys, "train", str(config), "--max-steps", "1", "--no-progress")
    assert code == 0 and "Steps:     1/1" in out
    code, out, err = run(capsys, "train", str(config), "--no-progress")
    assert code == 2 and out == ""
    assert err.startswith(f"sdft: error: output_dir {tmp_path / 'out'} already holds a run (")
    assert err.endswith("pass --resume to continue it or --overwrite to delete it and start over\n")
    code, out, _ = run(
        capsys, "train", str(config), "--max-steps", "2", "--resume", "--no-progress"
    )
    assert code == 0 and "Steps:     2/2" in out
    code, _, err = run(capsys, "train", str(config), "--max-steps", "0")
    assert (code, err) == (2, "sdft: error: --max-steps must be >= 1, got 0\n")


def test_errors_are_one_line_with_exit_status_2(tmp_path: Path, capsys) -> None:
    code, out, err = run(capsys, "train", str(tmp_path / "nope.yaml"))
    assert (code, out, err) == (
        2,
        "",
        f"sdft: error: config file not found: {tmp_path / 'nope.yaml'}\n",
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: x}\noutput_dir: o\nalgorithm: {params: {topk: -1}}\n")
    code, _, err = run(capsys, "train", str(bad))
    assert (code, err) == (
        2,
        f"sdft: error: {bad}:3: algorithm.params.topk: must be greater than or equal to 0\n",
    )
    code, _, err = run(capsys, "eval", str(write_config(tmp_path)), "--checkpoint", "999999")
    assert code == 2 and "checkpoint '999999' is neither in" in err and "Traceback" not in err


def test_validate_checklist(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path)
    code, out, _ = run(capsys, "validate", str(config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"[ok  ] config               {config} (schema valid)"
    assert lines[1].startswith("[ok  ] data                 5 examples (jsonl) from ")
    assert lines[2] == "[ok  ] templates            render with all 5 examples"
    assert lines[3].startswith("[ok  ] benchmark val        2 tasks, pass@1, every 2 steps")
    assert lines[4].startswith("[ok  ] benchmark final      1 tasks, pass@1, after training")
    assert lines[5].startswith("[ok  ] backend              local, device cpu, dtype float32")
    assert lines[6] == f"[ok  ] output_dir           {tmp_path / 'out'} (new run)"
    assert lines[7].startswith("[skip] model")
    assert lines[-1] == "all checks passed"

    code, out, _ = run(capsys, "validate", str(config), "--deep")
    assert code == 0
    assert any(
        line.startswith("[ok  ] model                sdft/tiny-random -> ")
        for line in out.splitlines()
    )
    prompts = [line for line in out.splitlines() if line.startswith("[ok  ] prompts")]
    assert len(prompts) == 1 and "teacher prompt" in prompts[0]


def test_validate_reports_each_failure(tmp_path: Path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path)
    with open(tmp_path / "data" / "train.jsonl", "a") as handle:
        handle.write('{"inputs": {"question": "x"}}\n')
    (tmp_path / "data" / "val" / "tasks.jsonl").write_text(
        '{"task_id": "a", "instruction": "b", "verifier": {"kind": "in_process", "fn_name": "nope", "expected": 1}}\n'
    )
    code, out, _ = run(capsys, "validate", str(config))
    assert code == 1
    lines = out.splitlines()
    data_line = next(line for line in lines if " data " in line)
    assert data_line.startswith(
        f"[FAIL] data                 {tmp_path / 'data' / 'train.jsonl'}:6:"
    )
    bench_line = next(line for line in lines if "benchmark val" in line)
    assert (
        bench_line.startswith("[FAIL] benchmark val")
        and "unknown verifier.fn_name 'nope'" in bench_line
    )
    assert lines[-1] == "2 check(s) failed"

    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    tinker_config = tmp_path / "tinker.yaml"
    tinker_config.write_text(
        "model: {name: Qwen/Qwen3-4B-Instruct-2507}\nbackend: {kind: tinker}\n"
        "data: {path: data/train.jsonl}\noutput_dir: tout\n"
    )
    (tmp_path / "data" / "train.jsonl").write_text('{"question": "q", "golden_answer": "a"}\n')
    code, out, _ = run(capsys, "validate", str(tinker_config), "--deep")
    assert code == 1
    assert "[FAIL] backend              tinker: TINKER_API_KEY is not set" in out.splitlines()
    monkeypatch.setenv("TINKER_API_KEY", "tml-do-not-print-me")
    code, out, _ = run(capsys, "validate", str(tinker_config), "--deep")
    assert code == 0
    assert "TINKER_API_KEY is set (value not shown)" in out
    assert "tml-do-not-print-me" not in out

    code, out, _ = run(capsys, "validate", str(tmp_path / "missing.yaml"))
    assert code == 1 and out.startswith("[FAIL] config               config file not found:")


def test_validate_sees_an_existing_run(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path, params={"max_steps": 1, "save_every": 1}, benchmarks=[])
    assert run(capsys, "train", str(config), "--no-progress")[0] == 0
    code, out, _ = run(capsys, "validate", str(config))
    assert code == 0
    assert (
        f"[warn] output_dir           {tmp_path / 'out'} already holds a run (last checkpoint at "
        "step 1): `sdft train --resume` continues it, `--overwrite` starts over"
    ) in out.splitlines()


def test_validate_counts_checkpoints_only_where_the_run_keeps_them(tmp_path: Path, capsys) -> None:
    """``checkpoints/`` in output_dir is another run's when ``checkpoint_root`` points elsewhere:
    validate, like train, treats output_dir as new."""
    config = write_config(tmp_path, benchmarks=[])
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    text = config.read_text().replace(
        "backend:\n", f"backend:\n  checkpoint_root: {tmp_path / 'elsewhere'}\n", 1
    )
    config.write_text(text)
    code, out, _ = run(capsys, "validate", str(config))
    assert code == 0
    assert f"[ok  ] output_dir           {tmp_path / 'out'} (new run)" in out.splitlines()
    default_root = write_config(tmp_path, benchmarks=[], name="default.yaml")
    code, out, _ = run(capsys, "validate", str(default_root))
    assert (
        f"[warn] output_dir           {tmp_path / 'out'} already holds a run (no checkpoint " in out
    )


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "sdft"
    assert script.is_file()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("train", "validate", "eval", "compare"):
        assert f"    {command} " in result.stdout


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sdft.cli", "--debug", "validate", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    # validate reports a missing config as a failed check (exit 1), not as an error.
    assert result.returncode == 1
    result = subprocess.run(
        [sys.executable, "-m", "sdft.cli", "--debug", "train", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "FileNotFoundError: config file not found" in result.stderr


@pytest.mark.real_model
def test_real_model_end_to_end(tmp_path: Path, capsys) -> None:
    """Two SDFT steps and an evaluation on the embedded SmolLM2-135M-Instruct."""
    config = write_config(
        tmp_path,
        params={"max_steps": 2, "save_every": None, "learning_rate": 2e-5},
        benchmarks=[
            {"name": "val", "path": "data/val", "run_every": 2, "metrics": ["pass@1"]},
        ],
    )
    text = config.read_text().replace("sdft/tiny-random", "HuggingFaceTB/SmolLM2-135M-Instruct")
    config.write_text(text)
    code, _out, err = run(capsys, "train", str(config), "--no-progress")
    assert code == 0, err
    rows = RunLog(tmp_path / "out").read_metrics()
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        # A real teacher shown the answer is confident: low entropy over its top-5.
        assert 0 < row["metrics"]["train/mean_loss"] < 10
        assert row["metrics"]["train/teacher_entropy"] < 1.6
    predictions = [
        json.loads(line)
        for line in (tmp_path / "out" / "predictions" / "val.step0.jsonl").read_text().splitlines()
    ]
    # The base model knows a capital ("The capital of Japan is Tokyo.").
    assert [p["task_id"] for p in predictions] == ["val_0", "val_1"]
    assert any(p["correct"] for p in predictions)


# --- validate and argument checks (issue 10) ---------------------------------------------------


def test_validate_deep_checks_every_example_and_names_its_row(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path)
    data = tmp_path / "data" / "train.jsonl"
    long_question = " ".join(["word"] * 400) + "?"
    long_row = json.dumps({"inputs": {"question": long_question}, "expected": "x"})
    data.write_text(long_row + "\n" + data.read_text())  # line 1 is too long; lines 2-6 fit
    code, out, _ = run(capsys, "validate", str(config))
    assert code == 0  # the shallow checks do not render prompts
    code, out, _ = run(capsys, "validate", str(config), "--deep")
    assert code == 1
    prompt_lines = [line for line in out.splitlines() if " prompts " in line]
    assert len(prompt_lines) == 2
    assert prompt_lines[0].startswith(f"[FAIL] prompts              {data}:1: teacher prompt ")
    assert prompt_lines[0].endswith(
        "tokens: only 0 of max_tokens 8 completion tokens fit max_context_length 256"
    )
    assert prompt_lines[1].startswith("[FAIL] prompts              6 examples rendered; student ")
    assert prompt_lines[1].endswith("; 1 rows fail, 0 rows warn")


def test_validate_reports_unreadable_rows_and_keeps_going(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path)
    data = tmp_path / "data" / "train.jsonl"
    with open(data, "a") as handle:
        handle.write("[" * 100_000 + "]" * 100_000 + "\n")
    code, out, _ = run(capsys, "validate", str(config))
    assert code == 1
    lines = out.splitlines()
    assert f"[FAIL] data                 {data}:6: JSON nested too deeply to read" in lines
    assert any(line.startswith("[ok  ] output_dir") for line in lines)
    assert lines[-1] == "1 check(s) failed"


def test_validate_fails_when_output_dir_is_a_file(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path)
    line = config.read_text().splitlines().index("output_dir: out") + 1
    (tmp_path / "out").write_text("")
    code, out, _ = run(capsys, "validate", str(config))
    assert code == 1
    assert out.splitlines()[0] == (
        f"[FAIL] config               {config}:{line}: output_dir: {tmp_path / 'out'} exists "
        "and is not a directory"
    )
    code, _, err = run(capsys, "train", str(config))
    assert (code, err) == (
        2,
        f"sdft: error: {config}:{line}: output_dir: {tmp_path / 'out'} exists and is not a "
        "directory\n",
    )


def test_max_steps_override_is_bounded(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path)
    code, _, err = run(capsys, "train", str(config), "--max-steps", str(10**23))
    assert (code, err) == (
        2,
        f"sdft: error: --max-steps must be <= 10000000, got {10**23}\n",
    )


def _metrics_run(root: Path, rows: list[str]) -> Path:
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(row + "\n" for row in rows))
    return root


def test_compare_rejects_repeated_labels(tmp_path: Path, capsys) -> None:
    row = '{"step": 1, "split": "train", "metrics": {"train/mean_loss": 1.0}}'
    a = _metrics_run(tmp_path / "a" / "run", [row])
    b = _metrics_run(tmp_path / "b" / "run", [row])
    code, _, err = run(capsys, "compare", str(a), str(b), "--labels", "x", "x")
    assert (code, err) == (
        2,
        "sdft: error: each run needs its own label; --labels repeat 'x'\n",
    )
    code, _, err = run(capsys, "compare", str(a), str(b))
    assert (code, err) == (
        2,
        "sdft: error: each run needs its own label; the run directory names (pass --labels) "
        "repeat 'run'\n",
    )
    code, out, _ = run(capsys, "compare", str(a), str(b), "--labels", "x", "y")
    assert code == 0 and "| x | 1 |" in out and "| y | 1 |" in out


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"step": 1, "metrics": {}}', "2: missing key 'split'"),
        ("42", "2: expected a JSON object, got integer"),
        ('{"step": "1", "split": "train", "metrics": {}}', "2: 'step' must be integer, got string"),
    ],
)
def test_compare_names_file_and_line_of_a_malformed_metrics_row(
    tmp_path: Path, capsys, row: str, message: str
) -> None:
    good = '{"step": 1, "split": "train", "metrics": {"train/mean_loss": 1.0}}'
    a = _metrics_run(tmp_path / "a", [good, row])
    code, _, err = run(capsys, "compare", str(a))
    assert (code, err) == (2, f"sdft: error: {a / 'metrics.jsonl'}:{message}\n")
