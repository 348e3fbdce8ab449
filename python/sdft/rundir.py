"""The run directory (``output_dir``): whether a run may start, continue or replace what is
there, and the run's result as read back from its log.

Rules:

- a new run refuses a directory that holds a run, unless ``--overwrite``;
- ``--overwrite`` deletes only what a run creates (:func:`run_outputs`): never through a
  symlink (a link is removed, its target is left alone; a symlinked ``checkpoints/`` is kept as
  it is, with everything behind it), never ``checkpoints/`` when ``backend.checkpoint_root``
  points elsewhere; every entry is first moved aside, so a failure leaves the run as it was;
- ``--resume`` needs ``config.resolved.yaml`` to compare the config with (only ``max_steps``,
  ``save_every``, the benchmarks, ``output_dir``, the device and ``base_url`` may change, and
  ``max_steps`` only under a constant ``lr_schedule``: a decaying schedule spans the run's
  ``max_steps``), drops metrics rows after the last checkpoint (those steps run again), and
  checks that checkpoint against the config (:func:`check_checkpoint_matches`);
- paths read from the run's own files (``checkpoints.jsonl``) stay inside the run
  (:func:`check_run_path`).

Checking (:func:`plan_output_dir`) writes nothing; :func:`apply_plan` then changes the directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdft import checkpoints as ckpt
from sdft.config import Config, training_differences, write_resolved_config
from sdft.metricrows import last_train_metrics, latest_benchmark_values
from sdft.runfiles import (
    CHECKPOINT_INDEX_NAME,
    CHECKPOINTS_DIR,
    EVAL_DIR,
    METRICS_NAME,
    PLOT_NAME,
    PREDICTIONS_DIR,
    RESOLVED_CONFIG_NAME,
    SUMMARY_NAME,
)
from sdft.runlog import RunLog


class RunDirectoryError(ValueError):
    """``output_dir`` cannot be used as asked: it already holds a run and neither ``--resume``
    nor ``--overwrite`` was given, a resumed run's config or checkpoint differs from the one it
    started with, or the run's files point outside it."""


@dataclass
class RunResult:
    status: str
    steps_completed: int
    max_steps: int
    output_dir: Path
    train_metrics: dict[str, Any] = field(default_factory=dict)
    benchmark_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunDirectoryPlan:
    """What :func:`apply_plan` will do to ``output_dir`` (decided without writing anything)."""

    config: Config
    resume_from: ckpt.CheckpointRecord | None = None
    remove: list[Path] = field(default_factory=list)
    keep_steps_up_to: int | None = None


def owns_checkpoints_dir(config: Config) -> bool:
    """``output_dir/checkpoints`` is the run's own only when it is the checkpoint root."""
    own = config.output_dir / CHECKPOINTS_DIR
    return Path(os.path.abspath(config.checkpoint_root)) == Path(os.path.abspath(own))


# Everything a run creates in output_dir except checkpoints/ (the run's only when it is the root).
_RUN_ENTRIES = (
    METRICS_NAME,
    SUMMARY_NAME,
    PLOT_NAME,
    PREDICTIONS_DIR,
    CHECKPOINT_INDEX_NAME,
    RESOLVED_CONFIG_NAME,
    EVAL_DIR,
)


def run_outputs(config: Config) -> list[str]:
    """The names in ``output_dir`` that this run creates (and ``--overwrite`` may delete)."""
    names = list(_RUN_ENTRIES)
    if owns_checkpoints_dir(config):
        names.insert(4, CHECKPOINTS_DIR)
    return names


def present_outputs(config: Config) -> list[str]:
    """The run outputs present in ``output_dir`` that mark it as holding a run (``eval/`` alone,
    e.g. a base-model evaluation made before training, does not)."""
    root = config.output_dir
    return [
        name for name in run_outputs(config) if name != EVAL_DIR and os.path.lexists(root / name)
    ]


def removable_outputs(config: Config) -> list[Path]:
    """What ``--overwrite`` deletes: the run outputs present, except a symlinked checkpoint root
    (checkpoints the user keeps elsewhere on purpose)."""
    root = config.output_dir
    removable = []
    for name in run_outputs(config):
        target = root / name
        if not os.path.lexists(target):
            continue
        if name == CHECKPOINTS_DIR and target.is_symlink():
            continue
        removable.append(target)
    return removable


def remove_outputs(output_dir: str | Path, paths: list[Path] | None = None) -> None:
    """Delete ``paths`` (default: every run output in ``output_dir``) all or nothing.

    Each entry is renamed into a fresh hidden directory inside ``output_dir`` first (a rename
    never follows a symlink), and only then is that directory deleted; if a rename fails, the
    entries already moved go back and the error names the entry."""
    root = Path(output_dir)
    if paths is None:
        names = [*_RUN_ENTRIES, CHECKPOINTS_DIR]
        paths = [root / name for name in names if os.path.lexists(root / name)]
    if not paths:
        return
    trash = Path(tempfile.mkdtemp(prefix=".sdft-overwrite-", dir=root))
    moved: list[tuple[Path, Path]] = []
    try:
        for path in paths:
            if path.parent != root:
                raise RunDirectoryError(f"{path} is not an entry of {root}")
            aside = trash / path.name
            os.rename(path, aside)
            moved.append((path, aside))
    except OSError as exc:
        for path, aside in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(aside, path)
        with contextlib.suppress(OSError):
            trash.rmdir()
        raise RunDirectoryError(
            f"cannot remove {exc.filename or root} for --overwrite ({exc.strerror}); "
            "nothing was deleted"
        ) from exc
    shutil.rmtree(trash)


def check_run_path(config: Config, path: Any, what: str) -> str:
    """A checkpoint path read from the run's files: a service URI (``local://``, ``tinker://``)
    without ``.``/``..`` segments, or an absolute filesystem path inside the run's checkpoint
    root (symlinks resolved); :class:`RunDirectoryError` otherwise."""
    if not isinstance(path, str) or not path:
        raise RunDirectoryError(f"{what} must be a non-empty string, got {path!r}")
    if "://" in path:
        if any(part in ("..", ".") for part in path.split("://", 1)[1].split("/")):
            raise RunDirectoryError(f"{what} {path!r} has '.' or '..' segments")
        return path
    root = Path(os.path.realpath(config.checkpoint_root))
    if not os.path.isabs(path) or not Path(os.path.realpath(path)).is_relative_to(root):
        raise RunDirectoryError(
            f"{what} {path!r} is not a service path or an absolute path inside the run's "
            f"checkpoint root {config.checkpoint_root}"
        )
    return path


def _check_record(config: Config, record: ckpt.CheckpointRecord) -> None:
    where = f"{ckpt.index_path(config.output_dir)} (checkpoint {record.name})"
    for key, value in (
        ("state_path", record.state_path),
        ("sampler_path", record.sampler_path),
        (ckpt.TEACHER_PATH_KEY, record.extra.get(ckpt.TEACHER_PATH_KEY)),
    ):
        if value is not None:
            check_run_path(config, value, f"{where}: {key}")


def _previous_config(config: Config) -> dict[str, Any] | None:
    resolved = config.output_dir / RESOLVED_CONFIG_NAME
    if not resolved.is_file():
        return None
    try:
        previous = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunDirectoryError(f"cannot resume: {resolved} is unreadable ({exc})") from exc
    if not isinstance(previous, dict):
        raise RunDirectoryError(f"cannot resume: {resolved} is not a config mapping")
    return previous


def _check_resumable(config: Config, present: list[str]) -> None:
    output_dir = config.output_dir
    previous = _previous_config(config)
    if previous is None:
        if present:
            raise RunDirectoryError(
                f"cannot resume {output_dir}: {RESOLVED_CONFIG_NAME} is missing, so the config "
                "the run started with cannot be compared with this one; restore it, or start a "
                "new run (another output_dir or --overwrite)"
            )
        return
    changed = training_differences(previous, config.resolved_dict())
    if changed:
        raise RunDirectoryError(
            f"cannot resume {output_dir}: the config changed since the run started "
            f"({', '.join(changed)}); start a new run (another output_dir or --overwrite)"
        )
    params = config.params
    started_with = previous.get("algorithm", {}).get("params", {}).get("max_steps")
    if params.lr_schedule != "constant" and started_with != params.max_steps:
        raise RunDirectoryError(
            f"cannot resume {output_dir} with max_steps {params.max_steps}: lr_schedule "
            f"{params.lr_schedule} decays over the max_steps the run started with "
            f"({started_with}), and changing it would re-base the learning rate mid-run; keep "
            f"max_steps {started_with} (only a constant schedule may change max_steps)"
        )


def plan_output_dir(config: Config, *, resume: bool, overwrite: bool) -> RunDirectoryPlan:
    """Check ``output_dir`` against the requested mode without changing anything."""
    output_dir = config.output_dir
    if resume and overwrite:
        raise RunDirectoryError("--resume and --overwrite exclude each other")
    present = present_outputs(config)
    if not resume:
        if present and not overwrite:
            raise RunDirectoryError(
                f"output_dir {output_dir} already holds a run ({', '.join(present)}); pass "
                "--resume to continue it or --overwrite to delete it and start over"
            )
        return RunDirectoryPlan(config, remove=removable_outputs(config) if overwrite else [])
    _check_resumable(config, present)
    record = ckpt.last_checkpoint(output_dir)
    if record is not None:
        _check_record(config, record)
    return RunDirectoryPlan(
        config, resume_from=record, keep_steps_up_to=record.step if record is not None else -1
    )


def apply_plan(plan: RunDirectoryPlan) -> ckpt.CheckpointRecord | None:
    """Make ``output_dir`` ready as planned; returns the checkpoint to resume from."""
    config = plan.config
    if plan.remove:
        remove_outputs(config.output_dir, plan.remove)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    if plan.keep_steps_up_to is not None:
        RunLog(config.output_dir).keep_steps_up_to(plan.keep_steps_up_to)
    write_resolved_config(config)
    return plan.resume_from


def prepare_output_dir(
    config: Config, *, resume: bool, overwrite: bool
) -> ckpt.CheckpointRecord | None:
    """Check ``output_dir`` against the requested mode, then prepare it (see the module rules);
    returns the checkpoint to resume from."""
    return apply_plan(plan_output_dir(config, resume=resume, overwrite=overwrite))


def check_checkpoint_matches(config: Config, info: Any, record: ckpt.CheckpointRecord) -> None:
    """The checkpoint a run resumes from must be the model the config trains: same base model,
    full or LoRA, same LoRA rank, an Adam optimizer. ``info`` is the training client's
    ``get_info()`` (Tinker's ``GetInfoResponse``; the local backend reads the checkpoint's
    metadata)."""
    params = config.params
    problems = []
    model_data = getattr(info, "model_data", None)
    model = getattr(model_data, "model_name", None) or getattr(info, "model_name", None)
    if model is not None and model != config.model.name:
        problems.append(f"it was trained from {model!r}, the config trains {config.model.name!r}")
    is_lora = getattr(info, "is_lora", None)
    if is_lora is not None and bool(is_lora) == params.full_finetune:
        held = "LoRA adapters" if is_lora else "fully fine-tuned weights"
        wanted = "full fine-tuning" if params.full_finetune else f"LoRA rank {params.lora_rank}"
        problems.append(f"it holds {held}, the config asks for {wanted}")
    rank = getattr(info, "lora_rank", None)
    if is_lora and not params.full_finetune and rank is not None and rank != params.lora_rank:
        problems.append(f"its LoRA rank is {rank}, the config says {params.lora_rank}")
    optimizer = getattr(getattr(info, "optimizer_config", None), "type", "adamw")
    if optimizer != "adamw":
        problems.append(f"its optimizer is {optimizer!r}, sdft trains with adamw")
    if problems:
        raise RunDirectoryError(
            f"cannot resume {config.output_dir} from checkpoint {record.name} "
            f"({record.state_path}): {'; '.join(problems)}"
        )


def result_from_log(config: Config, status: str, steps_completed: int) -> RunResult:
    """A :class:`RunResult` rebuilt from ``metrics.jsonl`` (last train row, latest benchmark values)."""
    rows = RunLog(config.output_dir).read_metrics()
    return RunResult(
        status=status,
        steps_completed=steps_completed,
        max_steps=config.params.max_steps,
        output_dir=config.output_dir,
        train_metrics=last_train_metrics(rows),
        benchmark_metrics=latest_benchmark_values(rows),
    )
