"""EVA-CLIP-style vision encoder built from megatron-core transformer layers.

Patch embedding (conv, kernel = stride = patch, with bias) -> CLS token + learned absolute
positions -> post-norm blocks (TP; SP pads the token sequence to a multiple of TP and masks
the padding keys) -> no final norm -> CLS dropped.
"""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_emu.config.schema import VisionConfig
from megatron_emu.model import specs


class VisionEncoder(MegatronModule):
    """``forward(images [n, 3, H, W]) -> patch features [n, grid*grid, width]``."""

    def __init__(
        self,
        config: TransformerConfig,
        vision: VisionConfig,
        impl: str,
        pg_collection: ProcessGroupCollection,
        attention_backend: str = "auto",
    ):
        super().__init__(config=config)
        self.vision = vision
        self.pg_collection = pg_collection
        grid = vision.image_size // vision.patch_size
        self.num_tokens = grid * grid + 1
        tp = pg_collection.tp.size()
        self.sp = config.sequence_parallel
        self.padded_tokens = -(-self.num_tokens // tp) * tp if self.sp else self.num_tokens
        masked = self.padded_tokens != self.num_tokens
        dtype = config.params_dtype
        std = config.init_method_std
        # Replicated over TP: every TP rank computes the same embedding from the same weights.
        self.patch_embed = torch.nn.Conv2d(3, vision.width, vision.patch_size, vision.patch_size,
                                           bias=True, dtype=dtype)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, vision.width, dtype=dtype) * std)
        self.pos_embed = torch.nn.Parameter(
            torch.randn(1, self.num_tokens, vision.width, dtype=dtype) * std)
        layer = specs.vision_layer_spec(impl, vision.qkv_bias, vision.postnorm, masked, attention_backend)
        self.blocks = TransformerBlock(
            config=config,
            spec=specs.block_spec(layer, vision.num_layers, impl, with_final_norm=False),
            post_layer_norm=False,
            pre_process=True,
            post_process=False,
            pg_collection=pg_collection,
        )
        if masked:
            keep = torch.arange(self.padded_tokens) >= self.num_tokens
            self.register_buffer("_pad_mask", keep.view(1, 1, 1, -1), persistent=False)
        else:
            self._pad_mask = None
        specs.bind_tp_group(self, pg_collection.tp)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[n, 3, H, W]`` (normalised) -> features ``[n, grid*grid, width]``."""
        n = images.shape[0]
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # [n, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [n, g*g, W], raster order
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1) + self.pos_embed
        x = x.transpose(0, 1).contiguous()  # [S, n, W]
        mask = None
        if self.sp:
            pad = self.padded_tokens - self.num_tokens
            if pad:
                x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
                mask = self._pad_mask
            x = scatter_to_sequence_parallel_region(x, group=self.pg_collection.tp)
        x = self.blocks(hidden_states=x, attention_mask=mask)
        if self.sp:
            x = gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=self.pg_collection.tp)
        return x[1:self.num_tokens].transpose(0, 1)  # drop CLS (and padding): [n, g*g, W]
