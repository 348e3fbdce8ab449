"""Tinker checkpoint paths on the server's disk.

The local backend writes ``<checkpoint_root>/<run_id>/<weights|sampler_weights>/<name>/`` and
calls it ``local://<run_id>/<kind>/<name>``; on the wire the same checkpoint is
``tinker://<run_id>/<kind>/<name>``. Only that form is accepted from clients (never a filesystem
path), and ``run_id`` and ``name`` are single path components of letters, digits, ``.``, ``_``
and ``-`` not starting with ``.`` or ``-``, so no path can leave the checkpoint root.
Checkpoints persist on disk: a restarted server resumes from them.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinker import types

from sdft.serve.errors import ServeError

TINKER = "tinker://"
LOCAL = "local://"
META_FILE = "sdft_checkpoint.json"
KINDS = {"weights": "training", "sampler_weights": "sampler"}
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class CheckpointPath:
    run_id: str
    kind: str  # "weights" or "sampler_weights"
    name: str

    @property
    def tinker(self) -> str:
        return f"{TINKER}{self.run_id}/{self.kind}/{self.name}"

    @property
    def local(self) -> str:
        return f"{LOCAL}{self.run_id}/{self.kind}/{self.name}"

    def directory(self, root: Path) -> Path:
        return root / self.run_id / self.kind / self.name


def check_name(name: Any, where: str) -> str:
    """A checkpoint name from a client (one safe path component)."""
    if not isinstance(name, str) or not _COMPONENT.match(name):
        raise ServeError(
            400,
            f"{where}: checkpoint name must be 1-200 letters, digits, '.', '_' or '-' (not "
            f"starting with '.' or '-'), got {name!r}",
        )
    return name


def parse_tinker_path(path: Any, where: str) -> CheckpointPath:
    """``tinker://<run_id>/<weights|sampler_weights>/<name>`` from a client."""
    if not isinstance(path, str) or not path.startswith(TINKER):
        raise ServeError(
            400,
            f"{where}: checkpoint path must be tinker://<run_id>/weights/<name> or "
            f"tinker://<run_id>/sampler_weights/<name>, got {path!r}",
        )
    parts = path[len(TINKER) :].split("/")
    if (
        len(parts) != 3
        or parts[1] not in KINDS
        or not _COMPONENT.match(parts[0])
        or not _COMPONENT.match(parts[2])
    ):
        raise ServeError(
            400,
            f"{where}: malformed checkpoint path {path!r}; expected "
            "tinker://<run_id>/weights/<name> or tinker://<run_id>/sampler_weights/<name>",
        )
    return CheckpointPath(parts[0], parts[1], parts[2])


def from_local(uri: str) -> CheckpointPath:
    """The path of a checkpoint the local backend just wrote (``local://...``)."""
    if not uri.startswith(LOCAL):
        raise ValueError(f"not a local:// checkpoint uri: {uri!r}")
    run_id, kind, name = uri[len(LOCAL) :].split("/")
    return CheckpointPath(run_id, kind, name)


def read_meta(root: Path, path: CheckpointPath, where: str) -> dict[str, Any]:
    """The checkpoint's metadata file (404 when there is no such checkpoint)."""
    meta_path = path.directory(root) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ServeError(404, f"{where}: no checkpoint at {path.tinker}") from None
    except (OSError, ValueError) as exc:
        raise ServeError(422, f"{where}: checkpoint {path.tinker} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or "base_model" not in meta:
        raise ServeError(
            422, f"{where}: checkpoint {path.tinker} has no base_model in its metadata"
        )
    return meta


def weights_info(root: Path, path: CheckpointPath, where: str) -> types.WeightsInfoResponse:
    meta = read_meta(root, path, where)
    lora = meta.get("lora") if meta.get("training") == "lora" else None
    return types.WeightsInfoResponse(
        base_model=str(meta["base_model"]),
        is_lora=lora is not None,
        lora_rank=int(lora["rank"]) if lora else None,
        train_unembed=bool(lora["train_unembed"]) if lora else None,
        train_mlp=bool(lora["train_mlp"]) if lora else None,
        train_attn=bool(lora["train_attn"]) if lora else None,
    )


def list_checkpoints(root: Path, run_id: str, where: str) -> types.CheckpointsListResponse:
    """Every checkpoint of one training run, oldest first."""
    if not _COMPONENT.match(run_id):
        raise ServeError(400, f"{where}: malformed training run id {run_id!r}")
    found: list[types.Checkpoint] = []
    for kind, checkpoint_type in KINDS.items():
        directory = root / run_id / kind
        if not directory.is_dir():
            continue
        for child in sorted(directory.iterdir()):
            meta_path = child / META_FILE
            if not meta_path.is_file() or not _COMPONENT.match(child.name):
                continue
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            path = CheckpointPath(run_id, kind, child.name)
            created = float(meta.get("created_unix") or meta_path.stat().st_mtime)
            user_metadata = meta.get("user_metadata") or None
            found.append(
                types.Checkpoint(
                    checkpoint_id=f"{kind}/{child.name}",
                    checkpoint_type=checkpoint_type,  # type: ignore[arg-type]
                    time=dt.datetime.fromtimestamp(created, tz=dt.UTC),
                    tinker_path=path.tinker,
                    size_bytes=sum(int(v) for v in (meta.get("files") or {}).values()),
                    user_metadata={str(k): str(v) for k, v in user_metadata.items()}
                    if isinstance(user_metadata, dict)
                    else None,
                )
            )
    found.sort(key=lambda c: c.time)
    return types.CheckpointsListResponse(checkpoints=found)
