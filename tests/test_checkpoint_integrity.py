"""Local-backend checkpoints under attack and failure: in-place corruption (SHA-256 per file),
non-finite weights, metadata naming files outside the checkpoint, orphans of killed saves, a
symlinked checkpoint overwritten, and faults injected into the write call of a save."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tinker import types

from sdft._atomic import remove_orphaned_temp_dirs
from sdft.backends.local import CorruptCheckpointError
from sdft.backends.local import _checkpoints as ckpt
from sdft.models import TINY_RANDOM_MODEL

ADAPTER = "adapter_model.safetensors"


def checkpoint_dir(service: Any, path: str) -> Path:
    run_id, kind, name = path.removeprefix("local://").split("/")
    return service.checkpoint_root / run_id / kind / name


def trained_lora(service: Any, seed: int = 3) -> Any:
    client = service.create_lora_training_client(TINY_RANDOM_MODEL, rank=2, seed=seed).result()
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 1000, size=12).tolist()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.asarray([*tokens[1:], 2])),
            "weights": types.TensorData.from_numpy(np.ones(12, dtype=np.float32)),
        },
    )
    client.forward_backward([datum], "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return client


def adapter_weights(client: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in client.trainable_parameters}


def assert_same_weights(client: Any, expected: dict[str, torch.Tensor]) -> None:
    actual = adapter_weights(client)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def rewrite_meta(directory: Path, change: Any) -> None:
    meta_path = directory / ckpt.META_FILE
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))


def vouch_for(directory: Path, name: str) -> None:
    """Make the metadata agree with the file as it is now (size and digest)."""
    data = (directory / name).read_bytes()

    def change(meta: dict[str, Any]) -> None:
        meta["files"][name] = len(data)
        if "sha256" in meta:
            meta["sha256"][name] = hashlib.sha256(data).hexdigest()

    rewrite_meta(directory, change)


# --- #7: corruption in place, non-finite weights ------------------------------------------------


def test_a_checkpoint_corrupted_in_place_is_refused_naming_the_file(local_service: Any) -> None:
    client = trained_lora(local_service)
    path = client.save_state("000004").result().path
    directory = checkpoint_dir(local_service, path)
    weights = directory / ADAPTER
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:  # the repro: 4000 bytes of 0xFF, same size
        handle.seek(size - 4000)
        handle.write(b"\xff" * 4000)
    assert weights.stat().st_size == size
    message = rf"checkpoint {path}: {ADAPTER} does not match its SHA-256"
    with pytest.raises(CorruptCheckpointError, match=message):
        local_service.create_training_client_from_state_with_optimizer(path).result()
    with pytest.raises(CorruptCheckpointError, match=message):
        local_service.create_sampling_client(model_path=path).result()
    with pytest.raises(CorruptCheckpointError, match=message):
        client.load_state(path).result()


def test_every_file_is_listed_with_its_size_and_sha256(local_service: Any) -> None:
    client = trained_lora(local_service)
    directory = checkpoint_dir(local_service, client.save_state("listed").result().path)
    meta = json.loads((directory / ckpt.META_FILE).read_text())
    assert meta["version"] == 2
    on_disk = sorted(p.name for p in directory.iterdir() if p.name != ckpt.META_FILE)
    assert sorted(meta["files"]) == sorted(meta["sha256"]) == on_disk
    for name in on_disk:
        data = (directory / name).read_bytes()
        assert meta["files"][name] == len(data)
        assert meta["sha256"][name] == hashlib.sha256(data).hexdigest()


def _replace_tensor(directory: Path, name: str, fill: float) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / name))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[:3] = fill
    save_file(tensors, str(directory / name), metadata={"format": "pt"})
    vouch_for(directory, name)
    return key


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_even_when_the_metadata_vouches_for_them(
    local_service: Any, fill: float
) -> None:
    client = trained_lora(local_service)
    path = client.save_state(f"nonfinite-{fill}").result().path
    directory = checkpoint_dir(local_service, path)
    key = _replace_tensor(directory, ADAPTER, fill)
    message = rf"{ADAPTER} holds 3 non-finite values \(NaN or infinity\) in {key}"
    with pytest.raises(CorruptCheckpointError, match=message):
        local_service.create_training_client_from_state(path).result()
    with pytest.raises(CorruptCheckpointError, match=message):
        local_service.create_sampling_client(model_path=path).result()


def test_non_finite_optimizer_moments_are_refused(local_service: Any) -> None:
    client = trained_lora(local_service)
    path = client.save_state("nan-moments").result().path
    key = _replace_tensor(checkpoint_dir(local_service, path), "optimizer.safetensors", np.nan)
    with pytest.raises(CorruptCheckpointError, match=rf"non-finite values .* in {key}"):
        local_service.create_training_client_from_state_with_optimizer(path).result()


def _as_version_1(directory: Path) -> None:
    def change(meta: dict[str, Any]) -> None:
        meta["version"] = 1
        del meta["sha256"]

    rewrite_meta(directory, change)


def test_version_1_checkpoints_load_with_the_size_check_only(local_service: Any) -> None:
    client = trained_lora(local_service)
    expected = adapter_weights(client)
    path = client.save_state("v1").result().path
    directory = checkpoint_dir(local_service, path)
    _as_version_1(directory)
    restored = local_service.create_training_client_from_state_with_optimizer(path).result()
    assert_same_weights(restored, expected)
    assert restored.optim_steps == 1
    weights = directory / ADAPTER
    data = weights.read_bytes()
    weights.write_bytes(data[:-1])
    with pytest.raises(CorruptCheckpointError, match=rf"{ADAPTER} has {len(data) - 1} bytes"):
        local_service.create_training_client_from_state(path).result()
    # the 0xFF overwrite lands in the tensor data: a version 1 checkpoint has no digest,
    # and the non-finite check is what refuses it
    weights.write_bytes(data[:-4000] + b"\xff" * 4000)
    with pytest.raises(CorruptCheckpointError, match=rf"{ADAPTER} holds \d+ non-finite values"):
        local_service.create_training_client_from_state(path).result()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(version=3), r"format version 3 is not supported"),
        (lambda m: m.pop("sha256"), r"'sha256' must give a digest for exactly the files"),
        (
            lambda m: m["sha256"].update({ADAPTER: "00" * 31}),
            rf"has no valid SHA-256 for {ADAPTER}",
        ),
        (lambda m: m["files"].update({ADAPTER: -1}), rf"gives {ADAPTER} the size -1"),
        (lambda m: m.update(base_model=["x"]), r"'base_model' must be a model name"),
        (lambda m: m.update(training="other"), r"unknown training 'other'"),
    ],
)
def test_malformed_metadata_is_refused(local_service: Any, change: Any, message: str) -> None:
    client = trained_lora(local_service)
    path = client.save_weights_for_sampler("malformed").result().path
    rewrite_meta(checkpoint_dir(local_service, path), change)
    with pytest.raises(CorruptCheckpointError, match=message):
        local_service.create_sampling_client(model_path=path).result()


# --- #17: metadata can only name files inside the checkpoint ----------------------------------------


@pytest.mark.parametrize(
    "name", ["/etc/shadow", "../../../../../../etc/passwd", "..", "sub/file", "a\\b", ""]
)
def test_metadata_naming_files_outside_the_checkpoint_is_refused_before_any_access(
    local_service: Any, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = trained_lora(local_service)
    path = client.save_weights_for_sampler("escape").result().path
    directory = checkpoint_dir(local_service, path)

    def change(meta: dict[str, Any]) -> None:
        meta["files"][name] = 1
        if "sha256" in meta:
            meta["sha256"][name] = "0" * 64

    rewrite_meta(directory, change)
    touched: list[str] = []
    real_stat = os.stat

    def recording_stat(target: Any, *args: Any, **kwargs: Any) -> Any:
        touched.append(os.fspath(target))
        return real_stat(target, *args, **kwargs)

    monkeypatch.setattr(os, "stat", recording_stat)
    with pytest.raises(CorruptCheckpointError) as raised:
        local_service.create_sampling_client(model_path=path).result()
    monkeypatch.undo()
    assert str(raised.value) == (
        f"checkpoint {path}: sdft_checkpoint.json lists {name!r}, which is not a file name "
        "inside the checkpoint directory (paths, '..' and the metadata file itself are refused)"
    )
    assert "bytes" not in str(raised.value)
    assert not [t for t in touched if "etc" in t or (t.endswith(name) and name)]


def test_a_symlinked_checkpoint_file_is_refused(local_service: Any, tmp_path: Path) -> None:
    client = trained_lora(local_service)
    path = client.save_weights_for_sampler("linked-file").result().path
    directory = checkpoint_dir(local_service, path)
    outside = tmp_path / "secret.json"
    config = directory / "adapter_config.json"
    outside.write_bytes(config.read_bytes())  # same size and digest: only the link is wrong
    config.unlink()
    config.symlink_to(outside)
    with pytest.raises(
        CorruptCheckpointError,
        match=r"adapter_config\.json is a symlink; checkpoint files must be regular files",
    ):
        local_service.create_sampling_client(model_path=path).result()


def test_a_symlinked_checkpoint_directory_is_still_readable(
    local_service: Any, tmp_path: Path
) -> None:
    client = trained_lora(local_service)
    expected = adapter_weights(client)
    path = client.save_state("linked-dir").result().path
    directory = checkpoint_dir(local_service, path)
    moved = tmp_path / "elsewhere"
    directory.rename(moved)
    directory.symlink_to(moved, target_is_directory=True)
    restored = local_service.create_training_client_from_state(path).result()
    assert_same_weights(restored, expected)


# --- #24: orphans of killed saves, symlinked checkpoints overwritten ---------------------------


def _orphan(folder: Path, name: str, *, age_s: float = 3600.0) -> Path:
    orphan = folder / f".{name}.k1ll3d_0.tmp"
    orphan.mkdir(parents=True)
    (orphan / ADAPTER).write_bytes(b"half a checkpoint")
    old = time.time() - age_s
    os.utime(orphan, (old, old))
    return orphan


def test_the_next_save_removes_orphaned_temp_dirs_of_the_run(local_service: Any) -> None:
    client = trained_lora(local_service)
    client.save_state("000001").result()
    run = local_service.checkpoint_root / client.model_id
    orphans = [_orphan(run / "weights", "000002"), _orphan(run / "sampler_weights", "000002")]
    young = _orphan(run / "weights", "000003", age_s=0.0)
    unrelated = [run / "weights" / ".notes.tmp", run / "weights" / "keep.tmp"]
    for path in unrelated:
        path.mkdir()
    client.save_weights_for_sampler("000004").result()
    assert not any(p.exists() for p in orphans)
    assert young.exists()  # it may be a save that has only just started
    assert all(p.exists() for p in unrelated)
    assert sorted(p.name for p in (run / "weights").iterdir() if p.name.startswith("0")) == [
        "000001"
    ]


def test_opening_a_checkpoint_removes_the_orphans_of_its_run(local_service: Any) -> None:
    client = trained_lora(local_service)
    path = client.save_state("000004").result().path
    run = local_service.checkpoint_root / client.model_id
    orphans = [_orphan(run / "weights", "000008"), _orphan(run / "sampler_weights", "000008")]
    local_service.create_training_client_from_state_with_optimizer(path).result()
    assert not any(p.exists() for p in orphans)


def test_opening_a_checkpoint_outside_the_layout_touches_nothing_around_it(
    local_service: Any, tmp_path: Path
) -> None:
    import shutil

    client = trained_lora(local_service)
    path = client.save_weights_for_sampler("plain").result().path
    mine = tmp_path / "mine"
    shutil.copytree(checkpoint_dir(local_service, path), mine)
    neighbours = [tmp_path / "config", tmp_path / ".config.old", _orphan(tmp_path, "mine")]
    for neighbour in neighbours[:2]:
        neighbour.mkdir()
    old = time.time() - 3600
    os.utime(neighbours[1], (old, old))
    local_service.create_sampling_client(model_path=str(mine)).result()
    assert all(n.is_dir() for n in neighbours)


def test_a_temp_dir_in_use_is_never_removed(tmp_path: Path) -> None:
    import fcntl

    busy = _orphan(tmp_path, "000002")
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live atomic_directory holds it
        assert remove_orphaned_temp_dirs(tmp_path) == []
        assert busy.exists()
    finally:
        os.close(fd)
    assert remove_orphaned_temp_dirs(tmp_path) == [busy]
    assert not busy.exists()


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from sdft._atomic import atomic_directory

with atomic_directory(Path(sys.argv[1]) / "000004") as tmp:
    (tmp / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    print(tmp.name, flush=True)
    time.sleep(600)
"""


def test_a_writer_killed_mid_save_leaves_an_orphan_that_is_cleaned(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(folder)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        name = writer.stdout.readline().strip()
        orphan = folder / name
        assert orphan.is_dir() and name.startswith(".000004.") and name.endswith(".tmp")
        assert remove_orphaned_temp_dirs(folder, min_age_s=0) == []  # alive: in use
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert orphan.is_dir() and not (folder / "000004").exists()
    assert remove_orphaned_temp_dirs(folder, min_age_s=0) == [orphan]
    assert list(folder.iterdir()) == []


def test_a_replacement_killed_between_its_renames_is_recovered(tmp_path: Path) -> None:
    kept = tmp_path / ".000004.old"
    kept.mkdir()
    (kept / "adapter_model.safetensors").write_bytes(b"the only complete copy")
    old = time.time() - 60
    os.utime(kept, (old, old))
    assert remove_orphaned_temp_dirs(tmp_path) == [kept]
    assert (tmp_path / "000004" / "adapter_model.safetensors").read_bytes() == (
        b"the only complete copy"
    )
    stale = tmp_path / ".000004.old"
    stale.mkdir()
    os.utime(stale, (old, old))
    assert remove_orphaned_temp_dirs(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000004"]


def test_overwriting_a_symlinked_checkpoint_replaces_its_target_and_leaves_no_old(
    local_service: Any, tmp_path: Path
) -> None:
    client = trained_lora(local_service)
    path = client.save_state("linked", overwrite=True).result().path
    directory = checkpoint_dir(local_service, path)
    target = tmp_path / "disk2" / "linked"
    target.parent.mkdir()
    directory.rename(target)
    directory.symlink_to(target, target_is_directory=True)
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # no gradients: same weights
    client.save_state("linked", overwrite=True).result()
    assert directory.is_symlink() and directory.resolve() == target.resolve()
    meta = json.loads((target / ckpt.META_FILE).read_text())
    assert meta["optim_steps"] == 2
    leftovers = [p.name for p in directory.parent.iterdir() if p.name.startswith(".")]
    leftovers += [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    restored = local_service.create_training_client_from_state_with_optimizer(path).result()
    assert restored.optim_steps == 2


# --- fault injection: the write call of a save fails -------------------------------------------


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _faulty_write(root: Path, file_name: str, fault: str) -> Any:
    """An ``os.write`` that misbehaves on ``file_name`` under ``root`` only."""
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        target = _fd_path(fd)
        if not (target.startswith(str(root)) and target.endswith("/" + file_name)):
            return real_write(fd, data)
        chunk = bytes(data)
        if fault == "enospc":
            real_write(fd, chunk[: len(chunk) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if fault == "short":
            return real_write(fd, chunk[:1000])
        if fault == "no-progress":
            return 0
        raise AssertionError(fault)

    return write


def _state_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    ("fault", "file_name", "error"),
    [
        ("enospc", ADAPTER, r"No space left on device"),
        ("enospc", "optimizer.safetensors", r"No space left on device"),
        ("enospc", ckpt.META_FILE, r"No space left on device"),
        ("no-progress", ADAPTER, r"writing adapter_model\.safetensors: the write made no progress"),
    ],
)
def test_a_save_failing_mid_write_keeps_the_previous_checkpoint(
    local_service: Any, monkeypatch: pytest.MonkeyPatch, fault: str, file_name: str, error: str
) -> None:
    client = trained_lora(local_service)
    expected = adapter_weights(client)
    path = client.save_state("000004").result().path
    directory = checkpoint_dir(local_service, path)
    before = _state_of(directory)
    client.forward_backward(
        [
            types.Datum(
                model_input=types.ModelInput.from_ints([5, 6, 7]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(np.asarray([6, 7, 8])),
                    "weights": types.TensorData.from_numpy(np.ones(3, dtype=np.float32)),
                },
            )
        ],
        "cross_entropy",
    ).result()
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    monkeypatch.setattr(os, "write", _faulty_write(local_service.checkpoint_root, file_name, fault))
    with pytest.raises(OSError, match=error):
        client.save_state("000004", overwrite=True).result()
    with pytest.raises(OSError, match=error):
        client.save_state("000008").result()
    monkeypatch.undo()
    assert _state_of(directory) == before
    assert sorted(p.name for p in directory.parent.iterdir()) == ["000004"]
    restored = local_service.create_training_client_from_state_with_optimizer(path).result()
    assert_same_weights(restored, expected)
    assert restored.optim_steps == 1


def test_short_writes_are_continued(local_service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client = trained_lora(local_service)
    expected = adapter_weights(client)
    monkeypatch.setattr(os, "write", _faulty_write(local_service.checkpoint_root, ADAPTER, "short"))
    path = client.save_state("short-writes").result().path
    monkeypatch.undo()
    restored = local_service.create_training_client_from_state_with_optimizer(path).result()
    assert_same_weights(restored, expected)


def test_a_file_that_lands_truncated_on_disk_is_never_published(
    local_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = trained_lora(local_service)
    real_write_file = ckpt.write_file

    def lossy_write_file(path: Path, data: bytes) -> None:
        real_write_file(path, data[:-100] if path.name == ADAPTER else data)

    monkeypatch.setattr(ckpt, "write_file", lossy_write_file)
    with pytest.raises(CorruptCheckpointError, match=rf"\(while saving\): {ADAPTER} has \d+ bytes"):
        client.save_state("lossy").result()
    run = local_service.checkpoint_root / client.model_id / "weights"
    assert not run.exists() or list(run.iterdir()) == []
