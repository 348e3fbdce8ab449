"""Checkpoint directories of the local backend: layout, metadata, integrity, atomic writes.

Layout under ``checkpoint_root``::

    <run_id>/weights/<name>/           save_state: weights + optimizer state
    <run_id>/sampler_weights/<name>/   save_weights_for_sampler: weights only

addressed as ``local://<run_id>/weights/<name>`` (a plain filesystem path to such a directory is
accepted too). Each directory holds ``sdft_checkpoint.json`` (metadata) and the files of
:mod:`sdft.backends.local._checkpoint_state`.

Integrity. The metadata lists every other file of the directory in ``files`` (name -> bytes) and
``sha256`` (name -> hex digest of its content). A file name is a plain name in the directory:
an absolute path, a ``/``, ``..``, or a symlink in the directory is refused before anything is
opened. Opening a checkpoint checks every listed file's size and SHA-256 and names the first that
differs; the loaders then refuse non-finite (NaN / infinite) tensors. Saving writes every file
with a loop that handles short writes, reads the files back against the digests of what was
meant to be written, and only then publishes the directory (one rename), so a failed or
truncated write never becomes a visible checkpoint.

Format versions. Version 2 (written now) carries the digests. Version 1 checkpoints (written
before digests existed) are still opened, with the size check only; their tensors still pass the
non-finite check. Anything else is refused.

Orphans. A process killed while saving leaves ``.<name>.<random>.tmp`` directories (and possibly
``.<name>.old``) next to its checkpoints; saving to or opening a checkpoint of a run removes the
ones of that run that no live writer holds (``sdft._atomic.remove_orphaned_temp_dirs``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from sdft._atomic import atomic_directory, remove_orphaned_temp_dirs
from sdft.backends.local._errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LocalBadRequestError,
)

SCHEME = "local://"
META_FILE = "sdft_checkpoint.json"
FORMAT = "sdft-local-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("weights", "sampler_weights")

CheckpointKind = Literal["weights", "sampler_weights"]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_READ_CHUNK = 4 * 2**20


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise LocalBadRequestError(
            f"checkpoint name must be 1-200 characters of letters, digits, '.', '_' or '-' "
            f"(not starting with '.' or '-'), got {name!r}"
        )
    return name


def checkpoint_uri(run_id: str, kind: CheckpointKind, name: str) -> str:
    return f"{SCHEME}{run_id}/{kind}/{name}"


def checkpoint_directory(root: Path, run_id: str, kind: CheckpointKind, name: str) -> Path:
    return root / run_id / kind / name


def resolve_path(root: Path, path: Any) -> Path:
    """``local://<run_id>/<weights|sampler_weights>/<name>`` or a filesystem path -> directory."""
    if not isinstance(path, (str, Path)):
        raise LocalBadRequestError(f"checkpoint path must be a string, got {type(path).__name__}")
    text = str(path)
    if text.startswith("tinker://"):
        raise LocalBadRequestError(
            f"{text} is a Tinker service path; the local backend reads local:// paths "
            "(local://<run_id>/weights/<name>) or checkpoint directories"
        )
    if text.startswith(SCHEME):
        parts = text[len(SCHEME) :].split("/")
        if len(parts) != 3 or parts[1] not in KINDS or not all(parts):
            raise LocalBadRequestError(
                f"malformed local checkpoint path {text!r}; expected "
                "local://<run_id>/weights/<name> or local://<run_id>/sampler_weights/<name>"
            )
        run_id, kind, name = parts
        if not _NAME.match(run_id) or not _NAME.match(name):
            raise LocalBadRequestError(f"malformed local checkpoint path {text!r}")
        return checkpoint_directory(root, run_id, kind, name)  # type: ignore[arg-type]
    return Path(text).expanduser()


def remove_orphans(directory: Path) -> list[Path]:
    """Remove what killed saves left in the run folders of checkpoint ``directory`` (both kind
    folders of its ``<run_id>/<weights|sampler_weights>/<name>`` layout; a directory outside
    that layout is in a folder this backend does not own, which is left alone).

    Best effort: a folder that cannot be cleaned (permissions) is left as it is.
    """
    parent = directory.parent
    if parent.name not in KINDS:
        return []
    removed: list[Path] = []
    for folder in (parent.parent / kind for kind in KINDS):
        with contextlib.suppress(OSError):
            removed.extend(remove_orphaned_temp_dirs(folder))
    return removed


# --- reading ------------------------------------------------------------------------------


def read_meta(directory: Path, shown: str) -> dict[str, Any]:
    """The checkpoint's metadata, after checking that every listed file is a plain file of the
    directory with the recorded size and SHA-256 (version 1: size only)."""
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint at {shown} (directory {directory} not found)")
    if not meta_path.is_file():
        raise CheckpointNotFoundError(
            f"{shown} ({directory}) is not a local-backend checkpoint: {META_FILE} is missing"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: {meta_path} is unreadable ({exc})"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCheckpointError(f"checkpoint {shown}: {meta_path} is not a {FORMAT} file")
    version = meta.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CorruptCheckpointError(
            f"checkpoint {shown}: format version {version!r} is not supported "
            f"(this sdft reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    for key in ("training", "base_model", "files"):
        if key not in meta:
            raise CorruptCheckpointError(f"checkpoint {shown}: {META_FILE} has no {key!r}")
    if not isinstance(meta["base_model"], str) or not meta["base_model"]:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: {META_FILE} 'base_model' must be a model name, "
            f"got {meta['base_model']!r}"
        )
    sizes = _sizes(meta["files"], shown)
    digests = _digests(meta, sizes, shown) if version >= 2 else None
    for name, size in sizes.items():
        _check_file(directory, name, size, None if digests is None else digests[name], shown)
    return meta


def _sizes(files: Any, shown: str) -> dict[str, int]:
    if not isinstance(files, dict):
        raise CorruptCheckpointError(f"checkpoint {shown}: {META_FILE} 'files' is not an object")
    sizes = {}
    for name, size in files.items():
        confined_name(name, shown)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise CorruptCheckpointError(
                f"checkpoint {shown}: {META_FILE} gives {name} the size {size!r}, not a byte count"
            )
        sizes[name] = size
    return sizes


def _digests(meta: dict[str, Any], sizes: dict[str, int], shown: str) -> dict[str, str]:
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or set(digests) != set(sizes):
        raise CorruptCheckpointError(
            f"checkpoint {shown}: {META_FILE} 'sha256' must give a digest for exactly the "
            "files it lists"
        )
    for name, digest in digests.items():
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise CorruptCheckpointError(
                f"checkpoint {shown}: {META_FILE} has no valid SHA-256 for {name} ({digest!r})"
            )
    return digests


def confined_name(name: Any, shown: str) -> str:
    """``name`` when it is a plain file name (metadata can only name files of its directory)."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..", META_FILE)
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise CorruptCheckpointError(
            f"checkpoint {shown}: {META_FILE} lists {name!r}, which is not a file name inside "
            "the checkpoint directory (paths, '..' and the metadata file itself are refused)"
        )
    return name


def _check_file(directory: Path, name: str, size: int, digest: str | None, shown: str) -> None:
    path = directory / name
    if path.is_symlink():
        raise CorruptCheckpointError(
            f"checkpoint {shown}: {name} is a symlink; checkpoint files must be regular files "
            "inside the checkpoint directory"
        )
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint {shown}: {name} is missing")
    actual = path.stat().st_size
    if actual != size:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: {name} has {actual} bytes, {size} were written "
            "(truncated or modified)"
        )
    if digest is not None and _file_sha256(path) != digest:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: {name} does not match its SHA-256 (modified or corrupted "
            "after it was written)"
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def require_files(meta: dict[str, Any], names: tuple[str, ...], shown: str) -> None:
    """Refuse a checkpoint whose (verified) file list lacks one of ``names``."""
    for name in names:
        if name not in meta["files"]:
            raise CorruptCheckpointError(f"checkpoint {shown}: {META_FILE} does not list {name}")


def load_tensors(directory: Path, name: str, shown: str) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file ``name``; any NaN or infinity is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(directory / confined_name(name, shown)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"checkpoint {shown}: cannot read {name} ({exc})") from exc
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CorruptCheckpointError(
                f"checkpoint {shown}: {name} holds {bad} non-finite values (NaN or infinity) "
                f"in {key}"
            )
    return tensors


# --- writing ------------------------------------------------------------------------------


def write_checkpoint(
    directory: Path,
    *,
    meta: dict[str, Any],
    contents: Mapping[str, bytes],
    overwrite: bool,
    shown: str,
) -> None:
    """Write ``contents`` (file name -> bytes) and the metadata as checkpoint ``directory``.

    Readers never see a partial checkpoint: everything is written into a temporary sibling,
    fsynced, read back against the digests of ``contents``, and renamed into place.
    """
    if (directory.exists() or directory.is_symlink()) and not overwrite:
        raise CheckpointExistsError(
            f"checkpoint {shown} already exists; pass overwrite=True to replace it"
        )
    remove_orphans(directory)
    sizes = {}
    digests = {}
    with atomic_directory(directory) as tmp:
        for name, data in contents.items():
            write_file(tmp / confined_name(name, shown), data)
            sizes[name] = len(data)
            digests[name] = hashlib.sha256(data).hexdigest()
        for name in contents:
            _check_file(tmp, name, sizes[name], digests[name], f"{shown} (while saving)")
        record = {
            **meta,
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created_unix": time.time(),
            "files": sizes,
            "sha256": digests,
        }
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        write_file(tmp / META_FILE, text.encode("utf-8"))


def write_file(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it (a short write is continued; a write that makes
    no progress is an error)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.EIO, f"writing {path.name}: the write made no progress")
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
