"""Weight views: what a sampler sees on a module it shares with its training client.

Samplers that must see other weights than the module's live ones (a frozen snapshot, an EMA
teacher, the base model of a LoRA student) apply a :class:`WeightView` for the duration of their
batch: parameters are swapped by re-binding module attributes (no copies) and restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from sdft.backends.local._modules import lora_layers, merged_lora_weight
from sdft.backends.local._runtime import ModelRuntime


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


def snapshot_view(
    module: nn.Module,
    trainable: list[tuple[str, nn.Parameter]],
    *,
    is_lora: bool,
    merge_lora: bool,
    label: str,
) -> WeightView:
    """A frozen copy of the current trainable weights as a view on ``module``.

    With ``merge_lora`` a LoRA model's adapters are merged into plain weights
    ``W0 + scale * B @ A``: sampling then runs one GEMM per layer instead of three (base, A, B),
    for one copy of the adapted weights.
    """
    with torch.no_grad():
        if is_lora and merge_lora:
            merged = [(layer, merged_lora_weight(layer)) for _, layer in lora_layers(module)]
            return merged_lora_view(module, merged, label=label)
        copies = {id(p): p.detach().clone() for _, p in trainable}
        return view_replacing(module, copies, label=label)
