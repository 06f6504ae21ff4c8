"""megatron-core's fused vocab-parallel cross-entropy, with gradients in the logits' dtype.

megatron-core 0.16's ``fused_vocab_parallel_cross_entropy`` (softmax computed in place, the
predicted logit and the sum of exponentials all-reduced together) always casts the logits'
gradient to bf16. That is harmless in bf16 training but makes fp32 runs differ from the plain
path (about 2e-4 absolute on the gradients). This subclass keeps megatron-core's forward and
computes the same backward without the cast, so ``plain`` and ``fused`` agree exactly.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_cross_entropy import _VocabParallelCrossEntropy
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy


class _FusedVocabParallelCE(_VocabParallelCrossEntropy):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, tp_group):
        ctx.logits_dtype = vocab_parallel_logits.dtype
        return _VocabParallelCrossEntropy.forward(ctx, vocab_parallel_logits, target, tp_group)

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
