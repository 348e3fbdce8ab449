"""Fault injection into the log writers: a full disk or a short write in the middle of a
``metrics.jsonl`` or ``checkpoints.jsonl`` append leaves the file as it was, and a resumed run
then loses and doubles nothing."""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from sdft import _atomic
from sdft.checkpoints import read_checkpoints
from sdft.config import load_config
from sdft.loop import train
from sdft.runlog import RunLog
from support import local_service, write_config


class FaultyWrites:
    """Wraps ``os.write``: the ``fail_at``-th write to a file named ``name`` writes only half of
    its bytes (a short write) when ``short`` is set, and the write after it (or that write itself
    otherwise) fails with ``ENOSPC``. Writes to other files pass through."""

    def __init__(self, name: str, fail_at: int, *, short: bool) -> None:
        self.name, self.fail_at, self.short = name, fail_at, short
        self.count = 0
        self.failed = False
        self._real: Callable[[int, bytes], int] = os.write

    def __call__(self, fd: int, data: bytes) -> int:
        if self.failed or not os.readlink(f"/proc/self/fd/{fd}").endswith("/" + self.name):
            return self._real(fd, data)
        self.count += 1
        if self.count == self.fail_at and self.short:
            half = max(1, len(data) // 2)
            return self._real(fd, bytes(data[:half]))
        if self.count >= self.fail_at:
            self.failed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._real(fd, data)


@pytest.mark.parametrize("short", [False, True], ids=["enospc", "short-write-then-enospc"])
def test_a_failed_append_leaves_the_log_as_it_was(tmp_path: Path, monkeypatch, short) -> None:
    log = tmp_path / "metrics.jsonl"
    _atomic.append_line(log, '{"step": 1}')
    before = log.read_bytes()
    monkeypatch.setattr(os, "write", FaultyWrites("metrics.jsonl", 1, short=short))
    with pytest.raises(OSError) as info:
        _atomic.append_line(log, '{"step": 2, "split": "train"}')
    assert info.value.errno == errno.ENOSPC
    assert log.read_bytes() == before
    _atomic.append_line(log, '{"step": 2}')
    assert _atomic.read_jsonl(log) == [{"step": 1}, {"step": 2}]


def test_a_short_write_is_completed(tmp_path: Path, monkeypatch) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:3])))
    _atomic.append_line(tmp_path / "m.jsonl", '{"step": 12345}')
    monkeypatch.undo()
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 12345}\n'


def _each_step_once(output_dir: Path, max_steps: int) -> None:
    counts = Counter(
        row["step"] for row in RunLog(output_dir).read_metrics() if row["split"] == "train"
    )
    assert counts == Counter(range(1, max_steps + 1))


@pytest.mark.parametrize(
    ("name", "fail_at", "short", "checkpoints_before_resume"),
    [
        # metrics.jsonl gets val@0, then train@1, train@2, val@2, train@3: fail train@3.
        ("metrics.jsonl", 5, False, [2]),
        ("metrics.jsonl", 5, True, [2]),
        # checkpoints.jsonl gets the step-2 row, then the step-4 row: fail the step-4 row.
        ("checkpoints.jsonl", 2, False, [2]),
        ("checkpoints.jsonl", 2, True, [2]),
    ],
)
def test_disk_full_mid_run_then_resume_loses_and_doubles_nothing(
    tmp_path: Path, monkeypatch, name: str, fail_at: int, short: bool, checkpoints_before_resume
) -> None:
    bench = [{"name": "val", "path": "data/val", "run_every": 2, "metrics": ["pass@1"]}]
    config = load_config(
        write_config(tmp_path, params={"max_steps": 4, "save_every": 2}, benchmarks=bench)
    )
    out = config.output_dir
    faults = FaultyWrites(name, fail_at, short=short)
    monkeypatch.setattr(os, "write", faults)
    with pytest.raises(OSError) as info:
        train(config, service_client=local_service(config), progress=False)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and faults.failed
    assert (out / "metrics.jsonl").read_bytes().endswith(b"\n")
    assert (out / "checkpoints.jsonl").read_bytes().endswith(b"\n")
    assert [r.step for r in read_checkpoints(out)] == checkpoints_before_resume

    result = train(config, resume=True, service_client=local_service(config), progress=False)
    assert result.status == "completed" and result.steps_completed == 4
    _each_step_once(out, 4)
    val_steps = Counter(r["step"] for r in RunLog(out).read_metrics() if r["split"] == "val")
    assert val_steps == Counter([0, 2, 4])
    records = read_checkpoints(out)
    assert [(r.name, r.step, r.final) for r in records] == [
        ("000002", 2, False),
        ("000004", 4, True),
    ]
    assert all(r.state_path and r.sampler_path for r in records)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("42", "checkpoints.jsonl:2: expected a JSON object, got integer"),
        ("[" * 100_000 + "]" * 100_000, "checkpoints.jsonl:2: JSON nested too deeply to read"),
        ('{"name": "x", "step": ' + "1" * 5000 + "}", "checkpoints.jsonl:2: unreadable JSON value"),
    ],
)
def test_a_malformed_checkpoint_index_row_is_named_by_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    (tmp_path / "checkpoints.jsonl").write_text(
        '{"name": "000002", "batch": 2, "step": 2, "final": false}\n' + line + "\n"
    )
    with pytest.raises(ValueError) as info:
        read_checkpoints(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / message}")


def test_a_project_copied_with_cp_a_resumes_in_its_new_folder(tmp_path: Path) -> None:
    import shutil

    bench = [{"name": "val", "path": "data/val", "run_every": 2, "metrics": ["pass@1"]}]
    first = tmp_path / "first"
    first.mkdir()
    config = load_config(
        write_config(first, params={"max_steps": 2, "save_every": 2}, benchmarks=bench)
    )
    train(config, service_client=local_service(config), progress=False)
    shutil.copytree(first, tmp_path / "second", symlinks=True)  # cp -a
    shutil.rmtree(first)  # moved, not copied: nothing may still point at the old folder

    moved = load_config(tmp_path / "second" / "config.yaml")
    moved.algorithm.params.max_steps = 4
    result = train(moved, resume=True, service_client=local_service(moved), progress=False)
    assert result.status == "completed" and result.steps_completed == 4
    _each_step_once(moved.output_dir, 4)
    assert [r.step for r in read_checkpoints(moved.output_dir)] == [2, 4]
