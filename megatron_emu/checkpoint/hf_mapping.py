"""Name and layout mapping between our canonical (unsharded, TP1/PP1) state dict and the
Hugging Face Emu2 layout of emu2_spec.md §5.4. Pure functions on full tensors; TP/PP sharding
is megatron-core's ``sharded_state_dict`` business, not this module's.

Layout transforms:
* LM QKV: megatron-core fuses per query group ``[q_g (heads_per_group * d); k_g (d); v_g (d)]``;
  HF keeps ``q_proj``, ``k_proj``, ``v_proj`` (head-major rows).
* ViT QKV: HF ``attn.qkv`` rows are ``[all q; all k; all v]`` (head-major); ours are per head.
* SwiGLU: ``linear_fc1`` = ``[gate; up]``.
* Vocabulary: our embedding / output layer rows are padded; HF rows are trimmed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

HF_VISUAL = "model.visual."
HF_LM = "model.decoder.lm.model."
HF_LM_HEAD = "model.decoder.lm.lm_head.weight"


@dataclass(frozen=True)
class Dims:
    """What the layout transforms need to know about the architecture."""

    vision_heads: int
    lm_heads: int
    lm_query_groups: int
    vocab_size: int
    padded_vocab_size: int
    lm_head_dim: int = 128
    rope_theta: float = 10000.0

    @classmethod
    def from_config(cls, cfg) -> "Dims":
        from megatron_emu.config.derived import padded_vocab_size

        lm = cfg.model.lm
        return cls(cfg.model.vision.num_heads, lm.num_attention_heads,
                   lm.num_query_groups or lm.num_attention_heads, lm.vocab_size,
                   padded_vocab_size(lm), lm.hidden_size // lm.num_attention_heads, lm.rope_theta)


def _fuse_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """HF q ``[heads*d, ...]``, k/v ``[groups*d, ...]`` -> per-group ``[q_g; k_g; v_g]`` rows."""
    d = q.shape[0] // heads
    tail = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _split_grouped_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, ...]:
    """Inverse of ``_fuse_grouped_qkv``."""
    per = heads // groups
    d = qkv.shape[0] // (groups * (per + 2))
    tail = qkv.shape[1:]
    x = qkv.reshape(groups, (per + 2) * d, *tail)
    q, k, v = x[:, : per * d], x[:, per * d: (per + 1) * d], x[:, (per + 1) * d:]
    return (q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(),
            v.reshape(-1, *tail).contiguous())


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] > rows:
        raise ValueError(f"{x.shape[0]} vocabulary rows do not fit the padded size {rows}")
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if x.shape[0] < rows else x


_VIT_SIMPLE = {
    "self_attention.linear_proj.weight": "attn.proj.weight",
    "self_attention.linear_proj.bias": "attn.proj.bias",
    "self_attention.post_norm.weight": "norm1.weight",
    "self_attention.post_norm.bias": "norm1.bias",
    "mlp.linear_fc1.weight": "mlp.fc1.weight",
    "mlp.linear_fc1.bias": "mlp.fc1.bias",
    "mlp.linear_fc2.weight": "mlp.fc2.weight",
    "mlp.linear_fc2.bias": "mlp.fc2.bias",
    "mlp.post_norm.weight": "norm2.weight",
    "mlp.post_norm.bias": "norm2.bias",
}
_LM_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP = {
    "vision.patch_embed.weight": HF_VISUAL + "patch_embed.proj.weight",
    "vision.patch_embed.bias": HF_VISUAL + "patch_embed.proj.bias",
    "vision.cls_token": HF_VISUAL + "cls_token",
    "vision.pos_embed": HF_VISUAL + "pos_embed",
    "adapter.project_up.weight": "project_up.weight",
    "decoder.final_layernorm.weight": HF_LM + "norm.weight",
    "heads.project_down.weight": "project_down.weight",
}
_VIT_LAYER = re.compile(r"^vision\.blocks\.layers\.(\d+)\.(.+)$")
_LM_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def to_hf(ours: dict[str, torch.Tensor], dims: Dims) -> dict[str, torch.Tensor]:
    """Canonical state dict -> HF Emu2 names and layouts (vocabulary padding trimmed)."""
    hf: dict[str, torch.Tensor] = {}
    for name, t in ours.items():
        if name in _TOP:
            hf[_TOP[name]] = t
        elif name == "embedding.word_embeddings.weight":
            hf[HF_LM + "embed_tokens.weight"] = t[: dims.vocab_size]
        elif name == "heads.output_layer.weight":
            hf[HF_LM_HEAD] = t[: dims.vocab_size]
        elif m := _VIT_LAYER.match(name):
            i, rest = m.groups()
            base = f"{HF_VISUAL}blocks.{i}."
            if rest.startswith("self_attention.linear_qkv."):
                q, k, v = _split_grouped_qkv(t, dims.vision_heads, dims.vision_heads)
                hf[base + "attn.qkv." + rest.rsplit(".", 1)[1]] = torch.cat([q, k, v])
            elif rest in _VIT_SIMPLE:
                hf[base + _VIT_SIMPLE[rest]] = t
            else:
                raise KeyError(f"unmapped vision parameter {name!r}")
        elif m := _LM_LAYER.match(name):
            i, rest = m.groups()
            base = f"{HF_LM}layers.{i}."
            if rest == "self_attention.linear_qkv.weight":
                q, k, v = _split_grouped_qkv(t, dims.lm_heads, dims.lm_query_groups)
                hf[base + "self_attn.q_proj.weight"] = q
                hf[base + "self_attn.k_proj.weight"] = k
                hf[base + "self_attn.v_proj.weight"] = v
            elif rest == "mlp.linear_fc1.weight":
                gate, up = torch.chunk(t, 2, dim=0)
                hf[base + "mlp.gate_proj.weight"] = gate.contiguous()
                hf[base + "mlp.up_proj.weight"] = up.contiguous()
            elif rest in _LM_SIMPLE:
                hf[base + _LM_SIMPLE[rest]] = t
            else:
                raise KeyError(f"unmapped LM parameter {name!r}")
        else:
            raise KeyError(f"unmapped parameter {name!r}")
    return hf


def from_hf(hf: dict[str, torch.Tensor], dims: Dims) -> dict[str, torch.Tensor]:
    """HF Emu2 names -> canonical state dict (vocabulary rows zero-padded). The ViT bias may
    be fused (``attn.qkv.bias``) or BAAI's separate ``attn.q_bias`` / ``attn.v_bias``. Ignores
    ``rotary_emb.inv_freq`` buffers; any other unknown key is an error."""
    inverse_top = {v: k for k, v in _TOP.items()}
    inv_vit = {v: k for k, v in _VIT_SIMPLE.items()}
    inv_lm = {v: k for k, v in _LM_SIMPLE.items()}
    ours: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    vit_biases: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name in inverse_top:
            ours[inverse_top[name]] = t
        elif name == HF_LM + "embed_tokens.weight":
            ours["embedding.word_embeddings.weight"] = _pad_rows(t, dims.padded_vocab_size)
        elif name == HF_LM_HEAD:
            ours["heads.output_layer.weight"] = _pad_rows(t, dims.padded_vocab_size)
        elif m := re.match(r"^model\.visual\.blocks\.(\d+)\.(.+)$", name):
            i, rest = m.groups()
            base = f"vision.blocks.layers.{i}."
            if rest.startswith("attn.qkv."):
                q, k, v = torch.chunk(t, 3, dim=0)
                ours[base + "self_attention.linear_qkv." + rest.rsplit(".", 1)[1]] = _fuse_grouped_qkv(
                    q, k, v, dims.vision_heads, dims.vision_heads)
            elif rest in ("attn.q_bias", "attn.v_bias"):  # BAAI's native layout: k bias is zero
                vit_biases.setdefault(i, {})[rest[5]] = t
            elif rest in inv_vit:
                ours[base + inv_vit[rest]] = t
            else:
                raise KeyError(f"unknown HF vision key {name!r}")
        elif m := re.match(r"^model\.decoder\.lm\.model\.layers\.(\d+)\.(.+)$", name):
            i, rest = m.groups()
            base = f"decoder.layers.{i}."
            if rest in inv_lm:
                ours[base + inv_lm[rest]] = t
            elif rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                          "mlp.gate_proj.weight", "mlp.up_proj.weight"):
                pending.setdefault(i, {})[rest] = t
            else:
                raise KeyError(f"unknown HF LM key {name!r}")
        else:
            raise KeyError(f"unknown HF key {name!r}")
    for i, qv in vit_biases.items():
        base = f"vision.blocks.layers.{i}.self_attention.linear_qkv."
        if set(qv) != {"q", "v"} or base + "bias" in ours:
            raise KeyError(f"ViT block {i}: needs both attn.q_bias and attn.v_bias, or attn.qkv.bias alone")
        q, v = qv["q"], qv["v"]
        ours[base + "bias"] = _fuse_grouped_qkv(q, torch.zeros_like(q), v, dims.vision_heads, dims.vision_heads)
    for i, parts in pending.items():
        base = f"decoder.layers.{i}."
        try:
            ours[base + "self_attention.linear_qkv.weight"] = _fuse_grouped_qkv(
                parts["self_attn.q_proj.weight"], parts["self_attn.k_proj.weight"],
                parts["self_attn.v_proj.weight"], dims.lm_heads, dims.lm_query_groups)
            ours[base + "mlp.linear_fc1.weight"] = torch.cat(
                [parts["mlp.gate_proj.weight"], parts["mlp.up_proj.weight"]])
        except KeyError as e:
            raise KeyError(f"HF layer {i} is missing {e.args[0]}") from None
    return ours
