"""The global gradient norm and clipping, without host synchronisation.

megatron-core computes the norm with ``get_grad_norm_fp32``, which returns a Python float (one
``.item()``) and, without apex / Transformer Engine, falls back to a multi-tensor L2 norm that
converts every per-tensor norm to a float (one sync per parameter tensor); its
``clip_grad_norm`` then computes the norm a second time. Here the norm stays a device scalar:
``torch._foreach_norm`` over the main gradients, one all-reduce of the sum of squares per
optimizer over its grad-stats group (the model-parallel group, or the whole world with the
distributed optimizer, as megatron-core reduces it), and clipping scales the gradients by
``min(1, max_norm / (norm + 1e-6))`` as a tensor. The same value serves the finiteness check,
clipping and the logs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    opts = chained if chained is not None else [optimizer]
    return [o for o in opts if not getattr(o, "is_stub_optimizer", False)]


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[1]`` float32: sum over tensors of their squared L2 norms."""
    if not grads:
        return torch.zeros(1, dtype=torch.float32, device=device)
    norms = torch._foreach_norm(grads, 2.0)
    return torch.stack(norms).float().square().sum().reshape(1)


def global_grad_norm(optimizer, device: torch.device) -> torch.Tensor:
    """``[]`` float32 device scalar: the L2 norm of every main gradient of the model (each
    gradient counted once across TP/PP/DP, as megatron-core counts it)."""
    total = torch.zeros(1, dtype=torch.float32, device=device)
    for opt in _optimizers(optimizer):
        grads = [g.to_local() if hasattr(g, "to_local") else g
                 for g in opt.get_main_grads_for_grad_norm()]
        sq = _sum_of_squares(grads, device)
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=opt.get_grad_stats_parallel_group())
        total = total + sq
    return total.sqrt()[0]


def clip_grads_(optimizer, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every main gradient by ``min(1, max_norm / (total_norm + 1e-6))`` in place (a
    factor of exactly 1 leaves the gradients bit-identical)."""
    if max_norm <= 0:
        return
    coeff = (max_norm / (total_norm.float() + 1.0e-6)).clamp(max=1.0)
    for opt in _optimizers(optimizer):
        decoupled = getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
        grads = []
        for p in opt.get_parameters():
            g = getattr(p, "decoupled_grad", None) if decoupled else p.grad
            if g is not None:
                grads.append(g.to_local() if hasattr(g, "to_local") else g)
        if grads:
            torch._foreach_mul_(grads, coeff)
