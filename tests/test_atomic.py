"""Atomic writes: complete files with ordinary permissions, nothing left behind on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sdft import _atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_text_replaces_and_uses_umask_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    _atomic.write_text(target, "one")
    _atomic.write_text(target, "two")
    assert target.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(target) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_write_json_round_trips(tmp_path: Path) -> None:
    _atomic.write_json(tmp_path / "x.json", {"b": 1, "a": [1.5, None]})
    assert (
        tmp_path / "x.json"
    ).read_text() == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'


def test_atomic_directory_commits_or_leaves_old(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with _atomic.atomic_directory(target) as tmp:
        (tmp / "w.bin").write_bytes(b"v1")
    assert (target / "w.bin").read_bytes() == b"v1"
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(target) == 0o777 & ~umask
    with pytest.raises(RuntimeError, match="boom"), _atomic.atomic_directory(target) as tmp:
        (tmp / "w.bin").write_bytes(b"half")
        raise RuntimeError("boom")
    assert (target / "w.bin").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with _atomic.atomic_directory(target) as tmp:
        (tmp / "w.bin").write_bytes(b"v2")
    assert (target / "w.bin").read_bytes() == b"v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_read_jsonl_skips_torn_last_line_and_names_bad_lines(tmp_path: Path) -> None:
    log = tmp_path / "m.jsonl"
    _atomic.append_line(log, '{"step": 1}')
    _atomic.append_line(log, '{"step": 2}')
    with open(log, "a") as handle:
        handle.write('{"step": 3, "tor')
    assert _atomic.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    assert _atomic.read_jsonl(tmp_path / "missing.jsonl") == []
    log.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        _atomic.read_jsonl(log)
