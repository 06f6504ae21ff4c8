"""The EVA-CLIP vision tower of Emu2 (EVA-02-CLIP-E/14-plus) in plain torch, for transformers.

Written for megatron_emu (copied next to ``modeling_emu.py``). Module and parameter names are
those of BAAI's Hugging Face release (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``), so its weights load:

* patch embedding: Conv2d(3, width, patch, stride=patch) with bias, raster order;
* CLS token + learned absolute positions (``1 + grid^2`` of them);
* post-norm blocks: ``x = x + norm1(attn(x))``, ``x = x + norm2(mlp(x))``;
* attention: one fused ``qkv`` linear whose bias is ``q_bias | 0 | v_bias`` (rows [all q; all
  k; all v], head-major), softmax(q k^T / sqrt(head_dim)), no mask;
* MLP: fc1, exact GELU, fc2;
* no final norm: ``forward`` returns ``[batch, 1 + grid^2, width]`` (CLS first).
"""

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        self.image_size = image_size
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W]`` -> ``[b, grid * grid, width]``."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, n, head_dim]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_hidden: int, eps: float, postnorm: bool = True):
        super().__init__()
        self.postnorm = postnorm
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postnorm:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EVAVisionTransformer(nn.Module):
    """``vision_config`` (a dict with BAAI's keys) -> the ViT; ``forward(images)`` ->
    ``[b, 1 + grid^2, width]``."""

    def __init__(self, vision_config: dict):
        super().__init__()
        v = vision_config
        width, grid = v["width"], v["image_size"] // v["patch_size"]
        hidden = v.get("intermediate_size") or int(width * v["mlp_ratio"])
        self.patch_embed = PatchEmbed(v["image_size"], v["patch_size"], width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.blocks = nn.ModuleList(
            Block(width, width // v["head_width"], hidden, v.get("layer_norm_eps", 1e-6), v.get("postnorm", True))
            for _ in range(v["layers"]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images.to(self.pos_embed.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x
