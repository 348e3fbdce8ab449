"""The ``sdft`` command: ``train``, ``validate``, ``eval`` and ``compare``.

Errors print one clear message (no traceback) and exit with status 2; ``validate`` exits with
status 1 when a check fails. ``SDFT_DEBUG=1`` (or ``--debug``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdft.redact import install_log_redaction, redact

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# --- validate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "FAIL", "warn" or "skip"
    detail: str

    def line(self) -> str:
        return f"[{self.status:<4}] {self.name:<20} {self.detail}"


def run_checks(config_path: Path, *, deep: bool) -> list[Check]:
    """Every offline check of a config: schema, files, data rows, benchmarks, templates, backend,
    output directory; with ``deep`` also the model's tokenizer and every rendered prompt.

    A check that fails with any error reports it and the checklist goes on."""
    from sdft.config import load_config

    try:
        config = load_config(config_path)
    except Exception as exc:
        return [Check("config", "FAIL", _describe_error(exc))]
    checks = [Check("config", "ok", f"{config_path} (schema valid)")]

    located: list[tuple[str, Any]] = []
    try:
        from sdft.datasets import load_located_examples

        data = config.data
        located = load_located_examples(
            data.path, source_kind=data.source_kind, fields=data.fields, split=data.split
        )
        checks.append(
            Check("data", "ok", f"{len(located)} examples ({data.source_kind}) from {data.path}")
        )
    except Exception as exc:
        checks.append(Check("data", "FAIL", _describe_error(exc)))

    if located:
        checks.append(_guarded("templates", lambda: _template_check(config, located)))
    for entry in config.metadata.benchmark:
        checks.append(
            _guarded(f"benchmark {entry.name}", functools.partial(_benchmark_check, entry))
        )
    if not config.metadata.benchmark:
        checks.append(Check("benchmarks", "warn", "none configured (metadata.benchmark)"))

    checks.append(_guarded("backend", lambda: _backend_check(config)))
    checks.append(_guarded("output_dir", lambda: _output_check(config)))

    if deep:
        try:
            checks.extend(_deep_checks(config, located))
        except Exception as exc:
            checks.append(Check("prompts", "FAIL", _describe_error(exc)))
    else:
        checks.append(Check("model", "skip", "pass --deep to resolve the model and render prompts"))
    return checks


def _describe_error(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as exc:
        return Check(name, "FAIL", _describe_error(exc))


def _template_check(config, located: list[tuple[str, Any]]) -> Check:
    params = config.params
    for where, example in located:
        try:
            params.user_template.format(question=example.question)
            if config.algorithm.kind == "sdft":
                params.demo_template.format(
                    question=example.question, golden_answer=example.golden_answer
                )
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            return Check("templates", "FAIL", f"{where} cannot render the templates: {exc}")
    return Check("templates", "ok", f"render with all {len(located)} examples")


def _benchmark_check(entry) -> Check:
    from sdft.drift import load_drift_prompts
    from sdft.evals import load_benchmark

    if entry.kind == "drift":
        prompts = load_drift_prompts(entry.path, limit=entry.limit)
        size = f"drift from the base model, {len(prompts)} prompts"
    else:
        size = f"{len(load_benchmark(entry.path, name=entry.name))} tasks"
    when = f"every {entry.run_every} steps" if entry.run_every else "after training"
    metrics = ", ".join(entry.metrics)
    return Check(f"benchmark {entry.name}", "ok", f"{size}, {metrics}, {when} ({entry.path})")


def _backend_check(config) -> Check:
    from sdft.backends.remote import API_KEY_ENV, credential_source, resolve_base_url

    if config.backend.kind == "tinker":
        source = credential_source()
        if source is None:
            return Check("backend", "FAIL", f"tinker: {API_KEY_ENV} is not set")
        found = f"{API_KEY_ENV} is set" if source == API_KEY_ENV else f"credential from {source}"
        return Check(
            "backend",
            "ok",
            f"tinker at {resolve_base_url(config.backend.base_url)}; {found} (value not shown)",
        )
    device = config.backend.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return Check(
                "backend", "FAIL", f"local: device {device} requested but CUDA is not available"
            )
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            return Check("backend", "FAIL", "local: device mps requested but MPS is not available")
    return Check(
        "backend",
        "ok",
        f"local, device {device}, dtype {config.backend.dtype}, checkpoints in "
        f"{config.checkpoint_root}",
    )


def _output_check(config) -> Check:
    from sdft.checkpoints import last_checkpoint
    from sdft.rundir import present_outputs

    output_dir = config.output_dir
    # the same test `sdft train` applies: checkpoints/ counts only when it is the checkpoint root
    present = present_outputs(config)
    if not present:
        parent = output_dir
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            return Check(
                "output_dir", "FAIL", f"{output_dir} cannot be created ({parent} is read-only)"
            )
        return Check("output_dir", "ok", f"{output_dir} (new run)")
    try:
        record = last_checkpoint(output_dir)
    except ValueError as exc:
        return Check("output_dir", "FAIL", str(exc))
    where = f"last checkpoint at step {record.step}" if record else "no checkpoint yet"
    return Check(
        "output_dir",
        "warn",
        f"{output_dir} already holds a run ({where}): `sdft train --resume` continues it, "
        "`--overwrite` starts over",
    )


#: Training examples ``sdft train`` checks the teacher on at step 0 of an SDFT run (``summary.md``).
DEFAULT_TEACHER_CHECK = 8

#: How many problem rows ``validate --deep`` lists one by one before summarizing the rest.
MAX_ROWS_REPORTED = 20


def _deep_checks(config, located: list[tuple[str, Any]]) -> list[Check]:
    """Resolve the model's tokenizer (no weights are loaded) and render and length-check the
    student and teacher prompts of every example, reporting each problem row by its location."""
    from sdft.models import ModelNotFoundError, load_tokenizer, resolve_model

    checks: list[Check] = []
    name = config.model.name
    try:
        resolved = resolve_model(name)
    except ModelNotFoundError as exc:
        if config.backend.kind == "tinker":
            return [
                Check(
                    "model",
                    "warn",
                    f"{name} is not available offline; Tinker serves it, and the SDK fetches its "
                    "tokenizer from the Hugging Face hub at run time",
                )
            ]
        return [Check("model", "FAIL", str(exc))]
    except (ValueError, OSError) as exc:
        return [Check("model", "FAIL", f"{name}: {exc}")]
    checks.append(Check("model", "ok", resolved.describe()))
    try:
        tokenizer = load_tokenizer(name)
    except (ValueError, OSError) as exc:
        return [*checks, Check("tokenizer", "FAIL", f"{name}: {exc}")]
    checks.append(Check("tokenizer", "ok", f"{type(tokenizer).__name__}, {len(tokenizer)} tokens"))
    if located:
        checks.extend(_prompt_checks(config, tokenizer, located))
    return checks


def _prompt_checks(config, tokenizer: Any, located: list[tuple[str, Any]]) -> list[Check]:
    from sdft.rollouts import student_prompt_of, teacher_prompt_of

    params = config.params
    sdft_run = config.algorithm.kind == "sdft"
    problems: list[Check] = []
    student_lengths: list[int] = []
    teacher_lengths: list[int] = []
    for where, example in located:
        try:
            student = student_prompt_of(example, params, tokenizer).length
            teacher = teacher_prompt_of(example, params, tokenizer).length if sdft_run else None
        except Exception as exc:
            problems.append(
                Check("prompts", "FAIL", f"{where} cannot render: {_describe_error(exc)}")
            )
            continue
        student_lengths.append(student)
        longest = student
        label = f"student prompt {student} tokens"
        if teacher is not None:
            teacher_lengths.append(teacher)
            longest = max(student, teacher)
            label = f"teacher prompt {teacher} tokens"
        room = params.max_context_length - longest
        if room < params.max_tokens:
            problems.append(
                Check(
                    "prompts",
                    "warn" if room > 0 else "FAIL",
                    f"{where} {label}: only {max(room, 0)} of max_tokens {params.max_tokens} "
                    f"completion tokens fit max_context_length {params.max_context_length}"
                    + (" (completions get truncated)" if room > 0 else ""),
                )
            )
    shown = problems[:MAX_ROWS_REPORTED]
    failed = sum(check.status == "FAIL" for check in problems)
    warned = len(problems) - failed
    if len(problems) > len(shown):
        shown.append(
            Check(
                "prompts",
                "FAIL" if failed else "warn",
                f"... {len(problems) - len(shown)} more rows with problems not listed",
            )
        )
    summary = f"{len(located)} examples rendered"
    if student_lengths:
        summary += f"; student prompts {min(student_lengths)}-{max(student_lengths)} tokens"
    if teacher_lengths:
        summary += f", teacher prompts {min(teacher_lengths)}-{max(teacher_lengths)} tokens"
    if problems:
        summary += f"; {failed} rows fail, {warned} rows warn"
        status = "FAIL" if failed else "warn"
    else:
        status = "ok"
    return [*shown, Check("prompts", status, summary)]


# --- commands ---------------------------------------------------------------------------------


def _load(path: str):
    from sdft.config import load_config

    return load_config(path)


def _outputs_line(output_dir: Path) -> str:
    from sdft.runlog import existing_outputs

    return f"{output_dir} ({', '.join(existing_outputs(output_dir))})"


def cmd_train(args: argparse.Namespace) -> int:
    from sdft.loop import train

    if args.teacher_check < 0:
        raise ValueError(f"--teacher-check must be >= 0, got {args.teacher_check}")
    config = _load(args.config)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        from sdft.config import MAX_STEPS

        if args.max_steps > MAX_STEPS:
            raise ValueError(f"--max-steps must be <= {MAX_STEPS}, got {args.max_steps}")
        config.algorithm.params.max_steps = args.max_steps
    result = train(
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        allow_nan=args.allow_nan,
        teacher_check=args.teacher_check,
    )
    print(f"Status:    {result.status}")
    print(f"Steps:     {result.steps_completed}/{result.max_steps}")
    loss = result.train_metrics.get("train/mean_loss")
    if loss is not None:
        print(f"Loss:      train/mean_loss {loss:.4f} (last step)")
    for key, value in sorted(result.benchmark_metrics.items()):
        print(f"Metric:    {key} {value:.4f}")
    print(f"Outputs:   {_outputs_line(result.output_dir)}")
    print(f"Summary:   {result.output_dir / 'summary.md'}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from sdft.continual.spec import is_experiment_file

    if is_experiment_file(args.config):
        from sdft.continual.command import cmd_validate_experiment

        data_root = Path(args.data_root) if args.data_root else None
        return cmd_validate_experiment(Path(args.config), deep=args.deep, data_root=data_root)
    checks = run_checks(Path(args.config), deep=args.deep)
    if args.teacher_check and not any(check.status == "FAIL" for check in checks):
        from sdft.config import load_config
        from sdft.teacher_check import validation_rows

        rows = validation_rows(load_config(args.config), args.teacher_check)
        checks.extend(Check(*row) for row in rows)
    for check in checks:
        print(redact(check.line()))
    failed = [check for check in checks if check.status == "FAIL"]
    if failed:
        print(f"{len(failed)} check(s) failed")
        return EXIT_CHECK_FAILED
    print("all checks passed")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from sdft.loop import evaluate_checkpoint

    config = _load(args.config)
    output = Path(args.output) if args.output else None
    result = evaluate_checkpoint(
        config, checkpoint=args.checkpoint, output=output, progress=not args.no_progress
    )
    print(f"Evaluated: {result.label} (step {result.step})")
    for key, value in sorted(result.metrics.items()):
        print(f"Metric:    {key} {value:.4f}")
    print(f"Outputs:   {_outputs_line(result.output_dir)}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from sdft.plots import write_comparison_plot
    from sdft.runlog import RunLog, comparison_markdown

    labels = args.labels or [Path(run).name for run in args.runs]
    if len(labels) != len(args.runs):
        raise ValueError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        source = "--labels" if args.labels else "the run directory names (pass --labels)"
        raise ValueError(
            f"each run needs its own label; {source} repeat {', '.join(map(repr, repeated))}"
        )
    runs = {}
    for label, run in zip(labels, args.runs, strict=True):
        log = RunLog(run)
        if not log.metrics_path.is_file():
            raise FileNotFoundError(f"no metrics.jsonl in {run}")
        runs[label] = log.read_metrics()
    table = comparison_markdown(runs)
    print(table, end="")
    if args.output:
        from sdft import _atomic

        output = Path(args.output)
        _atomic.write_text(output / "comparison.md", table)
        write_comparison_plot(runs, output / "comparison.png", title=" vs ".join(labels))
        print(f"Outputs:   {output / 'comparison.md'}, {output / 'comparison.png'}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdft", description="Self-Distillation Fine-Tuning: train, validate, evaluate."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train as the config says (or resume)")
    train.add_argument("config", help="YAML config file")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="delete an existing run in output_dir first"
    )
    train.add_argument("--max-steps", type=int, help="override algorithm.params.max_steps")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--allow-nan",
        action="store_true",
        help="keep training after a step with a non-finite loss (default: the run stops, failed)",
    )
    train.add_argument(
        "--teacher-check",
        type=int,
        default=DEFAULT_TEACHER_CHECK,
        metavar="N",
        help="SDFT: at step 0, check the teacher against the student on N training examples "
        f"(a section of summary.md; default {DEFAULT_TEACHER_CHECK}, 0 skips it)",
    )
    train.set_defaults(handler=cmd_train)

    validate = commands.add_parser("validate", help="check a config offline")
    validate.add_argument("config", help="YAML config file")
    validate.add_argument(
        "--deep", action="store_true", help="also resolve the model and render the prompts"
    )
    validate.add_argument(
        "--data-root", help="experiments only: where relative data and benchmark paths resolve"
    )
    validate.add_argument(
        "--teacher-check",
        type=int,
        default=0,
        metavar="N",
        help="run configs: load the model and check the teacher against the student on N "
        "training examples (local backend; experiments check every stage with --deep)",
    )
    validate.set_defaults(handler=cmd_validate)

    from sdft.continual.command import add_parser as add_continual_parser

    add_continual_parser(commands)

    evaluate = commands.add_parser(
        "eval", help="score the benchmarks on the base model or a checkpoint"
    )
    evaluate.add_argument("config", help="YAML config file")
    evaluate.add_argument(
        "--checkpoint",
        help="a checkpoint name from checkpoints.jsonl (e.g. 000024), 'last', or a sampler path",
    )
    evaluate.add_argument("--output", help="directory for predictions and metrics")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=cmd_eval)

    compare = commands.add_parser("compare", help="compare runs: markdown table and plot")
    compare.add_argument("runs", nargs="+", help="output directories of runs")
    compare.add_argument("--labels", nargs="+", help="names for the runs (default: dir names)")
    compare.add_argument("--output", help="write comparison.md and comparison.png here")
    compare.set_defaults(handler=cmd_compare)

    from sdft.serve.cli import add_serve_arguments, cmd_serve

    serve = commands.add_parser(
        "serve", help="serve the local backend over Tinker's HTTP protocol (sdft serve --help)"
    )
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SDFT_DEBUG", "") not in ("", "0")
    from sdft.console import configure_output

    configure_output(debug=debug)
    install_log_redaction()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("sdft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            # The traceback Python would print, minus secrets; 1 is Python's own status for it.
            sys.stderr.write(redact("".join(traceback.format_exception(exc))))
            return 1
        message = redact(str(exc) or type(exc).__name__)
        print(f"sdft: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
