"""Fresh values for model tensors that a conversion input does not provide (``hf-to-mcore
--llama``: the adapter, the regression head, Emu2's added vocabulary rows and, without
``--vision``, the ViT), one tensor at a time so the converter never builds the model.

The rules are the model's own initialisation (megatron-core's ``init_method`` /
``output_layer_init_method``, zero biases, unit norms, and ``model/vision.py``'s embeddings);
``tests/conversion/test_stream.py`` holds them against a really initialised model. Values
come from a generator seeded by (seed, canonical name), so they do not depend on the layout the
checkpoint is written at.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

_NORM = re.compile(r"(layernorm|post_norm)\.(weight|bias)$|\.layer_norm_weight$")
_OUTPUT = re.compile(r"\.(self_attention\.linear_proj|mlp\.linear_fc2)\.weight$")


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def fresh_tensor(name: str, shape: tuple[int, ...], cfg, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, start_row: int = 0) -> torch.Tensor:
    """The initial value of canonical tensor ``name`` (``vision.blocks.layers.3.mlp.linear_fc2.weight``,
    ``embedding.word_embeddings.weight``, ...) with the full, unsharded ``shape``; with
    ``start_row``, only rows ``start_row:`` (e.g. vocabulary rows an input lacks), drawn on
    their own so the rest is never materialised."""
    seed = cfg.train.seed if seed is None else seed
    std = cfg.model.init_method_std
    gen = _generator(seed, name if not start_row else f"{name}[{start_row}:]")
    shape = (shape[0] - start_row, *shape[1:])
    if _NORM.search(name):
        return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)
    if name.endswith(".bias") and not name.startswith("vision.patch_embed"):
        return torch.zeros(shape, dtype=dtype)  # megatron-core zeroes linear biases
    if name.startswith("vision.patch_embed."):  # torch.nn.Conv2d's default initialisation
        fan_in = 3 * cfg.model.vision.patch_size ** 2
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=gen) * 2 * bound - bound).to(dtype)
    if _OUTPUT.search(name):
        layers = cfg.model.vision.num_layers if name.startswith("vision.") else cfg.model.lm.num_layers
        std = std / math.sqrt(2.0 * layers)
    return (torch.randn(shape, generator=gen) * std).to(dtype)
