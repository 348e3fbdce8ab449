"""``sdft continual EXPERIMENT.yaml`` and ``sdft validate EXPERIMENT.yaml [--deep]``.

Validation runs every check that needs no training: the experiment file and every run config it
expands to, every stage's training data, every benchmark, the backend; ``--deep`` adds the model,
its tokenizer, the rendered prompts and, on the local backend, the teacher check of every stage
(:mod:`sdft.teacher_check`). Checks are ``(name, status, detail)`` with status ``ok``, ``FAIL``,
``warn`` or ``skip``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

CheckRow = tuple[str, str, str]


def experiment_checks(path: Path, *, deep: bool, data_root: Path | None = None) -> list[CheckRow]:
    """Every offline check of an experiment file (see the module doc)."""
    from sdft.continual.scoring import load_tasks
    from sdft.continual.spec import load_experiment
    from sdft.datasets import load_examples
    from sdft.drift import load_drift_prompts

    try:
        experiment = load_experiment(path, data_root=data_root)
    except (ValueError, FileNotFoundError) as exc:
        return [("experiment", "FAIL", str(exc))]
    spec = experiment.spec
    rows: list[CheckRow] = [
        (
            "experiment",
            "ok",
            f"{len(spec.methods)} methods × {len(spec.learning_rates)} learning rates × "
            f"{len(spec.seeds)} seeds = {len(experiment.chains)} chains of {len(spec.stages)} "
            f"stages ({len(experiment.runs)} runs, every run config valid); outputs in "
            f"{experiment.output_dir}",
        )
    ]
    examples_by_stage: dict[int, list[Any]] = {}
    first_chain = experiment.chains[0]
    for run in experiment.stage_runs(first_chain):
        data = run.config.data
        try:
            examples = load_examples(
                data.path, source_kind=data.source_kind, fields=data.fields, split=data.split
            )
            examples_by_stage[run.index] = examples
            rows.append(
                (
                    f"stage {run.index} data",
                    "ok",
                    f"{run.stage.name}: {len(examples)} examples ({data.source_kind}) from "
                    f"{data.path}",
                )
            )
        except (ValueError, FileNotFoundError, TypeError, ImportError) as exc:
            rows.append((f"stage {run.index} data", "FAIL", f"{run.stage.name}: {exc}"))
    for benchmark in experiment.benchmarks:
        try:
            if benchmark.kind == "drift":
                prompts = load_drift_prompts(benchmark.path, limit=benchmark.limit)
                detail = f"drift, {len(prompts)} prompts, {', '.join(benchmark.metric_names)}"
            else:
                tasks = load_tasks(benchmark)
                detail = f"{len(tasks)} tasks, {', '.join(benchmark.metric_names)}"
            owner = experiment.stage_of(benchmark.name)
            when = f"stage {owner}'s task" if owner else "scored after every stage"
            rows.append(
                (f"benchmark {benchmark.name}", "ok", f"{detail} ({when}; {benchmark.path})")
            )
        except (ValueError, FileNotFoundError, TypeError, KeyError, ImportError) as exc:
            rows.append((f"benchmark {benchmark.name}", "FAIL", str(exc)))
    rows.append(_backend_row(experiment))
    if deep:
        rows.extend(_deep_rows(experiment, examples_by_stage))
    else:
        rows.append(("model", "skip", "pass --deep to resolve the model and check the teacher"))
    return rows


def _backend_row(experiment: Any) -> CheckRow:
    config = experiment.base_config
    if config.backend.kind == "tinker":
        from sdft.backends.remote import API_KEY_ENV

        if not os.environ.get(API_KEY_ENV, "").strip():
            return (
                "backend",
                "warn",
                f"tinker: {API_KEY_ENV} is not set (needed to run, not to validate)",
            )
        return ("backend", "ok", f"tinker; {API_KEY_ENV} is set (value not shown)")
    return (
        "backend",
        "ok",
        f"local, device {config.backend.device}; checkpoints in "
        f"{experiment.output_dir / 'checkpoints'}",
    )


def _deep_rows(experiment: Any, examples_by_stage: dict[int, list[Any]]) -> list[CheckRow]:
    from sdft.models import ModelNotFoundError, load_tokenizer, resolve_model
    from sdft.rollouts import question_prompts

    config = experiment.base_config
    name = config.model.name
    try:
        resolved = resolve_model(name)
    except ModelNotFoundError as exc:
        if config.backend.kind == "tinker":
            return [
                (
                    "model",
                    "warn",
                    f"{name} is not available offline; Tinker serves it (prompts and the teacher "
                    "check need its tokenizer and are skipped)",
                )
            ]
        return [("model", "FAIL", str(exc))]
    except (ValueError, OSError) as exc:
        return [("model", "FAIL", f"{name}: {exc}")]
    rows: list[CheckRow] = [("model", "ok", resolved.describe())]
    try:
        tokenizer = load_tokenizer(name)
    except (ValueError, OSError) as exc:
        return [*rows, ("tokenizer", "FAIL", f"{name}: {exc}")]
    for run in experiment.stage_runs(experiment.chains[0]):
        examples = examples_by_stage.get(run.index)
        if not examples:
            continue
        params = run.config.params
        first = examples[0]
        try:
            prompts = question_prompts(first, params, tokenizer)
            student, teacher = prompts.student, prompts.teacher
            room = params.max_context_length - teacher.length
            status = "ok" if room >= params.max_tokens else ("warn" if room > 0 else "FAIL")
            detail = (
                f"student prompt {student.length} tokens, teacher prompt {teacher.length} tokens"
            )
            if status != "ok":
                detail += (
                    f"; only {max(room, 0)} of max_tokens {params.max_tokens} fit "
                    f"max_context_length {params.max_context_length}"
                )
            rows.append((f"stage {run.index} prompts", status, detail))
        except (ValueError, TypeError, KeyError) as exc:
            rows.append((f"stage {run.index} prompts", "FAIL", str(exc)))
    if config.backend.kind != "local":
        rows.append(
            ("teacher check", "skip", "needs the Tinker service; run `sdft continual` to see it")
        )
        return rows
    rows.extend(asyncio.run(_teacher_rows(experiment, examples_by_stage)))
    return rows


async def _teacher_rows(experiment: Any, examples_by_stage: dict[int, list[Any]]) -> list[CheckRow]:
    import tempfile

    from sdft.backends.local import LocalServiceClient
    from sdft.teacher_check import check_base_model

    backend = experiment.base_config.backend
    scratch = tempfile.TemporaryDirectory(prefix="sdft-teacher-check-")
    service = LocalServiceClient(
        checkpoint_root=scratch.name, device=backend.device, dtype=backend.dtype
    )
    rows: list[CheckRow] = []
    try:
        for run in experiment.stage_runs(experiment.chains[0]):
            examples = examples_by_stage.get(run.index)
            if not examples:
                continue
            started = time.perf_counter()
            check = await check_base_model(
                service,
                experiment.base_config,
                examples,
                verifier=run.stage.teacher_check_verifier,
                count=experiment.spec.teacher_check_examples,
                params=run.config.params,
            )
            detail = f"{check.summary_line()} ({time.perf_counter() - started:.0f} s; base model)"
            rows.append((f"stage {run.index} teacher", "warn" if check.warnings else "ok", detail))
            for warning in check.warnings:
                rows.append((f"stage {run.index} teacher", "warn", warning))
    finally:
        service.close()
        scratch.cleanup()
    return rows


def format_row(row: CheckRow) -> str:
    name, status, detail = row
    return f"[{status:<4}] {name:<20} {detail}"


def add_parser(commands: Any) -> None:
    """Register ``sdft continual`` on the CLI's sub-command parsers."""
    parser = commands.add_parser(
        "continual",
        help="run (or resume) a continual-learning experiment",
        description="Train every (method, lr, seed) chain through the stages, score every "
        "benchmark on the base model and after every stage, write results.jsonl, results.md, "
        "tradeoff.png and stages.png. Running it again resumes.",
    )
    parser.add_argument("experiment", help="experiment YAML file")
    parser.add_argument(
        "--parallel", type=int, default=1, help="chains trained concurrently (default 1)"
    )
    parser.add_argument(
        "--data-root", help="resolve the experiment's relative data and benchmark paths here"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: rebuild results.jsonl, results.md and the plots from the scores on "
        "disk (e.g. of an experiment still running or stopped part-way)",
    )
    parser.set_defaults(handler=cmd_continual)


def cmd_continual(args: argparse.Namespace) -> int:
    from sdft.continual.runner import run_experiment
    from sdft.continual.spec import load_experiment

    data_root = Path(args.data_root) if getattr(args, "data_root", None) else None
    experiment = load_experiment(args.experiment, data_root=data_root)
    if getattr(args, "report_only", False):
        from sdft.continual.report import scored_stage_runs
        from sdft.continual.runner import result_rows, write_outputs

        written = write_outputs(experiment)
        rows = result_rows(experiment)
        base = 1 if any(row["stage"] == 0 for row in rows) else 0
        scored = len(scored_stage_runs(rows)) + base
        print(f"Scored:    {scored} of {len(experiment.runs) + 1} (base model included)")
        for path in written[1:]:
            print(f"Output:    {path}")
        return 0
    started = time.perf_counter()
    result = run_experiment(experiment, parallel=args.parallel)
    elapsed = time.perf_counter() - started
    print(f"Runs:      {len(result.trained)} trained, {len(result.skipped)} already done")
    if result.elsewhere:
        print(
            f"Elsewhere: {', '.join(result.elsewhere)} run by other processes; the last process "
            "to finish writes the complete results and reports"
        )
    print(f"Time:      {elapsed:.0f} s")
    for name in ("results.jsonl", "results.md", "tradeoff.png", "stages.png"):
        path = result.output_dir / name
        if path.exists():
            print(f"Output:    {path}")
    return 0


def cmd_validate_experiment(path: Path, *, deep: bool, data_root: Path | None = None) -> int:
    rows = experiment_checks(path, deep=deep, data_root=data_root)
    from sdft.redact import redact

    for row in rows:
        print(redact(format_row(row)))
    failed = [row for row in rows if row[1] == "FAIL"]
    if failed:
        print(f"{len(failed)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


__all__ = ["add_parser", "cmd_continual", "cmd_validate_experiment", "experiment_checks"]
