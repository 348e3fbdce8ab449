"""A loaded model with its worker thread, the weight views samplers see, and the forward helpers.

Every module is touched by exactly one worker thread (``ModelRuntime.worker``), so training steps,
snapshots and batched sampling on that module never interleave. Samplers that must see other
weights than the module's live ones (a frozen snapshot, an EMA teacher, the base model of a LoRA
student) apply a :class:`WeightView` for the duration of their batch: parameters are swapped by
re-binding module attributes (no copies) and restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sdft.backends.local._cpu_linear import use_onednn_linears
from sdft.backends.local._worker import SerialWorker
from sdft.models import load_model, load_tokenizer, max_context_length

# Logits of at most this many bytes are materialized at once (rows are processed in chunks).
LOGITS_CHUNK_BYTES = 128 * 2**20

_runtime_ids = itertools.count()


def pick_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return torch.device(device)


@dataclass
class WeightView:
    """Which weights a sampler sees on a shared module.

    ``rebinds`` maps (module, parameter name) to the parameter to use instead; ``disable_adapters``
    turns LoRA adapters off (the base model of a LoRA student). An empty view is the live model.
    """

    rebinds: list[tuple[nn.Module, str, nn.Parameter]] = field(default_factory=list)
    disable_adapters: bool = False
    label: str = "live"

    @contextlib.contextmanager
    def applied(self, runtime: ModelRuntime) -> Iterator[None]:
        saved = []
        try:
            for module, name, param in self.rebinds:
                saved.append((module, name, module._parameters[name]))
                module._parameters[name] = param
            if self.disable_adapters:
                with runtime.module.disable_adapter():
                    yield
            else:
                yield
        finally:
            for module, name, original in reversed(saved):
                module._parameters[name] = original


def frozen_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class ModelRuntime:
    """A causal LM on one device with the worker thread that owns it."""

    def __init__(
        self,
        module: nn.Module,
        *,
        base_model: str,
        tokenizer: Any,
        device: torch.device,
        label: str,
        fast_cpu_linear: bool = True,
    ) -> None:
        self.module = module
        if fast_cpu_linear and device.type == "cpu":
            use_onednn_linears(module)
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.device = device
        self.id = f"{label}-{next(_runtime_ids)}"
        self.worker = SerialWorker(self.id)
        hf_model = module.get_base_model() if hasattr(module, "get_base_model") else module
        self.hf_model = hf_model
        self.config = hf_model.config
        self.backbone = hf_model.get_decoder()
        self._cache_argument = kv_cache_argument(self.backbone)
        self.head = hf_model.get_output_embeddings()
        if self.head is None:
            raise ValueError(f"{base_model}: the model has no output embedding (lm_head)")
        self.vocab_size = (
            int(self.head.weight.shape[0])
            if hasattr(self.head, "weight")
            else int(self.config.vocab_size)
        )
        self.max_context = max_context_length(self.config)
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.eos_tokens = _eos_tokens(hf_model, tokenizer, self.vocab_size)
        # Sampling requests waiting to be coalesced into one batch (see _sampling).
        self.pending_lock = threading.Lock()
        self.pending: list[Any] = []
        self.drain_scheduled = False

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def close(self) -> None:
        self.worker.close()

    # --- forward helpers (call on the worker thread) ----------------------------------------

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Last hidden states ``(B, T, H)`` and, with ``use_cache``, the updated KV cache."""
        out = self.backbone(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            position_ids=None if position_ids is None else position_ids.to(self.device),
            use_cache=use_cache,
            **{self._cache_argument: cache},
        )
        return out.last_hidden_state, (getattr(out, self._cache_argument) if use_cache else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``hidden`` rows ``(R, H)`` -> ``(R, V)``."""
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def chunk_rows(self) -> int:
        return max(1, LOGITS_CHUNK_BYTES // (4 * self.vocab_size))

    def target_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``log p(targets[r, k] | row r)`` for hidden rows ``(R, H)``, targets ``(R, K)``.

        Differentiable when grad is enabled. Rows are processed in chunks of bounded size; with
        several chunks under autograd, each chunk's logits are recomputed in the backward pass
        instead of being kept alive.
        """
        rows = hidden.shape[0]
        targets = targets.to(self.device)
        if rows == 0:
            return torch.zeros(targets.shape, dtype=torch.float32, device=self.device)
        chunk = self.chunk_rows()
        if rows <= chunk:
            return self._target_logprobs_chunk(hidden, targets)
        parts = []
        recompute = torch.is_grad_enabled() and hidden.requires_grad
        for start in range(0, rows, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            if recompute:
                parts.append(
                    torch.utils.checkpoint.checkpoint(
                        self._target_logprobs_chunk, h, t, use_reentrant=False
                    )
                )
            else:
                parts.append(self._target_logprobs_chunk(h, t))
        return torch.cat(parts)

    def _target_logprobs_chunk(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # log_softmax + gather rather than gather - logsumexp: torch's fused log_softmax kernel is
        # 1.5-25x faster than logsumexp on CPU (forward and backward) and autograd keeps one
        # (rows, vocab) tensor either way; the logits themselves are freed right after.
        return torch.log_softmax(self.logits(hidden), dim=-1).gather(1, targets)

    def full_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary log-softmax of hidden rows ``(R, H)`` -> ``(R, V)`` float32."""
        return torch.log_softmax(self.logits(hidden), dim=-1)


def kv_cache_argument(backbone: nn.Module) -> str:
    """The name under which ``backbone.forward`` takes (and its output returns) the KV cache:
    ``cache`` since transformers renamed it (``past_key_values`` warns there, FutureWarning
    "deprecated ... will be removed in version 5.40.0"), ``past_key_values`` before."""
    parameters = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _eos_tokens(hf_model: Any, tokenizer: Any, vocab_size: int) -> frozenset[int]:
    ids: set[int] = set()
    generation = getattr(hf_model, "generation_config", None)
    for source in (
        getattr(generation, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return frozenset(i for i in ids if 0 <= i < vocab_size)


# --- building modules ---------------------------------------------------------------------


def load_base_module(name: str, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The frozen base model (all parameters ``requires_grad=False``)."""
    module = load_model(name, dtype=dtype, device=device)
    for param in module.parameters():
        param.requires_grad_(False)
    return module


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


def merged_lora_view(
    module: nn.Module, merged: list[tuple[nn.Module, torch.Tensor]], *, label: str
) -> WeightView:
    """A view that runs each LoRA layer's base linear with ``merged`` weights and adapters off.

    Only the adapted layer's own ``base_layer.weight`` is re-bound, so a tied input embedding keeps
    the base weights even when the (tied) lm_head is adapted.
    """
    return WeightView(
        rebinds=[
            (layer.base_layer, "weight", frozen_parameter(weight)) for layer, weight in merged
        ],
        disable_adapters=True,
        label=label,
    )


def trainable_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def parameter_bindings(module: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For every parameter (by identity), all (module, attribute) places that hold it (a tied
    weight has two)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((owner, name))
    return places


def view_replacing(
    module: nn.Module,
    replacements: dict[int, torch.Tensor],
    *,
    label: str,
    disable_adapters: bool = False,
) -> WeightView:
    """A view in which every place holding parameter ``id`` uses ``replacements[id]`` instead."""
    bindings = parameter_bindings(module)
    rebinds = []
    for param_id, tensor in replacements.items():
        param = frozen_parameter(tensor)
        for owner, name in bindings.get(param_id, []):
            rebinds.append((owner, name, param))
    return WeightView(rebinds=rebinds, disable_adapters=disable_adapters, label=label)
