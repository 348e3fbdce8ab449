"""Several ``sdft continual`` processes on one experiment share its chains instead of colliding.

Each chain, the base model's scoring and the writing of ``results.jsonl`` and the reports are
guarded by an advisory ``flock`` on a file in ``output_dir/.locks/``. A process takes a chain only
when its lock is free and leaves it to the process that holds it otherwise; the base model is
scored by the process that takes its lock (the others go on to the chains); results and reports
are rebuilt under their lock from everything on disk, so the process that finishes last writes
the complete ones. The kernel drops a lock when its process ends, ``kill -9`` included, so a
crashed process never blocks a chain.

Use it to run one process per GPU, or on a CPU machine several processes with fewer threads each
(``scripts/experiment.sh`` with ``JOBS=2``). Locks are advisory and local: they coordinate
processes that see the same file system on one machine (not NFS).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCKS_DIR = ".locks"


class Claim:
    """An open lock file of ``output_dir/.locks``; ``take`` / ``wait`` lock it, ``release``
    unlocks and closes it."""

    def __init__(self, output_dir: Path, name: str) -> None:
        directory = output_dir / LOCKS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{name}.lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def take(self) -> bool:
        """Lock without waiting: ``False`` when another process (or claim) holds it."""
        try:
            fcntl.flock(self._require(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._note_holder()
        return True

    def wait(self) -> None:
        """Lock, waiting for the holder to finish."""
        fcntl.flock(self._require(), fcntl.LOCK_EX)
        self._note_holder()

    def holder(self) -> str:
        """What the holder wrote into the lock file (``pid N``), for messages."""
        try:
            return self.path.read_text(encoding="utf-8").strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _require(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"{self.path}: the claim was released")
        return self._fd

    def _note_holder(self) -> None:
        fd = self._require()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)


def lock_name(label: str) -> str:
    """A chain label (``sdft/lr0.0005/seed0``) as a lock file name."""
    return label.replace("/", "__")


@contextlib.contextmanager
def holding(output_dir: Path, name: str) -> Iterator[None]:
    """Hold lock ``name``, waiting for it (the rebuilding of results and reports)."""
    claim = Claim(output_dir, name)
    try:
        claim.wait()
        yield
    finally:
        claim.release()


__all__ = ["LOCKS_DIR", "Claim", "holding", "lock_name"]
