"""Atomic writes: a reader never sees a half-written file or checkpoint directory.

Everything is written to a temporary sibling, flushed to disk, then renamed over the target
(``os.replace`` is atomic within one filesystem). Append-only JSONL logs are the exception:
:func:`append_line` repairs a torn last line before it appends and undoes a failed write, and
:func:`read_jsonl` reads them back with ``file:line:`` errors for anything malformed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# mkstemp/mkdtemp create private (0600/0700) entries; the published file or directory gets the
# mode that open()/mkdir() would have given it.
def _default_file_mode() -> int:
    return 0o666 & ~_current_umask()


def _default_dir_mode() -> int:
    return 0o777 & ~_current_umask()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), _default_file_mode())
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _end_of_last_line(fd: int, size: int) -> int:
    """The offset just after the last newline of the first ``size`` bytes of ``fd`` (0 if none)."""
    position = size
    while position > 0:
        start = max(0, position - 65536)
        chunk = os.pread(fd, position - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may be short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, f"write returned {written}")
        view = view[written:]


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line to a log file and flush it to disk.

    Appending is not a rename, so a crash can leave a torn (unterminated) last line; readers of
    these logs (:func:`read_jsonl`) skip such a line. Before appending, a torn last line left by an
    earlier crash is dropped (the file is truncated after its last newline): it is a record whose
    write never completed, so its writer never counted it as written, and gluing the new row onto
    it would corrupt both. If this write itself fails part-way (disk full, I/O error), the file is
    cut back to its previous length before the error propagates.
    """
    body = line.rstrip("\n")
    if "\n" in body:
        raise ValueError(f"{path}: a log line must not contain a newline")
    data = (body + "\n").encode("utf-8")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size:
            complete = _end_of_last_line(fd, size)
            if complete != size:
                os.ftruncate(fd, complete)
                size = complete
        os.lseek(fd, size, os.SEEK_SET)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to ``path`` when the block succeeds.

    If ``path`` exists it is replaced only after the new directory is complete. On error the
    temporary directory is removed and ``path`` is left as it was. When ``path`` is a symlink,
    the directory it points to is replaced and the link kept. While the block runs, the temporary
    directory is locked (``flock``), which tells :func:`remove_orphaned_temp_dirs` that it is in
    use; a process killed mid-write releases the lock and leaves an orphan that function removes.
    """
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    lock = _lock_directory(tmp)
    if lock is None:  # only a cleaner racing the instant after mkdtemp could hold it
        raise BlockingIOError(f"{tmp} was locked by another process as soon as it was created")
    try:
        os.chmod(tmp, _default_dir_mode())
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            _remove(old)
            os.replace(target, old)
            os.replace(tmp, target)
            with contextlib.suppress(OSError):  # a leftover is removed by the next cleanup
                _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    _fsync_dir(target.parent)


def _remove(path: Path) -> None:
    """Remove a file, symlink (not what it points to) or directory tree; nothing if absent."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def _lock_directory(path: Path) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on directory ``path``, or None when
    another open descriptor (any process) holds one."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


# What atomic_directory leaves behind when killed: ``.<name>.<8 chars of mkdtemp>.tmp`` (the
# directory being written) and ``.<name>.old`` (between its two renames).
_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_OLD_DIR = re.compile(r"^\.(?P<name>.+)\.old$")


def remove_orphaned_temp_dirs(
    folder: str | os.PathLike[str], *, min_age_s: float = 2.0
) -> list[Path]:
    """Clean up after :func:`atomic_directory` calls in ``folder`` whose process was killed.

    Removes temporary directories named like atomic_directory's own that no process has locked
    (their writer is gone) and that are at least ``min_age_s`` old (covering the instant between
    their creation and their locking). A ``.<name>.old`` left between the two renames of a
    replacement is removed when ``<name>`` exists and renamed back to ``<name>`` when it does not
    (it is then the only complete copy), unless a write of ``<name>`` is still running. Anything
    else in ``folder`` is left alone. Returns the paths removed or restored.
    """
    base = Path(folder)
    if not base.is_dir():
        return []
    now = time.time()
    cleaned: list[Path] = []
    busy: set[str] = set()
    olds: list[tuple[Path, str]] = []
    for child in sorted(base.iterdir()):
        if child.is_symlink() or not child.is_dir():
            continue
        old = _OLD_DIR.match(child.name)
        if old:
            olds.append((child, old.group("name")))
            continue
        temp = _TEMP_DIR.match(child.name)
        if not temp:
            continue
        if now - child.lstat().st_mtime < min_age_s:
            busy.add(temp.group("name"))
            continue
        lock = _lock_directory(child)
        if lock is None:
            busy.add(temp.group("name"))
            continue
        try:
            shutil.rmtree(child)
        finally:
            os.close(lock)
        cleaned.append(child)
    for old_dir, name in olds:
        if name in busy or now - old_dir.lstat().st_mtime < min_age_s:
            continue
        current = base / name
        if current.exists() or current.is_symlink():
            shutil.rmtree(old_dir)
        else:
            os.replace(old_dir, current)
        cleaned.append(old_dir)
    if cleaned:
        _fsync_dir(base)
    return cleaned


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _first_lone_surrogate(value: Any) -> str | None:
    """The first lone UTF-16 surrogate (``"\\ud800"`` in JSON) in a parsed value's strings."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            found = _LONE_SURROGATE.search(item)
            if found:
                return found.group()
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def parse_json_line(line: str, where: str) -> Any:
    """Parse one JSON text; every problem raises ``ValueError`` starting with ``where``.

    Besides syntax errors this turns the failures ``json.loads`` reports without a location (or
    not at all) into located messages: nesting too deep to parse, integers with more digits than
    Python converts, and lone surrogates (``"\\ud800"``), which decode to a ``str`` no tokenizer or
    UTF-8 encoder accepts."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{where} JSON nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer over sys.get_int_max_str_digits() digits
        raise ValueError(f"{where} unreadable JSON value ({exc})") from None
    surrogate = _first_lone_surrogate(value)
    if surrogate is not None:
        raise ValueError(
            f"{where} contains a lone surrogate \\u{ord(surrogate):04x}, which is not valid "
            "Unicode text"
        )
    return value


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8; a ``ValueError`` naming ``where`` and the byte offset otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{where} not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _has_type(value: Any, expected: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        kinds = expected if isinstance(expected, tuple) else (expected,)
        return bool in kinds
    return isinstance(value, expected)


def read_jsonl_lines(
    path: str | os.PathLike[str],
    *,
    required_keys: Mapping[str, type | tuple[type, ...]] | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSONL log written with :func:`append_line` as ``(line number, object)`` pairs.

    A torn (unterminated) last line is skipped, and so are blank lines. Every other line must be
    a JSON object holding ``required_keys`` with values of the given types (``bool`` never counts
    as ``int``); anything else raises ``ValueError`` as ``file:line: what is wrong``. A missing
    file reads as no rows."""
    target = Path(path)
    if not target.exists():
        return []
    data = target.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # the part after the final newline is a torn write
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(complete.split(b"\n")[:-1], start=1):
        where = f"{target}:{number}:"
        line = decode_utf8(raw, where)
        if not line.strip():
            continue
        row = parse_json_line(line, where)
        if not isinstance(row, dict):
            raise ValueError(f"{where} expected a JSON object, got {_type_name(row)}")
        for key, kind in (required_keys or {}).items():
            if key not in row:
                raise ValueError(f"{where} missing key {key!r}")
            if not _has_type(row[key], kind):
                kinds = kind if isinstance(kind, tuple) else (kind,)
                wanted = " or ".join(_JSON_TYPE_NAMES.get(k, k.__name__) for k in kinds)
                raise ValueError(f"{where} {key!r} must be {wanted}, got {_type_name(row[key])}")
        rows.append((number, row))
    return rows


def read_jsonl(
    path: str | os.PathLike[str],
    *,
    required_keys: Mapping[str, type | tuple[type, ...]] | None = None,
) -> list[dict[str, Any]]:
    """The objects of :func:`read_jsonl_lines`, without their line numbers."""
    return [row for _, row in read_jsonl_lines(path, required_keys=required_keys)]
