"""Checkpoints of the local backend: real files, written atomically, read without pickle.

Layout under ``checkpoint_root``::

    <run_id>/weights/<name>/           save_state: weights + optimizer state
    <run_id>/sampler_weights/<name>/   save_weights_for_sampler: weights only

addressed as ``local://<run_id>/weights/<name>`` (a plain filesystem path to such a directory is
accepted too). Each directory holds ``sdft_checkpoint.json`` (metadata and file sizes) and:

- LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's own format
  (``peft.PeftModel.from_pretrained(base_model, directory)`` loads it directly);
- full fine-tuning: ``config.json`` + ``model.safetensors`` in transformers' format
  (``AutoModelForCausalLM.from_pretrained(directory)`` loads it directly);
- state checkpoints also ``optimizer.safetensors`` (AdamW moments per parameter name) and
  ``optimizer.json`` (step counts, hyper-parameters, parameter names).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sdft._atomic import atomic_directory, write_json
from sdft.backends.local._errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LocalBadRequestError,
)

SCHEME = "local://"
META_FILE = "sdft_checkpoint.json"
FORMAT = "sdft-local-checkpoint"
FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FULL_WEIGHTS = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"

CheckpointKind = Literal["weights", "sampler_weights"]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


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
        if len(parts) != 3 or parts[1] not in ("weights", "sampler_weights") or not all(parts):
            raise LocalBadRequestError(
                f"malformed local checkpoint path {text!r}; expected "
                "local://<run_id>/weights/<name> or local://<run_id>/sampler_weights/<name>"
            )
        run_id, kind, name = parts
        if not _NAME.match(run_id) or not _NAME.match(name):
            raise LocalBadRequestError(f"malformed local checkpoint path {text!r}")
        return checkpoint_directory(root, run_id, kind, name)  # type: ignore[arg-type]
    return Path(text).expanduser()


def read_meta(directory: Path, shown: str) -> dict[str, Any]:
    """The checkpoint's metadata, after checking every listed file is present and complete."""
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
    if meta.get("version") != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: format version {meta.get('version')} is not supported "
            f"(this sdft reads version {FORMAT_VERSION})"
        )
    for key in ("training", "base_model", "files"):
        if key not in meta:
            raise CorruptCheckpointError(f"checkpoint {shown}: {meta_path} has no {key!r}")
    for file_name, size in meta["files"].items():
        file_path = directory / file_name
        if not file_path.is_file():
            raise CorruptCheckpointError(f"checkpoint {shown}: {file_name} is missing")
        actual = file_path.stat().st_size
        if actual != size:
            raise CorruptCheckpointError(
                f"checkpoint {shown}: {file_name} has {actual} bytes, {size} were written "
                "(truncated or modified)"
            )
    return meta


def _load_tensors(path: Path, shown: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: cannot read {path.name} ({exc})"
        ) from exc


# --- writing ------------------------------------------------------------------------------


def write_checkpoint(
    directory: Path,
    *,
    meta: dict[str, Any],
    module: nn.Module,
    is_lora: bool,
    optimizer: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
    overwrite: bool,
    shown: str,
) -> None:
    """Write a checkpoint directory atomically (readers never see a partial one)."""
    from safetensors.torch import save_file

    if directory.exists() and not overwrite:
        raise CheckpointExistsError(
            f"checkpoint {shown} already exists; pass overwrite=True to replace it"
        )
    with atomic_directory(directory) as tmp:
        if is_lora:
            with _quiet_peft():
                module.save_pretrained(str(tmp), save_embedding_layers=False)
            (tmp / "README.md").unlink(missing_ok=True)
        else:
            hf_model = module
            hf_model.config.save_pretrained(str(tmp))
            tensors = {
                name: p.detach().to("cpu").contiguous() for name, p in hf_model.named_parameters()
            }
            save_file(tensors, str(tmp / FULL_WEIGHTS), metadata={"format": "pt"})
        if optimizer is not None:
            tensors, state = optimizer
            save_file(tensors, str(tmp / OPTIMIZER_TENSORS), metadata={"format": "pt"})
            write_json(tmp / OPTIMIZER_STATE, state)
        files = {
            child.name: child.stat().st_size for child in sorted(tmp.iterdir()) if child.is_file()
        }
        write_json(
            tmp / META_FILE,
            {
                **meta,
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "created_unix": time.time(),
                "files": files,
            },
        )


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft warns that a tied lm_head is adapted; that is deliberate here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*tied.*")
        yield


# --- reading weights ----------------------------------------------------------------------


def load_lora_weights(module: nn.Module, directory: Path, shown: str) -> None:
    """Load ``adapter_model.safetensors`` into a peft model whose adapter matches the checkpoint."""
    from peft import set_peft_model_state_dict

    tensors = _load_tensors(directory / ADAPTER_WEIGHTS, shown)
    expected = {
        name for name, _ in module.named_parameters() if ".lora_A." in name or ".lora_B." in name
    }
    try:
        result = set_peft_model_state_dict(module, tensors)
    except RuntimeError as exc:  # shape mismatch
        raise CorruptCheckpointError(
            f"checkpoint {shown}: adapter does not fit the model ({exc})"
        ) from exc
    missing = sorted(name for name in result.missing_keys if name in expected)
    if missing or result.unexpected_keys:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: adapter tensors do not match the model (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]})"
        )


def load_full_weights(module: nn.Module, directory: Path, shown: str) -> None:
    tensors = _load_tensors(directory / FULL_WEIGHTS, shown)
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: weights do not match the model (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CorruptCheckpointError(
                    f"checkpoint {shown}: {name} has shape {tuple(tensor.shape)}, the model "
                    f"expects {tuple(param.shape)}"
                )
            param.copy_(tensor)


# --- optimizer state ----------------------------------------------------------------------


def optimizer_payload(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]], extra: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for name, param in named:
        state = optimizer.state.get(param)
        if not state:
            continue
        steps[name] = float(state["step"])
        tensors[f"{name}::exp_avg"] = state["exp_avg"].detach().to("cpu").contiguous()
        tensors[f"{name}::exp_avg_sq"] = state["exp_avg_sq"].detach().to("cpu").contiguous()
    group = optimizer.param_groups[0]
    state_json = {
        "optimizer": "adamw",
        "param_names": [name for name, _ in named],
        "steps": steps,
        "last_hyperparameters": {
            "lr": float(group["lr"]),
            "betas": [float(b) for b in group["betas"]],
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
        },
        **extra,
    }
    return tensors, state_json


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
    directory: Path,
    shown: str,
) -> dict[str, Any]:
    """Put the saved AdamW moments and step counts back; returns the saved JSON state."""
    state_path = directory / OPTIMIZER_STATE
    if not state_path.is_file() or not (directory / OPTIMIZER_TENSORS).is_file():
        raise CorruptCheckpointError(
            f"checkpoint {shown} has no optimizer state (it is a sampler checkpoint or was saved "
            "without one); use create_training_client_from_state to start with a fresh optimizer"
        )
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: {OPTIMIZER_STATE} unreadable ({exc})"
        ) from exc
    tensors = _load_tensors(directory / OPTIMIZER_TENSORS, shown)
    names = [name for name, _ in named]
    if state.get("param_names") != names:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: optimizer state was saved for different parameters than this "
            "model has"
        )
    for name, param in named:
        if name not in state["steps"]:
            continue
        try:
            exp_avg = tensors[f"{name}::exp_avg"]
            exp_avg_sq = tensors[f"{name}::exp_avg_sq"]
        except KeyError as exc:
            raise CorruptCheckpointError(
                f"checkpoint {shown}: optimizer tensor {exc} missing"
            ) from exc
        if exp_avg.shape != param.shape or exp_avg_sq.shape != param.shape:
            raise CorruptCheckpointError(
                f"checkpoint {shown}: optimizer state of {name} has the wrong shape"
            )
        # fused / capturable AdamW keep the step count on the parameter's device
        on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
        optimizer.state[param] = {
            "step": torch.tensor(
                state["steps"][name],
                dtype=torch.float32,
                device=param.device if on_device else "cpu",
            ),
            "exp_avg": exp_avg.to(device=param.device, dtype=param.dtype),
            "exp_avg_sq": exp_avg_sq.to(device=param.device, dtype=param.dtype),
        }
    return state
