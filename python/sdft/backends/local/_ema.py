"""The EMA teacher: an exponential moving average of a training client's weights, refreshed
after every ``optim_step`` and sampled through a weight view on the student's own module."""

from __future__ import annotations

import torch
from torch import nn

from sdft.backends.local._modules import lora_layers, merged_lora_weight
from sdft.backends.local._views import WeightView, merged_lora_view, view_replacing


class EmaTeacher:
    """``ema <- (1 - alpha) * ema + alpha * weights`` after every update, starting at the current
    weights.

    Full fine-tuning averages every trainable parameter. LoRA averages the effective weights
    ``W0 + scale * B @ A`` of each adapted layer (averaging A and B separately would not average
    their product); the teacher runs with adapters off and the averaged weights in place.
    """

    def __init__(
        self,
        module: nn.Module,
        trainable: list[tuple[str, nn.Parameter]],
        *,
        is_lora: bool,
        alpha: float,
    ) -> None:
        self.alpha = alpha
        label = f"ema(alpha={alpha})"
        self._params = {id(p): p for _, p in trainable}
        self.tensors: dict[int, torch.Tensor] = {}
        self.layers: list[tuple[nn.Module, torch.Tensor]] = []
        # the averaged tensors by name (a LoRA layer's module name, a parameter's name)
        self.named: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if is_lora:
                named_layers = lora_layers(module)
                self.layers = [(layer, merged_lora_weight(layer)) for _, layer in named_layers]
                self.named = {
                    name: merged
                    for (name, _), (_, merged) in zip(named_layers, self.layers, strict=True)
                }
                self.view: WeightView = merged_lora_view(module, self.layers, label=label)
            else:
                self.tensors = {id(p): p.detach().clone() for _, p in trainable}
                self.named = {name: self.tensors[id(p)] for name, p in trainable}
                self.view = view_replacing(module, self.tensors, label=label)

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor], shown: str) -> None:
        """Continue from a saved average (:attr:`named` of an earlier teacher of the same model);
        ``ValueError`` naming ``shown`` when the names or shapes differ."""
        if set(tensors) != set(self.named):
            missing = sorted(set(self.named) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(self.named))[:3]
            raise ValueError(
                f"checkpoint {shown}: its EMA teacher holds other tensors than this model's "
                f"(missing {missing}, unexpected {extra})"
            )
        for name, target in self.named.items():
            saved = tensors[name]
            if saved.shape != target.shape:
                raise ValueError(
                    f"checkpoint {shown}: EMA tensor {name} has shape {tuple(saved.shape)}, "
                    f"this model's is {tuple(target.shape)}"
                )
            target.copy_(saved.to(dtype=target.dtype, device=target.device))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average toward the current weights (call after each optimizer step)."""
        for layer, merged in self.layers:
            merged.lerp_(merged_lora_weight(layer), self.alpha)
        for param_id, tensor in self.tensors.items():
            tensor.lerp_(self._params[param_id].detach(), self.alpha)
