"""Fused vocab-parallel cross-entropy without host synchronisation, gradients in the logits' dtype.

megatron-core 0.16's ``fused_vocab_parallel_cross_entropy`` (softmax computed in place, the
predicted logit and the sum of exponentials all-reduced together) has two properties we do not
want: it always casts the logits' gradient to bf16 (2e-4 absolute error in fp32 runs), and it
zeroes out-of-shard targets with boolean-mask assignment (``x[mask] = 0``), which on a GPU is a
``nonzero`` and so a device-to-host sync per micro-batch. This Function keeps megatron-core's
math and its backward helpers, with ``masked_fill`` for the masking and no cast, so ``plain``
(megatron-core's reference) and ``fused`` agree exactly.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_cross_entropy import _VocabParallelCrossEntropy
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility


def _predicted_logits(logits: torch.Tensor, target: torch.Tensor, logits_max: torch.Tensor,
                      start: int, end: int):
    """megatron-core's ``calculate_predicted_logits`` (fused form) with mask-free indexing.

    logits ``[s, b, V/tp]`` fp32 (overwritten with its exponentials), target ``[s, b]`` ->
    (target_mask ``[s, b]``, masked_target_1d ``[s*b]``, cat(predicted, sum_exp) ``[2s, b]``,
    exp_logits ``[s, b, V/tp]``)."""
    logits -= logits_max.unsqueeze(dim=-1)
    target_mask = (target < start) | (target >= end)
    masked_target_1d = (target - start).masked_fill(target_mask, 0).view(-1)
    logits_2d = logits.view(-1, logits.shape[-1])
    arange_1d = torch.arange(logits_2d.shape[0], device=logits_2d.device)
    predicted = logits_2d[arange_1d, masked_target_1d].view_as(target).masked_fill(target_mask, 0.0)
    torch.exp(logits, out=logits)
    return target_mask, masked_target_1d, torch.cat((predicted, logits.sum(dim=-1))), logits


class _FusedVocabParallelCE(_VocabParallelCrossEntropy):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, tp_group):
        ctx.logits_dtype = vocab_parallel_logits.dtype
        logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(vocab_parallel_logits)
        torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.shape[-1], tp_group.rank(), tp_group.size())
        target_mask, masked_target_1d, pred_sum, exp_logits = _predicted_logits(
            logits, target, logits_max, start, end)
        torch.distributed.all_reduce(pred_sum, op=torch.distributed.ReduceOp.SUM, group=tp_group)
        predicted, sum_exp = torch.split(pred_sum, pred_sum.shape[0] // 2)
        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(
            exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, softmax_update, grad_input = \
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
        grad_input = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange_1d, masked_target_1d, softmax_update, grad_input, grad_output)
        return grad_input.to(ctx.logits_dtype), None, None


def fused_vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group) -> torch.Tensor:
    """logits ``[s, b, V/tp]`` (vocab-parallel), target ``[s, b]`` -> per-token CE ``[s, b]``."""
    return _FusedVocabParallelCE.apply(logits, target, tp_group)
