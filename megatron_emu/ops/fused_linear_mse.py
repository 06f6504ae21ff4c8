"""Chunked linear + MSE that never materialises the full ``[M, D]`` prediction.

``fused_linear_mse(hidden, weight, target)`` equals
``F.mse_loss(F.linear(hidden[index], weight, bias), target)`` in value and gradients. The
forward walks the M regressed rows in chunks: gather the chunk's rows of ``hidden``, one GEMM
into a ``[chunk, D]`` buffer, the ``l2_loss_grad_`` kernel (per-row squared error; the buffer
becomes dL/dpred in place), then the chunk's contributions to ``grad_hidden``, ``grad_weight``
and ``grad_bias``. Only the gradients are kept; backward scales them by the incoming gradient
(in place, so a second backward raises unless ``allow_retain_graph=True``).

Tensor parallelism: with ``tp_group`` the weight (and bias) is this rank's column shard
``[D/tp, H]`` of a column-parallel head and ``target`` the full ``[M, D]`` or the matching
``[M, D/tp]`` slice. MSE is separable over columns: each rank sums its squared error, one
scalar all-reduce completes the loss (it always runs, also with no rows, so the group cannot
deadlock), and the mean is over ``M x D``. ``grad_hidden`` is this rank's partial sum over its
columns: the caller reduces it across the group, which is what the backward of megatron-core's
``copy_to_tensor_model_parallel_region`` (all-reduce) or, under sequence parallelism,
``gather_from_sequence_parallel_region`` (reduce-scatter) does anyway.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from megatron_emu.ops._ext import l2_loss_grad_


def default_chunk_size(rows: int, in_features: int, out_features: int) -> int:
    """Rows per chunk. ``D <= H`` (Emu2: 1792 < 6656): one chunk. The ``[M, D]`` buffer is then
    no larger than ``grad_hidden`` ``[M, H]``, which must exist anyway, so chunking would save
    little while costing GEMM efficiency and an fp32 weight-gradient accumulator (measured on an
    H100 in bf16: 1.30x the naive peak and 2.4x its time with 8 chunks, see
    docs/benchmarks.md). ``D > H``: a ``[chunk, D]`` buffer of about 1/8 of ``[M, D]`` (at
    least 256 rows), shrunk further as ``D / H`` grows."""
    if out_features <= in_features:
        return max(1, rows)
    ratio = math.ceil(out_features / max(1, in_features))
    target = max(1, math.ceil(rows / (8 * ratio)))
    return max(256, 1 << (target - 1).bit_length())


class _FusedLinearMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, index, reduction, chunk_size, tp_group,
                allow_retain_graph, backend):
        rows, d_local = target.shape[0], weight.shape[0]
        tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        opmath = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        scale = 1.0 / max(1, rows * d_local * tp) if reduction == "mean" else 1.0
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if (index is not None or rows == 0) and want_h else \
            (torch.empty_like(hidden) if want_h else None)
        single = chunk_size >= rows
        w_acc = weight.dtype if single else torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=w_acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(d_local, dtype=torch.promote_types(bias.dtype, torch.float32),
                             device=bias.device) if want_b else None
        total = torch.zeros((), dtype=opmath, device=hidden.device)
        for start in range(0, rows, chunk_size):
            stop = min(rows, start + chunk_size)
            if index is not None:
                rows_idx = index[start:stop]
                h_c = hidden.index_select(0, rows_idx)
            else:
                h_c = hidden[start:stop]
            buf = torch.addmm(bias, h_c, weight.t()) if bias is not None else torch.mm(h_c, weight.t())
            t_c = target[start:stop]
            if t_c.dtype != buf.dtype or not t_c.is_contiguous():
                t_c = t_c.to(buf.dtype).contiguous()
            total += l2_loss_grad_(buf, t_c, scale, backend).sum()
            if want_h and index is not None:
                grad_h.index_add_(0, rows_idx, torch.mm(buf, weight))
            elif want_h:  # straight into the gradient's rows: no [chunk, H] temporary
                torch.mm(buf, weight, out=grad_h[start:stop])
            if want_w and buf.dtype == w_acc:
                grad_w.addmm_(buf.t(), h_c)
            elif want_w:  # bf16/fp16 chunks into an fp32 accumulator
                grad_w += torch.mm(buf.t(), h_c).to(w_acc)
            if want_b:
                grad_b += buf.sum(0, dtype=grad_b.dtype)
        loss = total * scale
        if tp_group is not None and tp > 1:
            torch.distributed.all_reduce(loss, group=tp_group)
        ctx.allow_retain_graph = allow_retain_graph
        ctx.used = False
        ctx.save_for_backward(
            grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.used and not ctx.allow_retain_graph:
            raise RuntimeError("fused_linear_mse: backward ran twice; its gradients are computed "
                               "in forward and scaled in place (pass allow_retain_graph=True)")
        ctx.used = True
        scaled = []
        for g in ctx.saved_tensors:
            if g is None:
                scaled.append(None)
            elif ctx.allow_retain_graph:
                scaled.append(g * grad_out.to(g.dtype))
            else:
                scaled.append(g.mul_(grad_out.to(g.dtype)))
        grad_h, grad_w, grad_b = scaled
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def fused_linear_mse(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                     bias: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None,
                     reduction: str = "mean", chunk_size: Optional[int] = None,
                     tp_group=None, allow_retain_graph: bool = False,
                     backend: str = "auto") -> torch.Tensor:
    """MSE of ``linear(hidden[index], weight, bias)`` against ``target``, chunked and fused.

    hidden ``[T, H]``; weight ``[D, H]`` (this rank's ``[D/tp, H]`` shard with ``tp_group``);
    bias ``[D]`` or None; target ``[M, D]`` (or ``[M, D/tp]``); index ``[M]`` int64 rows of
    ``hidden`` (None: ``hidden`` has exactly M rows). Returns a 0-d loss (fp32; fp64 for fp64
    inputs): the mean over ``M x D`` elements (``reduction="mean"``) or the sum. ``backend``:
    ``auto`` (the C++/CUDA extension when built), ``ext`` or ``torch``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or target.dim() != 2:
        raise ValueError(f"expected hidden [T, H], weight [D, H], target [M, D]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden width {hidden.shape[1]} != weight in_features {weight.shape[1]}")
    tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    d_local = weight.shape[0]
    if target.shape[1] == d_local * tp and tp > 1:
        rank = torch.distributed.get_rank(tp_group)
        target = target[:, rank * d_local:(rank + 1) * d_local]
    elif target.shape[1] != d_local:
        raise ValueError(f"target width {target.shape[1]} matches neither the weight shard "
                         f"({d_local}) nor the full head ({d_local * tp})")
    if index is None:
        if hidden.shape[0] != target.shape[0]:
            raise ValueError(f"without index, hidden needs exactly {target.shape[0]} rows "
                             f"(one per target), got {hidden.shape[0]}")
    else:
        index = index.to(device=hidden.device, dtype=torch.long)
        if index.dim() != 1 or index.shape[0] != target.shape[0]:
            raise ValueError(f"index must be [M={target.shape[0]}], got {tuple(index.shape)}")
    chunk = chunk_size or default_chunk_size(target.shape[0], hidden.shape[1], d_local * tp)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _FusedLinearMSE.apply(hidden.contiguous(), weight, bias, target, index, reduction, chunk,
                                 tp_group, allow_retain_graph, backend)
