"""The run directory (``output_dir``): whether a run may start, continue or replace what is
there, and the run's result as read back from its log."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdft import checkpoints as ckpt
from sdft.config import Config, training_differences, write_resolved_config
from sdft.metricrows import last_train_metrics, latest_benchmark_values
from sdft.runfiles import RESOLVED_CONFIG_NAME, RUN_OUTPUTS, existing_outputs
from sdft.runlog import RunLog


class RunDirectoryError(ValueError):
    """``output_dir`` already holds a run and neither ``--resume`` nor ``--overwrite`` was given,
    or a resumed run's config differs from the one it started with."""


@dataclass
class RunResult:
    status: str
    steps_completed: int
    max_steps: int
    output_dir: Path
    train_metrics: dict[str, Any] = field(default_factory=dict)
    benchmark_metrics: dict[str, float] = field(default_factory=dict)


def remove_outputs(output_dir: str | Path) -> None:
    """Delete the outputs of a previous run (and only those) from ``output_dir``."""
    root = Path(output_dir)
    for name in RUN_OUTPUTS:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def prepare_output_dir(
    config: Config, *, resume: bool, overwrite: bool
) -> ckpt.CheckpointRecord | None:
    """Check ``output_dir`` against the requested mode; returns the checkpoint to resume from.

    Without ``resume`` an existing run is refused unless ``overwrite`` (which deletes exactly the
    files a run writes). With ``resume`` the config must match the one the run started with
    (``max_steps``, ``save_every``, benchmarks and the device may change), and metrics rows after
    the last checkpoint are dropped because those steps will run again.
    """
    output_dir = config.output_dir
    present = existing_outputs(output_dir)
    if resume and overwrite:
        raise RunDirectoryError("--resume and --overwrite exclude each other")
    if not resume:
        if present and not overwrite:
            raise RunDirectoryError(
                f"output_dir {output_dir} already holds a run ({', '.join(present)}); pass "
                "--resume to continue it or --overwrite to delete it and start over"
            )
        if present:
            remove_outputs(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(config)
        return None

    resolved = output_dir / RESOLVED_CONFIG_NAME
    if resolved.is_file():
        previous = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
        changed = training_differences(previous, config.resolved_dict())
        if changed:
            raise RunDirectoryError(
                f"cannot resume {output_dir}: the config changed since the run started "
                f"({', '.join(changed)}); start a new run (another output_dir or --overwrite)"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    record = ckpt.last_checkpoint(output_dir)
    runlog = RunLog(output_dir)
    runlog.keep_steps_up_to(record.step if record is not None else -1)
    write_resolved_config(config)
    return record


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
