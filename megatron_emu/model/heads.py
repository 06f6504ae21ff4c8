"""The two output heads and their per-micro-batch losses (last pipeline stage).

* LM head: vocab-parallel ``output_layer`` (untied), megatron-core's vocab-parallel
  cross-entropy on positions whose label is text.
* Regression head: ``project_down`` (LM hidden -> vision width, no bias), column-parallel over
  the vision width. MSE is separable over that width, so each TP rank sums the squared error
  of its columns and one scalar all-reduce completes it.

Losses of a micro-batch are means over that micro-batch (megatron-core then averages over
micro-batches and data-parallel ranks): ``lm_loss = sum(CE * mask) / max(1, sum(mask))``,
``reg_loss = sum((pred - target)^2) / max(1, R * width)`` for R regressed positions.
"""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class Emu2Heads(MegatronModule):
    """``forward(hidden [s(/tp), b, h], ...) -> dict of scalar losses``."""

    def __init__(self, config: TransformerConfig, vocab_size: int, padded_vocab: int,
                 vision_width: int, pg_collection: ProcessGroupCollection):
        super().__init__(config=config)
        self.tp_group = pg_collection.tp
        tp = torch.distributed.get_world_size(self.tp_group)
        rank = torch.distributed.get_rank(self.tp_group)
        # Padding columns of this rank's vocabulary shard: excluded from the softmax, so the
        # loss equals that of the trimmed (Hugging Face) model.
        cols = torch.arange(rank * padded_vocab // tp, (rank + 1) * padded_vocab // tp)
        self.register_buffer("_vocab_pad", cols >= vocab_size, persistent=False)
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
        """hidden ``[s(/tp), b, h]`` -> fp32 vocab-parallel logits ``[s, b, V/tp]`` with the
        padding columns at -inf (SP gathers the sequence inside ``output_layer``)."""
        logits, _ = self.output_layer(hidden)
        return logits.float().masked_fill(self._vocab_pad, float("-inf"))

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden ``[s(/tp), b, h]``; labels, mask ``[b, s]`` -> mean CE over the mask."""
        logits = self.logits(hidden)
        ce = vocab_parallel_cross_entropy(logits, labels.t().contiguous())
        ce = ce.t()  # [b, s]
        return (ce * mask).sum() / mask.sum().clamp(min=1)

    def regression_loss(self, hidden: torch.Tensor, reg_mask: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
        """hidden ``[s(/tp), b, h]``; reg_mask ``[b, s]`` bool; targets ``[R, width]`` (detached)
        in row-major order of the mask -> mean squared error over R x width."""
        pred, _ = self.project_down(hidden)  # [s, b, width/tp]
        pred = pred.transpose(0, 1)[reg_mask].float()  # [R, width/tp]
        tp = torch.distributed.get_world_size(self.tp_group)
        rank = torch.distributed.get_rank(self.tp_group)
        cols = self.vision_width // tp
        local_targets = targets[:, rank * cols:(rank + 1) * cols].float()
        sq = ((pred - local_targets) ** 2).sum()
        if tp > 1:
            sq = reduce_from_tensor_model_parallel_region(sq, self.tp_group)
        return sq / max(1, targets.shape[0] * self.vision_width)
