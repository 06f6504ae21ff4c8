"""The two output heads and their per-micro-batch losses (last pipeline stage).

* LM head: vocab-parallel ``output_layer`` (untied) and cross-entropy on positions whose
  label is text: megatron-core's vocab-parallel CE (``plain``), its fused variant (``fused``:
  softmax and gradient computed in place), or torch's chunked linear + CE
  (``linear_chunked``, TP = 1: the ``[tokens, vocab]`` logits never exist).
* Regression head: ``project_down`` (LM hidden -> vision width, no bias), column-parallel over
  the vision width. MSE is separable over that width, so each TP rank sums the squared error
  of its columns and one scalar all-reduce completes it. ``fused`` (default) runs
  ``megatron_emu.ops.fused_linear_mse`` on the regressed rows only (chunked, gradients in
  forward); ``naive`` projects every position.

Losses of a micro-batch are means over that micro-batch (megatron-core then averages over
micro-batches and data-parallel ranks): ``lm_loss = sum(CE * mask) / max(1, sum(mask))``,
``reg_loss = sum((pred - target)^2) / max(1, R * width)`` for R regressed positions.
"""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class Emu2Heads(MegatronModule):
    """``forward(hidden [s(/tp), b, h], ...) -> dict of scalar losses``."""

    def __init__(self, config: TransformerConfig, vocab_size: int, padded_vocab: int,
                 vision_width: int, pg_collection: ProcessGroupCollection,
                 lm_ce_impl: str = "fused", regression_impl: str = "fused"):
        super().__init__(config=config)
        self.lm_ce_impl, self.regression_impl = lm_ce_impl, regression_impl
        self.vocab_size = vocab_size
        self.tp_group = pg_collection.tp
        tp = torch.distributed.get_world_size(self.tp_group)
        rank = torch.distributed.get_rank(self.tp_group)
        # Padding columns of this rank's vocabulary shard: excluded from the softmax, so the
        # loss equals that of the trimmed (Hugging Face) model.
        cols = torch.arange(rank * padded_vocab // tp, (rank + 1) * padded_vocab // tp)
        self.register_buffer("_vocab_pad", cols >= vocab_size, persistent=False)
        self._has_padding = (rank + 1) * padded_vocab // tp > vocab_size  # plain ints (meta-safe)
        self.output_layer = ColumnParallelLinear(
            config.hidden_size, padded_vocab, config=config, init_method=config.init_method,
            bias=False, gather_output=False, tp_group=self.tp_group,
        )
        self.project_down = ColumnParallelLinear(
            config.hidden_size, vision_width, config=config, init_method=config.init_method,
            bias=False, gather_output=False, tp_group=self.tp_group,
        )
        self.vision_width = vision_width

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[s(/tp), b, h]`` -> vocab-parallel logits ``[s, b, V/tp]`` (the parameters'
        dtype) with the padding columns at -inf, set in place: no copy of the logits (SP
        gathers the sequence inside ``output_layer``)."""
        logits, _ = self.output_layer(hidden)
        if self._has_padding:
            logits.masked_fill_(self._vocab_pad, float("-inf"))
        return logits

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden ``[s(/tp), b, h]``; labels, mask ``[b, s]`` -> mean CE over the mask."""
        if self.lm_ce_impl == "linear_chunked":
            return self._linear_chunked_ce(hidden, labels, mask)
        logits = self.logits(hidden)
        target = labels.t().contiguous()
        if self.lm_ce_impl == "fused":
            from megatron_emu.model.fused_ce import fused_vocab_parallel_cross_entropy

            ce = fused_vocab_parallel_cross_entropy(logits, target, self.tp_group)
        else:
            ce = vocab_parallel_cross_entropy(logits, target)
        ce = ce.t()  # [b, s]
        return (ce * mask).sum() / mask.sum().clamp(min=1)

    def _linear_chunked_ce(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """TP = 1: torch's chunked linear + cross-entropy over the true vocabulary rows."""
        if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise RuntimeError("model.loss.lm_ce_impl=linear_chunked needs torch >= 2.13 "
                               "(torch.nn.functional.linear_cross_entropy)")
        s, b, h = hidden.shape
        target = torch.where(mask.t() > 0, labels.t(), torch.full_like(labels.t(), -100)).reshape(-1)
        weight = self.output_layer.weight[: self.vocab_size]
        ce_sum = torch.nn.functional.linear_cross_entropy(
            hidden.reshape(s * b, h), weight, target, reduction="sum", ignore_index=-100,
            options=torch.nn.LinearCrossEntropyOptions())
        return ce_sum.float() / mask.sum().clamp(min=1)

    def regression_loss(self, hidden: torch.Tensor, rows: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
        """hidden ``[s(/tp), b, h]``; rows ``[R]`` of the gathered ``[s * b, h]`` view that are
        regressed; targets ``[R, width]`` (detached) -> mean squared error over R x width."""
        if self.regression_impl == "fused":
            return self._fused_regression(hidden, rows, targets)
        pred, _ = self.project_down(hidden)  # [s, b, width/tp]
        pred = pred.reshape(-1, pred.shape[-1]).index_select(0, rows).float()  # [R, width/tp]
        tp = torch.distributed.get_world_size(self.tp_group)
        rank = torch.distributed.get_rank(self.tp_group)
        cols = self.vision_width // tp
        local_targets = targets[:, rank * cols:(rank + 1) * cols].float()
        sq = ((pred - local_targets) ** 2).sum()
        if tp > 1:
            sq = reduce_from_tensor_model_parallel_region(sq, self.tp_group)
        return sq / max(1, targets.shape[0] * self.vision_width)

    def _fused_regression(self, hidden: torch.Tensor, rows: torch.Tensor,
                          targets: torch.Tensor) -> torch.Tensor:
        """Chunked linear + MSE on the regressed rows. The hidden states enter the TP region as
        ColumnParallelLinear's input would (all-gathered under SP, copied otherwise), so the
        backward of that region reduces the column shards' partial input gradients."""
        from megatron_emu.ops import fused_linear_mse

        tp = torch.distributed.get_world_size(self.tp_group)
        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True,
                                                          group=self.tp_group)
        elif tp > 1:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        s, b, h = hidden.shape
        return fused_linear_mse(hidden.reshape(s * b, h), self.project_down.weight, targets,
                                index=rows, tp_group=self.tp_group if tp > 1 else None)
