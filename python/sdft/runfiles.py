"""The names of everything a run writes into its ``output_dir`` (the one owner of those names).

A leaf module: it imports nothing from sdft, so every writer and reader of run outputs
(:mod:`sdft.runlog`, :mod:`sdft.checkpoints`, :mod:`sdft.config`, :mod:`sdft.rundir`,
:mod:`sdft.evaluation`, the CLI) can depend on it without depending on each other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.md"
PLOT_NAME = "plot.png"
PREDICTIONS_DIR = "predictions"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_INDEX_NAME = "checkpoints.jsonl"
RESOLVED_CONFIG_NAME = "config.resolved.yaml"
EVAL_DIR = "eval"
EVALUATION_NAME = "evaluation.json"

# The files and directories that mark a directory as holding a training run.
RUN_OUTPUTS = (
    METRICS_NAME,
    SUMMARY_NAME,
    PLOT_NAME,
    PREDICTIONS_DIR,
    CHECKPOINTS_DIR,
    CHECKPOINT_INDEX_NAME,
    RESOLVED_CONFIG_NAME,
)

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


def existing_outputs(output_dir: str | Path) -> list[str]:
    """The run outputs already present in ``output_dir`` (names from :data:`RUN_OUTPUTS`)."""
    root = Path(output_dir)
    return [name for name in RUN_OUTPUTS if os.path.lexists(root / name)]


def is_plain_name(name: object) -> bool:
    """A file name with no directory part: letters, digits, ``.``, ``_``, ``-``, not starting
    with ``.`` or ``-`` (so never ``..``), at most 200 characters."""
    return isinstance(name, str) and bool(_PLAIN_NAME.match(name))


def confined(root: str | Path, name: str, what: str) -> Path:
    """``root / name`` for a plain ``name`` (see :func:`is_plain_name`); ``ValueError`` naming
    ``what`` otherwise, so a name read from a run's files never reaches outside ``root``."""
    if not is_plain_name(name):
        raise ValueError(
            f"{what} {name!r} is not a plain file name (letters, digits, '.', '_', '-'; no '/' "
            "or leading '.'): refusing to use it as a path"
        )
    return Path(root) / name
