"""The ``checkpoints.jsonl`` index of a run (tinker-cookbook's format) and saving checkpoints.

One JSON object per line, appended only after the backend has finished writing the checkpoint:
``{"name": "000008", "batch": 8, "step": 8, "state_path": ..., "sampler_path": ..., "final": false}``.
``batch`` (the cookbook's key) and ``step`` are both the number of optimizer steps completed,
i.e. the 0-based index of the next batch to run. ``state_path`` (weights + optimizer state) is what
``--resume`` loads; ``sampler_path`` is the weights-only copy used for sampling and ``sdft eval``.
Any other keys (``teacher_path`` for a synced teacher, ...) round-trip through ``extra``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdft import _atomic
from sdft.runfiles import CHECKPOINT_INDEX_NAME as INDEX_NAME
from sdft.runfiles import is_plain_name

TEACHER_PATH_KEY = "teacher_path"

_KNOWN_KEYS = {"name", "batch", "step", "state_path", "sampler_path", "final"}


@dataclass(frozen=True)
class CheckpointRecord:
    name: str
    step: int
    state_path: str | None = None
    sampler_path: str | None = None
    final: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "batch": self.step, "step": self.step}
        if self.state_path is not None:
            row["state_path"] = self.state_path
        if self.sampler_path is not None:
            row["sampler_path"] = self.sampler_path
        row["final"] = self.final
        row.update(self.extra)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any], where: str) -> CheckpointRecord:
        if not isinstance(row.get("name"), str):
            raise ValueError(f"{where}: checkpoint row has no string 'name'")
        if not is_plain_name(row["name"]):
            # The name becomes a path (``eval/<name>``): never let it leave the run directory.
            raise ValueError(
                f"{where}: checkpoint name {row['name']!r} is not a plain name (letters, digits, "
                "'.', '_', '-'; no '/' or leading '.')"
            )
        for key in ("state_path", "sampler_path", TEACHER_PATH_KEY):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise ValueError(f"{where}: checkpoint {key} must be a string, got {row[key]!r}")
        step = row.get("step", row.get("batch"))
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{where}: checkpoint row needs a non-negative integer 'batch'")
        return cls(
            name=row["name"],
            step=step,
            state_path=row.get("state_path"),
            sampler_path=row.get("sampler_path"),
            final=bool(row.get("final", False)),
            extra={key: value for key, value in row.items() if key not in _KNOWN_KEYS},
        )


def index_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / INDEX_NAME


def read_checkpoints(output_dir: str | Path) -> list[CheckpointRecord]:
    """All checkpoint rows of a run, oldest first (a torn last line is ignored)."""
    path = index_path(output_dir)
    return [
        CheckpointRecord.from_row(row, f"{path}:{number}")
        for number, row in _atomic.read_jsonl_lines(path)
    ]


def last_checkpoint(
    output_dir: str | Path, required_key: str = "state_path"
) -> CheckpointRecord | None:
    """The newest checkpoint that has ``required_key`` (``state_path`` for resuming)."""
    for record in reversed(read_checkpoints(output_dir)):
        if getattr(record, required_key, None) or record.extra.get(required_key):
            return record
    return None


def find_checkpoint(output_dir: str | Path, reference: str) -> CheckpointRecord | None:
    """The checkpoint named ``reference`` (``"last"``, a name like ``000008`` or a saved path)."""
    records = read_checkpoints(output_dir)
    if reference == "last":
        return records[-1] if records else None
    for record in reversed(records):
        if reference in (record.name, record.state_path, record.sampler_path):
            return record
    return None


def append_checkpoint(output_dir: str | Path, record: CheckpointRecord) -> None:
    _atomic.append_line(index_path(output_dir), json.dumps(record.to_row(), sort_keys=False))


def checkpoint_name(step: int) -> str:
    return f"{step:06d}"


async def save_checkpoint(
    training_client: Any,
    output_dir: str | Path,
    step: int,
    *,
    final: bool = False,
    extra: dict[str, Any] | None = None,
) -> CheckpointRecord:
    """Save weights + optimizer state and sampler weights concurrently, then index them.

    The index row is appended only after both saves have completed, so a kill during a save
    leaves the previous checkpoint as the last one.
    """
    name = checkpoint_name(step)
    state_future = training_client.save_state(name)
    sampler_future = training_client.save_weights_for_sampler(name)
    state, sampler = await asyncio.gather(
        state_future.result_async(), sampler_future.result_async()
    )
    record = CheckpointRecord(
        name=name,
        step=step,
        state_path=state.path,
        sampler_path=sampler.path,
        final=final,
        extra=dict(extra or {}),
    )
    append_checkpoint(output_dir, record)
    return record
