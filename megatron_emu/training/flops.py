"""Analytic model FLOPs of one training step (for TFLOP/s and MFU).

Counted as model FLOPs (2 per multiply-add; training = forward + backward = 3x forward for
trained parts, 1x for frozen ones, activation recomputation not counted, as in MFU):

- ViT, per image with ``n = 1 + (image/patch)^2`` tokens of width ``w``, MLP ``m``, per layer:
  QKV ``2*n*w*3w`` + scores and weighted sum ``4*n^2*w`` + projection ``2*n*w^2`` + MLP
  ``4*n*w*m``; plus the patch embedding ``2*(n-1)*3*p^2*w``.
- Adapter: ``2*q*w*h`` per image (``q`` visual tokens, ``project_up``).
- LM, per token with hidden ``h``, FFN ``f``, ``L`` layers, sequence ``s``, KV width ``k``:
  QKV ``2*h*(h + 2k)`` + attention ``4*s*h`` (full, causal not halved, the usual convention)
  + output ``2*h^2`` + SwiGLU MLP ``6*h*f``.
- Heads, per token: LM head ``2*h*V`` and ``project_down`` ``2*h*w`` (computed at every
  position).
"""

from __future__ import annotations

from megatron_emu.config import derived
from megatron_emu.config.schema import EmuConfig


def vit_forward_flops_per_image(cfg: EmuConfig) -> float:
    v = cfg.model.vision
    n = 1 + (v.image_size // v.patch_size) ** 2
    w, m = v.width, v.mlp_dim
    per_layer = 2 * n * w * 3 * w + 4 * n * n * w + 2 * n * w * w + 4 * n * w * m
    return v.num_layers * per_layer + 2 * (n - 1) * 3 * v.patch_size ** 2 * w


def lm_forward_flops_per_token(cfg: EmuConfig) -> float:
    lm = cfg.model.lm
    h, f, s = lm.hidden_size, lm.ffn_hidden_size, cfg.train.seq_length
    kv = h * (lm.num_query_groups or lm.num_attention_heads) // lm.num_attention_heads
    per_layer = 2 * h * (h + 2 * kv) + 4 * s * h + 2 * h * h + 6 * h * f
    heads = 2 * h * derived.padded_vocab_size(lm) + 2 * h * cfg.model.vision.width
    return lm.num_layers * per_layer + heads


def step_flops(cfg: EmuConfig, sequences: int, images: int) -> float:
    """Model FLOPs of one optimizer step over ``sequences`` sequences holding ``images`` images."""
    frozen = set(cfg.train.freeze)
    vit_mult = 1 if any(p.startswith("vision") for p in frozen) else 3
    adapter_mult = 1 if any(p.startswith("adapter") for p in frozen) else 3
    v, lm = cfg.model.vision, cfg.model.lm
    adapter = 2 * cfg.model.adapter.n_query * v.width * lm.hidden_size
    tokens = sequences * cfg.train.seq_length
    return (vit_mult * images * vit_forward_flops_per_image(cfg) + adapter_mult * images * adapter
            + 3 * tokens * lm_forward_flops_per_token(cfg))
