"""Independent single-process plain-PyTorch reference of Emu2 (numerical oracle for tests).

Written from ``emu2_spec.md`` (§1.2-1.7, §2, §5.4) only; it does not import ``megatron_emu``.
Parameters live in a flat dict keyed by the Hugging Face Emu2 state-dict names (§5.4).

Pipeline: EVA ViT (post-norm blocks, no final norm, CLS dropped) -> 2-D average pooling to
``n_query`` tokens -> ``project_up`` into the ``<image>`` slots of the token embeddings ->
LLaMA decoder (pre-RMSNorm, rotate-half RoPE, causal MHA, SwiGLU) -> final RMSNorm ->
``lm_head`` (next-token CE) and ``project_down`` (MSE regression of the next visual embedding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

V = "model.visual."
L = "model.decoder.lm.model."
LM_HEAD = "model.decoder.lm.lm_head.weight"

# Emu2 special ids (emu2_spec.md §1.6): [PAD] 32000, [IMG] 32001, [/IMG] 32002, <image> 32003.
# Cross-entropy ignores labels at all four (§2, Emu1 lineage). Fixed here, never read from the
# configuration under test, so a config or default that loses one of them is caught.
IMAGE_ID = 32003
CE_IGNORE_IDS = (32000, 32001, 32002, 32003)


@dataclass
class RefConfig:
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_dim: int
    vision_eps: float  # LayerNorm eps, 1e-6 in Emu2
    n_query: int  # visual tokens per image after pooling (a perfect square)
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    num_kv_heads: int | None = None  # grouped-query attention: key/value heads (None: num_heads)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def init_params(cfg: RefConfig, seed: int, dtype=torch.float32) -> dict[str, Tensor]:
    """Random parameters with HF names/shapes. Matrices/embeddings ~ N(0, 0.02); norm weights 1;
    LayerNorm biases 0; other biases ~ N(0, 0.02); qkv bias = q_bias | 0 | v_bias."""
    g = torch.Generator().manual_seed(seed)
    W, H, F_ = cfg.vision_width, cfg.hidden_size, cfg.ffn_hidden_size

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    p: dict[str, Tensor] = {
        V + "cls_token": rnd(1, 1, W),
        V + "pos_embed": rnd(1, cfg.grid**2 + 1, W),
        V + "patch_embed.proj.weight": rnd(W, 3, cfg.patch_size, cfg.patch_size),
        V + "patch_embed.proj.bias": rnd(W),
    }
    for i in range(cfg.vision_layers):
        b = f"{V}blocks.{i}."
        for n in ("norm1", "norm2"):
            p[b + n + ".weight"], p[b + n + ".bias"] = torch.ones(W), torch.zeros(W)
        p[b + "attn.qkv.weight"] = rnd(3 * W, W)
        p[b + "attn.qkv.bias"] = torch.cat([rnd(W), torch.zeros(W), rnd(W)])
        p[b + "attn.proj.weight"], p[b + "attn.proj.bias"] = rnd(W, W), rnd(W)
        p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"] = rnd(cfg.vision_mlp_dim, W), rnd(cfg.vision_mlp_dim)
        p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"] = rnd(W, cfg.vision_mlp_dim), rnd(W)
    p[L + "embed_tokens.weight"] = rnd(cfg.vocab_size, H)
    for i in range(cfg.num_layers):
        b = f"{L}layers.{i}."
        p[b + "input_layernorm.weight"] = torch.ones(H)
        kv = H // cfg.num_heads * cfg.kv_heads
        for n, rows in (("q", H), ("k", kv), ("v", kv), ("o", H)):
            p[f"{b}self_attn.{n}_proj.weight"] = rnd(rows, H)
        p[b + "post_attention_layernorm.weight"] = torch.ones(H)
        p[b + "mlp.gate_proj.weight"], p[b + "mlp.up_proj.weight"] = rnd(F_, H), rnd(F_, H)
        p[b + "mlp.down_proj.weight"] = rnd(H, F_)
    p[L + "norm.weight"] = torch.ones(H)
    p[LM_HEAD] = rnd(cfg.vocab_size, H)
    p["project_up.weight"] = rnd(H, W)
    p["project_down.weight"] = rnd(W, H)
    return {k: v.to(dtype) for k, v in p.items()}


# ----------------------------------------------------------------------------- vision
def pool_visual(feats: Tensor, n_query: int) -> Tensor:
    """[n, grid*grid, W] row-major patch features -> [n, n_query, W] raster-order avg-pooled tokens."""
    n, P, W = feats.shape
    grid, q = math.isqrt(P), math.isqrt(n_query)
    assert grid * grid == P and q * q == n_query and grid % q == 0, (P, n_query)
    x = feats.transpose(1, 2).reshape(n, W, grid, grid)
    x = F.avg_pool2d(x, kernel_size=grid // q, stride=grid // q)  # [n, W, q, q]
    return x.flatten(2).transpose(1, 2)


def encode_images(p: dict[str, Tensor], cfg: RefConfig, images: Tensor) -> Tensor:
    """EVA ViT + pooling. images [n, 3, H, W] -> visual features [n, n_query, vision_width]."""
    W, nh = cfg.vision_width, cfg.vision_heads
    hd = W // nh
    dt = p[V + "pos_embed"].dtype
    x = F.conv2d(images.to(dt), p[V + "patch_embed.proj.weight"], p[V + "patch_embed.proj.bias"],
                 stride=cfg.patch_size)  # [n, W, g, g]
    x = x.flatten(2).transpose(1, 2)  # [n, g*g, W] row-major
    n, T = x.shape[0], x.shape[1] + 1
    x = torch.cat([p[V + "cls_token"].expand(n, 1, W), x], dim=1) + p[V + "pos_embed"]
    for i in range(cfg.vision_layers):
        b = f"{V}blocks.{i}."
        qkv = F.linear(x, p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"])  # [n, T, 3W]
        q, k, v = qkv.view(n, T, 3, nh, hd).permute(2, 0, 3, 1, 4)  # each [n, nh, T, hd]
        att = torch.softmax((q @ k.transpose(-1, -2)) * hd**-0.5, dim=-1)
        a = (att @ v).transpose(1, 2).reshape(n, T, W)
        a = F.linear(a, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
        x = x + F.layer_norm(a, (W,), p[b + "norm1.weight"], p[b + "norm1.bias"], cfg.vision_eps)
        m = F.gelu(F.linear(x, p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"]))  # exact GELU
        m = F.linear(m, p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
        x = x + F.layer_norm(m, (W,), p[b + "norm2.weight"], p[b + "norm2.bias"], cfg.vision_eps)
    return pool_visual(x[:, 1:], cfg.n_query)


# ----------------------------------------------------------------------------- LLaMA
def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) computed in fp32, cast back to x.dtype, then * w."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope_cos_sin(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """HF LlamaRotaryEmbedding tables for positions 0..seq_len-1: cos, sin [seq_len, head_dim] fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., s, head_dim]; cos/sin [s, head_dim]. Rotate-half convention."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def decoder(p: dict[str, Tensor], cfg: RefConfig, x: Tensor) -> Tensor:
    """LLaMA decoder on input embeddings x [b, s, hidden] -> final-RMSNorm hidden [b, s, hidden].

    Grouped-query attention as in LLaMA / transformers (``repeat_kv``): query head j attends
    with key/value head ``j // (num_heads / kv_heads)``."""
    bsz, s, H = x.shape
    nh, nkv = cfg.num_heads, cfg.kv_heads
    hd = H // nh
    cos, sin = rope_cos_sin(s, hd, cfg.rope_theta)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg.num_layers):
        b = f"{L}layers.{i}."
        h = rms_norm(x, p[b + "input_layernorm.weight"], cfg.rms_eps)
        q, k, v = (F.linear(h, p[f"{b}self_attn.{n}_proj.weight"]).view(bsz, s, heads, hd).transpose(1, 2)
                   for n, heads in (("q", nh), ("k", nkv), ("v", nkv)))  # q [b,nh,s,hd]; k, v [b,nkv,s,hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # [b, nh, s, hd]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        att = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        a = (att @ v).transpose(1, 2).reshape(bsz, s, H)
        x = x + F.linear(a, p[b + "self_attn.o_proj.weight"])
        h = rms_norm(x, p[b + "post_attention_layernorm.weight"], cfg.rms_eps)
        m = F.silu(F.linear(h, p[b + "mlp.gate_proj.weight"])) * F.linear(h, p[b + "mlp.up_proj.weight"])
        x = x + F.linear(m, p[b + "mlp.down_proj.weight"])
    return rms_norm(x, p[L + "norm.weight"], cfg.rms_eps)


def forward(p: dict[str, Tensor], cfg: RefConfig, tokens: Tensor, images: Tensor | None,
            image_token_id: int, slot_ids: tuple = ()) -> tuple[Tensor, Tensor, Tensor]:
    """tokens [b, s] (long), images [n, 3, H, W] or None.

    Returns (logits [b, s, vocab], final hidden [b, s, hidden], visual features [n, n_query, W]).
    Positions with token == image_token_id (or in ``slot_ids``: video frame slots) get
    project_up(visual features), filled in row-major (batch, then position) order; their number
    must be exactly n * n_query.
    """
    emb = p[L + "embed_tokens.weight"][tokens]  # [b, s, H]
    if images is None:
        vis = emb.new_zeros(0, cfg.n_query, cfg.vision_width)
    else:
        vis = encode_images(p, cfg, images)
    mask = torch.isin(tokens, torch.tensor([image_token_id, *slot_ids]))
    assert int(mask.sum()) == vis.shape[0] * cfg.n_query, (int(mask.sum()), tuple(vis.shape))
    if vis.shape[0] > 0:
        up = F.linear(vis.reshape(-1, cfg.vision_width), p["project_up.weight"]).to(emb.dtype)
        emb = emb.masked_scatter(mask.unsqueeze(-1), up)  # masked_scatter fills in row-major order
    h = decoder(p, cfg, emb)
    logits = F.linear(h, p[LM_HEAD])
    return logits, h, vis


# ----------------------------------------------------------------------------- loss
def loss_masks(tokens: Tensor, image_token_id: int, ce_ignore_ids: list[int],
               reg_ids: tuple = ()) -> tuple[Tensor, Tensor]:
    """Masks over positions t < s-1, both [b, s-1] bool: (CE positions, regression positions).
    CE: label tokens[:, t+1] not in ce_ignore_ids. Regression: tokens[:, t+1] == image_token_id
    (or in ``reg_ids``)."""
    labels = tokens[:, 1:]
    ce = ~torch.isin(labels, torch.tensor(list(ce_ignore_ids), dtype=labels.dtype, device=labels.device))
    return ce, torch.isin(labels, torch.tensor([image_token_id, *reg_ids]))


def emu2_loss(p: dict[str, Tensor], cfg: RefConfig, tokens: Tensor, images: Tensor | None, *,
              image_token_id: int, ce_ignore_ids: list[int], lm_weight: float,
              reg_weight: float, slot_ids: tuple = (), reg_ids: tuple = (),
              masks: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """{"loss", "lm_loss", "reg_loss"} (fp32 scalars).

    lm_loss: mean next-token CE over unmasked positions. reg_loss: mean squared error over all
    regression positions x vision_width dims between project_down(h[:, t]) and the detached visual
    feature placed at position t+1. Empty sets give 0.0 (still attached to the graph).
    ``masks``: (CE positions, regression positions), both [b, s-1] bool, given by the data layer
    (fine-tuning: answers only, the last image only) instead of derived from the tokens.
    """
    logits, h, vis = forward(p, cfg, tokens, images, image_token_id, slot_ids)
    ce_mask, reg_mask = loss_masks(tokens, image_token_id, ce_ignore_ids, reg_ids) if masks is None else masks
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1),
                         reduction="none")
    lm_loss = (ce * ce_mask.reshape(-1)).sum() / ce_mask.sum().clamp(min=1)

    # target[b, t] = visual feature placed at position t (zeros at non-image positions)
    target = h.new_zeros(*tokens.shape, cfg.vision_width).float()
    target[torch.isin(tokens, torch.tensor([image_token_id, *slot_ids]))] = \
        vis.detach().reshape(-1, cfg.vision_width).float()
    pred = F.linear(h[:, :-1], p["project_down.weight"]).float()  # [b, s-1, W]
    sq = (pred - target[:, 1:]).pow(2) * reg_mask.unsqueeze(-1)
    reg_loss = sq.sum() / (reg_mask.sum() * cfg.vision_width).clamp(min=1)

    loss = lm_weight * lm_loss + reg_weight * reg_loss
    return {"loss": loss, "lm_loss": lm_loss, "reg_loss": reg_loss}
