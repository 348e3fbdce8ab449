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
    with pytest.raises(
        ValueError, match=r"m\.jsonl:2: invalid JSON \(Expecting value at column 1\)"
    ):
        _atomic.read_jsonl(log)


def test_append_after_a_torn_last_line_drops_the_fragment_instead_of_merging(
    tmp_path: Path,
) -> None:
    log = tmp_path / "checkpoints.jsonl"
    _atomic.append_line(log, '{"name": "000002", "step": 2}')
    with open(log, "a") as handle:  # a crash in the middle of the next append
        handle.write('{"name": "000004", "st')
    _atomic.append_line(log, '{"name": "000004", "step": 4}')
    assert log.read_text() == '{"name": "000002", "step": 2}\n{"name": "000004", "step": 4}\n'
    assert _atomic.read_jsonl(log) == [
        {"name": "000002", "step": 2},
        {"name": "000004", "step": 4},
    ]


def test_append_to_a_file_that_is_only_a_fragment(tmp_path: Path) -> None:
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1, "sp')
    _atomic.append_line(log, '{"step": 1}')
    assert log.read_text() == '{"step": 1}\n'


def test_append_line_rejects_an_embedded_newline(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"m\.jsonl: a log line must not contain a newline"):
        _atomic.append_line(tmp_path / "m.jsonl", '{"a": 1}\n{"b": 2}')


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("42", r"m\.jsonl:2: expected a JSON object, got integer"),
        ("[1]", r"m\.jsonl:2: expected a JSON object, got array"),
        ("[" * 100_000 + "]" * 100_000, r"m\.jsonl:2: JSON nested too deeply to read"),
        (
            '{"step": ' + "7" * 5000 + "}",
            r"m\.jsonl:2: unreadable JSON value \(Exceeds the limit \(4300 digits\)",
        ),
        (
            '{"split": "tr\\ud800in"}',
            r"m\.jsonl:2: contains a lone surrogate \\ud800, which is not valid Unicode text",
        ),
    ],
)
def test_read_jsonl_names_file_and_line_for_malformed_rows(
    tmp_path: Path, line: str, message: str
) -> None:
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        _atomic.read_jsonl(log)


def test_read_jsonl_checks_required_keys_and_types(tmp_path: Path) -> None:
    log = tmp_path / "m.jsonl"
    required = {"step": int, "split": str, "metrics": dict}
    log.write_text('{"step": 1, "split": "train", "metrics": {}}\n\n{"step": 2, "metrics": {}}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:3: missing key 'split'"):
        _atomic.read_jsonl(log, required_keys=required)
    log.write_text('{"step": true, "split": "train", "metrics": {}}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:1: 'step' must be integer, got boolean"):
        _atomic.read_jsonl(log, required_keys=required)
    log.write_bytes(b'{"step": 1, "split": "caf\xe9", "metrics": {}}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:1: not valid UTF-8 \(byte 0xe9 at offset 25\)"):
        _atomic.read_jsonl(log, required_keys=required)
    log.write_text('{"step": 1, "split": "train", "metrics": {}}\n\n{"step": 2}\n')
    assert _atomic.read_jsonl_lines(log) == [
        (1, {"step": 1, "split": "train", "metrics": {}}),
        (3, {"step": 2}),
    ]
