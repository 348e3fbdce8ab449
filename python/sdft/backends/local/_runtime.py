"""A loaded model with its worker thread and the forward helpers every job runs through.

Every module is touched by exactly one worker thread (``ModelRuntime.worker``), so training steps,
snapshots and batched sampling on that module never interleave.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from typing import Any

import torch
from torch import nn

from sdft.backends.local._cpu_linear import use_onednn_linears
from sdft.backends.local._worker import SerialWorker
from sdft.models import max_context_length

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
