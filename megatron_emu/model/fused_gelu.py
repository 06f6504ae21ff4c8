"""Bias + exact (erf) GELU, fused (the EVA ViT's MLP activation).

megatron-core's fused bias-GELU computes the tanh approximation; EVA-CLIP uses the exact GELU,
so the ViT fuses its own: one elementwise kernel forward and one backward through
megatron-core's ``jit_fuser`` (torch.compile / TorchScript). The CPU reference of this kernel is
``torch.nn.functional.gelu(x + bias)``; a test compares the two, values and gradients.
"""

from __future__ import annotations

import torch
from megatron.core.jit import jit_fuser

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jit_fuser
def _forward(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = bias + y
    return x * 0.5 * (1.0 + torch.erf(x * _INV_SQRT2))


@jit_fuser
def _backward(g: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = bias + y
    cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT2))
    return g * (cdf + x * _INV_SQRT_2PI * torch.exp(-0.5 * x * x))


class _BiasGeLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, bias)
        return _forward(bias, y)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        y, bias = ctx.saved_tensors
        grad = _backward(g, bias, y)
        return grad, grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)


def bias_gelu_exact(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(y + bias)`` (exact) for y ``[..., f]``, bias ``[f]``; fused forward and backward."""
    return _BiasGeLU.apply(y, bias)
