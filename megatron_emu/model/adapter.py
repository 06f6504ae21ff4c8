"""Visual -> LLM adapter: mean-pool of the patch grid to ``n_query`` tokens, then ``project_up``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def pool_patches(features: torch.Tensor, n_query: int) -> torch.Tensor:
    """Average-pool a square patch grid: ``[n, g*g, W] -> [n, n_query, W]`` (raster order).

    Emu2: 32x32 patches, kernel = stride = 4 -> 8x8 = 64 tokens.
    """
    n, tokens, width = features.shape
    grid, side = math.isqrt(tokens), math.isqrt(n_query)
    if grid * grid != tokens or side * side != n_query or grid % side:
        raise ValueError(f"cannot pool {tokens} patches to {n_query} tokens")
    x = features.transpose(1, 2).reshape(n, width, grid, grid)
    x = F.avg_pool2d(x, kernel_size=grid // side, stride=grid // side)
    return x.flatten(2).transpose(1, 2)


class Adapter(MegatronModule):
    """``project_up``: Linear(vision width -> LM hidden, no bias), column-parallel.

    ``forward(pooled [N, W]) -> [N, hidden]`` (gathered over TP: every TP rank holds the full
    embeddings, which replace ``<image>`` token embeddings before the SP scatter).
    """

    def __init__(self, config: TransformerConfig, vision_width: int, hidden: int,
                 pg_collection: ProcessGroupCollection):
        super().__init__(config=config)
        self.project_up = ColumnParallelLinear(
            vision_width, hidden, config=config, init_method=config.init_method,
            bias=False, gather_output=True, tp_group=pg_collection.tp,
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        out, _ = self.project_up(pooled.unsqueeze(1))  # [N, 1, hidden]
        return out.squeeze(1)
