"""Building the modules clients run: the frozen base model, LoRA students sharing its weights,
full copies for full fine-tuning, and the module a checkpoint's metadata describes."""

from __future__ import annotations

import copy
import itertools
import threading
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from sdft.backends.local._errors import CorruptCheckpointError
from sdft.backends.local._settings import LoraSettings
from sdft.models import load_model, load_tokenizer


def load_base_module(name: str, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The frozen base model (all parameters ``requires_grad=False``)."""
    module = load_model(name, dtype=dtype, device=device)
    for param in module.parameters():
        param.requires_grad_(False)
    return module


class SharedBaseModels:
    """Base models loaded once per process and shared by every service client that asks for the
    same (name, device, dtype), for as long as one of them holds it.

    Each holder gets the loaded module (keep it to keep the weights alive) and its own module
    tree over the same tensors (:func:`share_structure`), so what a client changes on its modules
    (oneDNN linears, LoRA adapters, weight views) never reaches another's.
    """

    def __init__(self) -> None:
        self._loaded: weakref.WeakValueDictionary[tuple[str, str, torch.dtype], nn.Module] = (
            weakref.WeakValueDictionary()
        )
        self._locks: dict[tuple[str, str, torch.dtype], threading.Lock] = {}
        self._lock = threading.Lock()

    def get(
        self, name: str, *, device: torch.device, dtype: torch.dtype
    ) -> tuple[nn.Module, nn.Module]:
        """``(weights, module)``: the shared loaded model and a new module tree over it."""
        key = (name, str(device), dtype)
        with self._lock:
            key_lock = self._locks.setdefault(key, threading.Lock())
        with key_lock:  # one load per key; other models load in parallel
            weights = self._loaded.get(key)
            if weights is None:
                weights = load_base_module(name, device=device, dtype=dtype)
                self._loaded[key] = weights
        return weights, share_structure(weights)

    def loaded(self) -> int:
        """How many base models are held now."""
        return len(self._loaded)


SHARED_BASE_MODELS = SharedBaseModels()


def base_tokenizer(name: str) -> Any:
    return load_tokenizer(name)


def share_structure(base: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the base's own tensors (no copy).

    LoRA students and samplers built on one base model share its (frozen) weights this way; peft
    then injects adapters into the copy without touching the base.
    """
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


def trainable_copy(base: nn.Module) -> nn.Module:
    """A full copy of the base model with every parameter trainable (full fine-tuning)."""
    module = copy.deepcopy(base)
    for param in module.parameters():
        param.requires_grad_(True)
    return module


_ATTENTION_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "ffn", "feed_forward", "experts", "moe")


def lora_target_modules(
    hf_model: nn.Module, *, train_attn: bool, train_mlp: bool, train_unembed: bool
) -> list[str]:
    """Full names of the linear layers that get LoRA adapters (Tinker's three switches)."""
    decoder = hf_model.get_decoder()
    decoder_prefix = next(name for name, module in hf_model.named_modules() if module is decoder)
    head = hf_model.get_output_embeddings()
    targets = []
    for name, module in hf_model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module is head:
            if train_unembed:
                targets.append(name)
            continue
        if not name.startswith(decoder_prefix + "."):
            continue
        parts = name.lower().split(".")
        if any(p in part for part in parts for p in _ATTENTION_PARTS):
            if train_attn:
                targets.append(name)
        elif any(p in part for part in parts for p in _MLP_PARTS):
            if train_mlp:
                targets.append(name)
    if not targets:
        raise ValueError(
            "no linear layers matched the LoRA switches (train_attn, train_mlp, train_unembed)"
        )
    return targets


def make_lora_module(
    base: nn.Module,
    *,
    rank: int,
    alpha: float,
    seed: int | None,
    target_modules: list[str],
    base_model_name: str,
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=target_modules,
        base_model_name_or_path=base_model_name,
    )
    shared = share_structure(base)
    with torch.random.fork_rng(devices=_rng_devices(base)), warnings.catch_warnings():
        # Adapting a tied lm_head is deliberate: the adapter only changes the output projection.
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        # peft notes that the config names the resolved directory; the name is set back below.
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        if seed is not None:
            torch.manual_seed(seed)
        module = get_peft_model(shared, config)
    module.peft_config["default"].base_model_name_or_path = base_model_name
    module.eval()
    return module


def _rng_devices(module: nn.Module) -> list[int]:
    device = next(module.parameters()).device
    return [device.index or 0] if device.type == "cuda" else []


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, peft LoRA layer) pairs of a peft model with the ``default`` adapter."""
    from peft.tuners.lora import LoraLayer

    return [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, LoraLayer) and "default" in getattr(layer, "lora_A", {})
    ]


def lora_delta(layer: nn.Module) -> torch.Tensor:
    """The effective weight change ``scale * B @ A`` of one LoRA linear layer (out, in)."""
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    delta = (b.float() @ a.float()) * float(layer.scaling["default"])
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return delta


def merged_lora_weight(layer: nn.Module) -> torch.Tensor:
    """``W0 + scale * B @ A`` of one LoRA linear layer, in the base weight's dtype (a new tensor)."""
    base = layer.base_layer.weight
    return (base.detach().float() + lora_delta(layer)).to(base.dtype)


def trainable_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def build_module(
    base: nn.Module, lora: LoraSettings | None, *, base_model: str, trainable: bool
) -> nn.Module:
    """The module a client runs on ``base``: a LoRA model sharing the base weights (``lora``
    given; B = 0, so it starts as the base model) or a full copy (``lora`` None). ``trainable``
    False freezes every parameter (samplers)."""
    if lora is not None:
        module = make_lora_module(
            base,
            rank=lora.rank,
            alpha=lora.alpha,
            seed=lora.seed,
            target_modules=list(lora.target_modules),
            base_model_name=base_model,
        )
    else:
        module = trainable_copy(base)
        module.eval()
    if not trainable:
        for param in module.parameters():
            param.requires_grad_(False)
    return module


def checkpoint_adapter(meta: dict[str, Any], shown: str) -> LoraSettings | None:
    """The LoRA settings of a checkpoint's metadata, None for full fine-tuning weights."""
    training = meta.get("training")
    if training == "lora":
        return LoraSettings.from_json(meta.get("lora"), shown)
    if training == "full":
        return None
    raise CorruptCheckpointError(f"checkpoint {shown}: unknown training {training!r}")
