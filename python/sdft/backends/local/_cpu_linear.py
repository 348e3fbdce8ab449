"""float32 linear layers on CPU through oneDNN instead of the default BLAS.

PyTorch's CPU ``F.linear`` runs float32 GEMMs through MKL, which picks slow code paths on AMD
processors; oneDNN (bundled with PyTorch, used by its bfloat16 path) runs the same float32 math
about twice as fast there, for the skinny decode GEMMs and the training GEMMs alike. This module
swaps the forward of ``nn.Linear`` layers for an autograd function whose forward and both backward
GEMMs are oneDNN float32 calls. Results equal ``F.linear`` up to float32 summation order.

Only float32 tensors on CPU take this path; anything else (CUDA, bfloat16, float16) calls
``F.linear`` unchanged. When the oneDNN op is missing or disagrees with ``F.linear`` on a probe,
nothing is swapped.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_linear_available() -> bool:
    """True when oneDNN's float32 linear exists here and matches ``F.linear`` on a probe."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(5, 24, generator=generator)
        w = torch.randn(7, 24, generator=generator)
        b = torch.randn(7, generator=generator)
        expected = F.linear(x, w, b)
        got = _onednn_linear(x, w, b)
        transposed = _onednn_linear(x.t().contiguous().t(), w.t().contiguous().t(), None)
    except (RuntimeError, AttributeError, TypeError):
        return False
    return bool(
        torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
        and torch.allclose(transposed, F.linear(x, w), rtol=1e-5, atol=1e-5)
    )


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = _onednn_linear(flat, weight, bias)
        ctx.save_for_backward(flat, weight)
        ctx.has_bias = bias is not None
        ctx.input_shape = x.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # grad_out @ W == linear(grad_out, W^T)
            grad_x = _onednn_linear(grad, weight.t(), None).reshape(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            # grad_out^T @ x == linear(grad_out^T, x^T)
            grad_w = _onednn_linear(grad.t(), flat.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.shape[-1] > 0
        and x.numel() > 0
    ):
        return _OneDnnLinear.apply(x, weight, self.bias)
    return F.linear(x, weight, self.bias)


def use_onednn_linears(module: nn.Module) -> int:
    """Route every ``nn.Linear`` of ``module`` through oneDNN for float32 CPU tensors.

    Returns how many layers were switched (0 when oneDNN is unavailable). Idempotent.
    """
    if not onednn_linear_available():
        return 0
    switched = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.forward = types.MethodType(_forward, layer)
            switched += 1
    return switched
