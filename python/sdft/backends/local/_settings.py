"""What a training client is configured with: its LoRA adapter and the service's settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdft.backends.local._errors import CorruptCheckpointError


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter: rank, scale numerator, initialization seed and the adapted layers."""

    rank: int
    alpha: float
    seed: int | None
    train_mlp: bool
    train_attn: bool
    train_unembed: bool
    target_modules: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "seed": self.seed,
            "train_mlp": self.train_mlp,
            "train_attn": self.train_attn,
            "train_unembed": self.train_unembed,
            "target_modules": list(self.target_modules),
        }

    @classmethod
    def from_json(cls, lora: Any, shown: str) -> LoraSettings:
        """The settings a checkpoint's metadata records (``shown`` names it in errors)."""
        try:
            if not isinstance(lora, dict):
                raise TypeError(f"expected an object, got {type(lora).__name__}")
            seed = lora["seed"]
            targets = lora["target_modules"]
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise TypeError(f"seed {seed!r} is not an int")
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise TypeError("target_modules is not a list of strings")
            return cls(
                rank=int(lora["rank"]),
                alpha=float(lora["alpha"]),
                seed=seed,
                train_mlp=bool(lora["train_mlp"]),
                train_attn=bool(lora["train_attn"]),
                train_unembed=bool(lora["train_unembed"]),
                target_modules=tuple(targets),
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"checkpoint {shown}: LoRA settings unreadable ({exc})"
            ) from exc

    def same_adapter(self, other: LoraSettings) -> bool:
        """True when weights of one fit the other (the seed only sets the initialization)."""
        return (self.rank, self.alpha, self.target_modules) == (
            other.rank,
            other.alpha,
            other.target_modules,
        )


@dataclass(frozen=True)
class TrainingSettings:
    """The service-wide settings a training client works with (see ``LocalServiceClient``)."""

    checkpoint_root: Path
    train_batch_tokens: int
    merge_lora_for_sampling: bool
    tempered_logprobs: bool
