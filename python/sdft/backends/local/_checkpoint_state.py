"""What a checkpoint holds: module weights and AdamW state as file contents, and back.

- LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's own format
  (``peft.PeftModel.from_pretrained(base_model, directory)`` loads it directly);
- full fine-tuning: ``config.json`` + ``model.safetensors`` in transformers' format
  (``AutoModelForCausalLM.from_pretrained(directory)`` loads it directly);
- state checkpoints also ``optimizer.safetensors`` (AdamW moments per parameter name) and
  ``optimizer.json`` (step counts, hyper-parameters, parameter names).

Nothing is unpickled: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdft.backends.local._checkpoints import load_tensors, require_files
from sdft.backends.local._errors import CorruptCheckpointError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FULL_WEIGHTS = "model.safetensors"
FULL_CONFIG = "config.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(
        {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()},
        metadata={"format": "pt"},
    )


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


# --- weights ------------------------------------------------------------------------------


def lora_files(module: nn.Module) -> dict[str, bytes]:
    """The ``default`` adapter of a peft model, as peft's ``save_pretrained`` lays it out."""
    from peft import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(module, adapter_name="default", save_embedding_layers=False)
    config = copy.deepcopy(module.peft_config["default"])
    config.inference_mode = True
    auto_mapping = None
    if config.task_type is None:
        # what peft records for models without a task type, so its Auto classes can load it
        base_class = type(module.get_base_model())
        auto_mapping = {
            "base_model_class": base_class.__name__,
            "parent_library": base_class.__module__,
        }
    with tempfile.TemporaryDirectory() as scratch:
        config.save_pretrained(scratch, auto_mapping_dict=auto_mapping)
        settings = (Path(scratch) / ADAPTER_CONFIG).read_bytes()
    return {ADAPTER_CONFIG: settings, ADAPTER_WEIGHTS: _safetensors_bytes(tensors)}


def full_files(hf_model: nn.Module) -> dict[str, bytes]:
    """Every parameter (tied weights once) and the config, as transformers saves a model."""
    with tempfile.TemporaryDirectory() as scratch:
        # transformers' own writer decides what config.json holds; its bytes are then written
        # (and checked) like every other checkpoint file
        hf_model.config.save_pretrained(scratch)
        config = (Path(scratch) / FULL_CONFIG).read_bytes()
    tensors = dict(hf_model.named_parameters())
    return {FULL_CONFIG: config, FULL_WEIGHTS: _safetensors_bytes(tensors)}


def load_lora_weights(module: nn.Module, directory: Path, meta: dict[str, Any], shown: str) -> None:
    """Load the adapter into a peft model whose adapter matches the checkpoint."""
    from peft import set_peft_model_state_dict

    require_files(meta, (ADAPTER_WEIGHTS,), shown)
    tensors = load_tensors(directory, ADAPTER_WEIGHTS, shown)
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


def load_full_weights(module: nn.Module, directory: Path, meta: dict[str, Any], shown: str) -> None:
    require_files(meta, (FULL_WEIGHTS,), shown)
    tensors = load_tensors(directory, FULL_WEIGHTS, shown)
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


def load_weights(
    module: nn.Module, *, is_lora: bool, directory: Path, meta: dict[str, Any], shown: str
) -> None:
    """Load a checkpoint's weights: the adapter into a peft model, or every parameter into a
    transformers model."""
    if is_lora:
        load_lora_weights(module, directory, meta, shown)
    else:
        load_full_weights(module, directory, meta, shown)


def weight_files(module: nn.Module, *, is_lora: bool) -> dict[str, bytes]:
    return lora_files(module) if is_lora else full_files(module)


# --- optimizer state ----------------------------------------------------------------------


def optimizer_files(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]], extra: dict[str, Any]
) -> dict[str, bytes]:
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for name, param in named:
        state = optimizer.state.get(param)
        if not state:
            continue
        steps[name] = float(state["step"])
        tensors[f"{name}::exp_avg"] = state["exp_avg"]
        tensors[f"{name}::exp_avg_sq"] = state["exp_avg_sq"]
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
    return {
        OPTIMIZER_TENSORS: _safetensors_bytes(tensors),
        OPTIMIZER_STATE: _json_bytes(state_json),
    }


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
    directory: Path,
    meta: dict[str, Any],
    shown: str,
) -> dict[str, Any]:
    """Put the saved AdamW moments and step counts back; returns the saved JSON state."""
    if OPTIMIZER_STATE not in meta["files"] or OPTIMIZER_TENSORS not in meta["files"]:
        raise CorruptCheckpointError(
            f"checkpoint {shown} has no optimizer state (it is a sampler checkpoint or was saved "
            "without one); use create_training_client_from_state to start with a fresh optimizer"
        )
    try:
        state = json.loads((directory / OPTIMIZER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: {OPTIMIZER_STATE} unreadable ({exc})"
        ) from exc
    tensors = load_tensors(directory, OPTIMIZER_TENSORS, shown)
    names = [name for name, _ in named]
    if not isinstance(state, dict) or state.get("param_names") != names:
        raise CorruptCheckpointError(
            f"checkpoint {shown}: optimizer state was saved for different parameters than this "
            "model has"
        )
    steps = state.get("steps")
    if not isinstance(steps, dict):
        raise CorruptCheckpointError(f"checkpoint {shown}: {OPTIMIZER_STATE} has no 'steps'")
    # fused / capturable AdamW keep the step count on the parameter's device
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    for name, param in named:
        if name not in steps:
            continue
        try:
            exp_avg = tensors[f"{name}::exp_avg"]
            exp_avg_sq = tensors[f"{name}::exp_avg_sq"]
            step = float(steps[name])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"checkpoint {shown}: optimizer state of {name} incomplete ({exc!r})"
            ) from exc
        if exp_avg.shape != param.shape or exp_avg_sq.shape != param.shape:
            raise CorruptCheckpointError(
                f"checkpoint {shown}: optimizer state of {name} has the wrong shape"
            )
        optimizer.state[param] = {
            "step": torch.tensor(
                step, dtype=torch.float32, device=param.device if on_device else "cpu"
            ),
            "exp_avg": exp_avg.to(device=param.device, dtype=param.dtype),
            "exp_avg_sq": exp_avg_sq.to(device=param.device, dtype=param.dtype),
        }
    return state


# --- EMA teachers -------------------------------------------------------------------------


def ema_files(
    averages: list[tuple[float, dict[str, torch.Tensor]]],
) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """The files of a training client's EMA teachers (``ema_<i>.safetensors``, in creation
    order) and their entries for the checkpoint's metadata (``{"alpha", "file"}``)."""
    contents: dict[str, bytes] = {}
    entries: list[dict[str, Any]] = []
    for index, (alpha, tensors) in enumerate(averages):
        name = f"ema_{index}.safetensors"
        contents[name] = _safetensors_bytes(tensors)
        entries.append({"alpha": alpha, "file": name})
    return contents, entries


def read_emas(
    directory: Path, meta: dict[str, Any], shown: str
) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """The EMA teachers saved with a state checkpoint: ``[(alpha, tensors by name), ...]``."""
    entries = meta.get("ema") or []
    if not isinstance(entries, list):
        raise CorruptCheckpointError(f"checkpoint {shown}: 'ema' must be a list")
    saved = []
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("alpha"), (int, float))
            and isinstance(entry.get("file"), str)
        ):
            raise CorruptCheckpointError(
                f"checkpoint {shown}: an 'ema' entry must be {{alpha, file}}, got {entry!r}"
            )
        require_files(meta, (entry["file"],), shown)
        saved.append((float(entry["alpha"]), load_tensors(directory, entry["file"], shown)))
    return saved
