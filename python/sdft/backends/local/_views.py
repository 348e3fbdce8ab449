"""Weight views: what a sampler sees on a module it shares with its training client.

Samplers that must see other weights than the module's live ones (a frozen snapshot, an EMA
teacher, the base model of a LoRA student) apply a :class:`WeightView` for the duration of their
batch: parameters are swapped by re-binding module attributes (no copies) and restored afterwards.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
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
    ``W0 + scale * B @ A`` when it samples: sampling then runs one GEMM per layer instead of three
    (base, A, B). The snapshot itself keeps only its copy of the adapters (:class:`MergedLoraView`).
    """
    with torch.no_grad():
        copies = {id(p): p.detach().clone() for _, p in trainable}
    adapters = view_replacing(module, copies, label=label)
    if is_lora and merge_lora:
        return MergedLoraView(adapters=adapters, label=label)
    return adapters


class MergedViewCache:
    """The merged weights of the most recently used :class:`MergedLoraView` s of the process.

    A merged copy of the adapted layers is as large as those layers (hundreds of MB for a small
    model), while the adapters are megabytes. A server keeps many samplers alive (every refresh of
    every client makes one), so only ``capacity`` merged copies are kept in all; a view whose copy
    was evicted merges again when it next samples. Views of different models are applied on their
    runtimes' worker threads, hence the lock.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._merged: OrderedDict[int, tuple[weakref.ref[MergedLoraView], WeightView]] = (
            OrderedDict()
        )

    def get(self, view: MergedLoraView) -> WeightView | None:
        with self._lock:
            entry = self._merged.get(id(view))
            if entry is None or entry[0]() is not view:
                return None
            self._merged.move_to_end(id(view))
            return entry[1]

    def put(self, view: MergedLoraView, merged: WeightView) -> None:
        with self._lock:
            self._merged[id(view)] = (weakref.ref(view), merged)
            self._merged.move_to_end(id(view))
            for key in [k for k, (ref, _) in self._merged.items() if ref() is None]:
                del self._merged[key]
            while len(self._merged) > self.capacity:
                self._merged.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for ref, _ in self._merged.values() if ref() is not None)


MERGED_VIEWS = MergedViewCache()


@dataclass
class MergedLoraView(WeightView):
    """A LoRA snapshot held as its adapters; applied, it runs the merged weights
    ``W0 + scale * B @ A`` (computed on first use, kept in :data:`MERGED_VIEWS`)."""

    adapters: WeightView = field(default_factory=WeightView)

    @contextlib.contextmanager
    def applied(self, runtime: ModelRuntime) -> Iterator[None]:
        cache = MERGED_VIEWS
        merged = cache.get(self)
        if merged is None:
            # Plain tensors even when the batch runs under inference mode: the copy outlives it.
            with torch.inference_mode(False), torch.no_grad(), self.adapters.applied(runtime):
                weights = [
                    (layer, merged_lora_weight(layer)) for _, layer in lora_layers(runtime.module)
                ]
            merged = merged_lora_view(runtime.module, weights, label=self.label)
            cache.put(self, merged)
        with merged.applied(runtime):
            yield
