"""The one declaration of how our canonical (unsharded, TP1/PP1) state dict maps to the Hugging
Face Emu2 layout of emu2_spec.md §5.4, both ways.

``REGISTRY`` lists every tensor once: our name, its HF name(s), the rule that splits ours into
the HF tensors and merges them back, the dimension megatron-core splits over tensor-parallel
ranks, and (the ViT QKV bias) the other HF form BAAI's native layout uses. ``to_hf`` and
``from_hf`` are both derived from it, so a mapping added once is visible in both directions.
Pure functions on full tensors: TP/PP sharding itself is megatron-core's ``sharded_state_dict``
business (``tp`` only records which dimension it splits).

Rules:
* ``LM_QKV``: megatron-core fuses per query group ``[q_g (heads_per_group * d); k_g (d); v_g (d)]``;
  HF keeps ``q_proj``, ``k_proj``, ``v_proj`` (head-major rows).
* ``VIT_QKV``: HF ``attn.qkv`` rows are ``[all q; all k; all v]`` (head-major); ours are per head.
  Its bias may come as BAAI's ``attn.q_bias`` / ``attn.v_bias`` (``QV_BIAS``: the k bias is zero).
* ``GATE_UP``: SwiGLU ``linear_fc1`` = ``[gate; up]``.
* ``VOCAB``: our embedding / output layer rows are padded; HF rows are trimmed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

HF_VISUAL = "model.visual."
HF_LM = "model.decoder.lm.model."
HF_LM_HEAD = "model.decoder.lm.lm_head.weight"
IGNORED_HF_SUFFIX = "rotary_emb.inv_freq"  # transformers' RoPE buffers: derived, never read


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


def fuse_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """HF q ``[heads*d, ...]``, k/v ``[groups*d, ...]`` -> per-group ``[q_g; k_g; v_g]`` rows."""
    d = q.shape[0] // heads
    tail = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_grouped_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, ...]:
    """Inverse of ``fuse_grouped_qkv``."""
    per = heads // groups
    d = qkv.shape[0] // (groups * (per + 2))
    tail = qkv.shape[1:]
    x = qkv.reshape(groups, (per + 2) * d, *tail)
    q, k, v = x[:, : per * d], x[:, per * d: (per + 1) * d], x[:, (per + 1) * d:]
    return (q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(),
            v.reshape(-1, *tail).contiguous())


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] > rows:
        raise ValueError(f"{x.shape[0]} vocabulary rows do not fit the padded size {rows}")
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if x.shape[0] < rows else x


@dataclass(frozen=True)
class Rule:
    """One tensor -> its parts (``split``) and the parts -> the tensor (``merge``), exact inverses."""

    split: Callable[[torch.Tensor, Dims], tuple[torch.Tensor, ...]]
    merge: Callable[[tuple[torch.Tensor, ...], Dims], torch.Tensor]


COPY = Rule(lambda t, d: (t,), lambda p, d: p[0])
VOCAB = Rule(lambda t, d: (t[: d.vocab_size],), lambda p, d: pad_rows(p[0], d.padded_vocab_size))
LM_QKV = Rule(lambda t, d: split_grouped_qkv(t, d.lm_heads, d.lm_query_groups),
              lambda p, d: fuse_grouped_qkv(*p, d.lm_heads, d.lm_query_groups))
VIT_QKV = Rule(lambda t, d: (torch.cat(split_grouped_qkv(t, d.vision_heads, d.vision_heads)),),
               lambda p, d: fuse_grouped_qkv(*torch.chunk(p[0], 3, dim=0), d.vision_heads, d.vision_heads))
GATE_UP = Rule(lambda t, d: tuple(x.contiguous() for x in torch.chunk(t, 2, dim=0)), lambda p, d: torch.cat(list(p)))
# Between the HF fused ViT bias ``q | 0 | v`` and BAAI's two parameters.
QV_BIAS = Rule(lambda t, d: (t[: t.shape[0] // 3], t[2 * (t.shape[0] // 3):]),
               lambda p, d: torch.cat([p[0], torch.zeros_like(p[0]), p[1]]))


@dataclass(frozen=True)
class Mapping:
    """One of our tensors (``{i}``: the layer number) and its HF tensor(s)."""

    ours: str
    hf: tuple[str, ...]
    rule: Rule = COPY
    tp: Optional[int] = None  # the dimension megatron-core splits over TP ranks; None: replicated
    variant: Optional[tuple[tuple[str, ...], Rule]] = None  # another HF form: its names, and the rule
    # from the ``hf`` form's one tensor to them


_VIT, _VIT_HF = "vision.blocks.layers.{i}.", HF_VISUAL + "blocks.{i}."
_LM, _LM_HF = "decoder.layers.{i}.", HF_LM + "layers.{i}."


def _vit(ours: str, hf: str, **kw) -> Mapping:
    return Mapping(_VIT + ours, (_VIT_HF + hf,), **kw)


def _lm(ours: str, hf: tuple[str, ...], **kw) -> Mapping:
    return Mapping(_LM + ours, tuple(_LM_HF + h for h in hf), **kw)


REGISTRY: tuple[Mapping, ...] = (
    Mapping("vision.patch_embed.weight", (HF_VISUAL + "patch_embed.proj.weight",)),
    Mapping("vision.patch_embed.bias", (HF_VISUAL + "patch_embed.proj.bias",)),
    Mapping("vision.cls_token", (HF_VISUAL + "cls_token",)),
    Mapping("vision.pos_embed", (HF_VISUAL + "pos_embed",)),
    _vit("self_attention.linear_qkv.weight", "attn.qkv.weight", rule=VIT_QKV, tp=0),
    _vit("self_attention.linear_qkv.bias", "attn.qkv.bias", rule=VIT_QKV, tp=0,
         variant=((_VIT_HF + "attn.q_bias", _VIT_HF + "attn.v_bias"), QV_BIAS)),
    _vit("self_attention.linear_proj.weight", "attn.proj.weight", tp=1),
    _vit("self_attention.linear_proj.bias", "attn.proj.bias"),
    _vit("self_attention.post_norm.weight", "norm1.weight"),
    _vit("self_attention.post_norm.bias", "norm1.bias"),
    _vit("mlp.linear_fc1.weight", "mlp.fc1.weight", tp=0),
    _vit("mlp.linear_fc1.bias", "mlp.fc1.bias", tp=0),
    _vit("mlp.linear_fc2.weight", "mlp.fc2.weight", tp=1),
    _vit("mlp.linear_fc2.bias", "mlp.fc2.bias"),
    _vit("mlp.post_norm.weight", "norm2.weight"),
    _vit("mlp.post_norm.bias", "norm2.bias"),
    Mapping("adapter.project_up.weight", ("project_up.weight",), tp=0),
    Mapping("embedding.word_embeddings.weight", (HF_LM + "embed_tokens.weight",), rule=VOCAB, tp=0),
    _lm("input_layernorm.weight", ("input_layernorm.weight",)),
    _lm("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                             "self_attn.v_proj.weight"), rule=LM_QKV, tp=0),
    _lm("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), tp=1),
    _lm("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    _lm("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), rule=GATE_UP, tp=0),
    _lm("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), tp=1),
    Mapping("decoder.final_layernorm.weight", (HF_LM + "norm.weight",)),
    Mapping("heads.output_layer.weight", (HF_LM_HEAD,), rule=VOCAB, tp=0),
    Mapping("heads.project_down.weight", ("project_down.weight",), tp=0),
)


def _pattern(name: str) -> re.Pattern:
    return re.compile("^" + re.escape(name).replace(re.escape("{i}"), r"(\d+)") + "$")


@functools.lru_cache(maxsize=4)
def _index(registry: tuple[Mapping, ...]) -> tuple[list, list]:
    """Both directions' lookups, derived from one registry: our name patterns, and the HF name
    patterns with which of a mapping's names each is (an index into ``hf``, or ``("variant", k)``)."""
    ours = [(_pattern(m.ours), m) for m in registry]
    hf = [(_pattern(h), m, k) for m in registry for k, h in enumerate(m.hf)]
    hf += [(_pattern(h), m, ("variant", k)) for m in registry if m.variant for k, h in enumerate(m.variant[0])]
    return ours, hf


def find_ours(name: str) -> tuple[Mapping, str]:
    """The mapping of one of our names and its layer number ("" outside a layer stack)."""
    for pattern, m in _index(REGISTRY)[0]:
        if hit := pattern.match(name):
            return m, (hit.group(1) if hit.groups() else "")
    raise KeyError(f"unmapped parameter {name!r}")


def find_hf(name: str) -> Optional[tuple[Mapping, str, object]]:
    """The mapping an HF name belongs to, its layer number and which of its names it is; None
    for an unknown name."""
    for pattern, m, which in _index(REGISTRY)[1]:
        if hit := pattern.match(name):
            return m, (hit.group(1) if hit.groups() else ""), which
    return None


def to_hf(ours: dict[str, torch.Tensor], dims: Dims) -> dict[str, torch.Tensor]:
    """Canonical state dict -> HF Emu2 names and layouts (vocabulary padding trimmed)."""
    hf: dict[str, torch.Tensor] = {}
    for name, t in ours.items():
        m, i = find_ours(name)
        for h, part in zip(m.hf, m.rule.split(t, dims)):
            hf[h.replace("{i}", i)] = part
    return hf


def from_hf(hf: dict[str, torch.Tensor], dims: Dims) -> dict[str, torch.Tensor]:
    """HF Emu2 names -> canonical state dict (vocabulary rows zero-padded). A tensor with a
    ``variant`` may come in either form (the ViT bias: fused ``attn.qkv.bias`` or BAAI's
    separate ``attn.q_bias`` / ``attn.v_bias``), not both. Ignores ``rotary_emb.inv_freq``
    buffers; any other unknown key is an error."""
    found: dict[tuple[Mapping, str], dict] = {}  # (mapping, layer) -> {which: tensor}, in input order
    for name, t in hf.items():
        if name.endswith(IGNORED_HF_SUFFIX):
            continue
        hit = find_hf(name)
        if hit is None:
            raise KeyError(f"unknown HF key {name!r}")
        m, i, which = hit
        found.setdefault((m, i), {})[which] = t
    ours: dict[str, torch.Tensor] = {}
    for (m, i), parts in found.items():
        if m.variant and any(isinstance(w, tuple) for w in parts):
            if set(parts) != {("variant", k) for k in range(len(m.variant[0]))}:
                raise KeyError(f"{m.ours.replace('{i}', i)}: give {' and '.join(m.variant[0])} together, or "
                               f"{' '.join(m.hf)} alone".replace("{i}", i))
            parts = {0: m.variant[1].merge(tuple(parts[("variant", k)] for k in range(len(m.variant[0]))), dims)}
        missing = [h.replace("{i}", i) for k, h in enumerate(m.hf) if k not in parts]
        if missing:
            raise KeyError(f"HF tensors of {m.ours.replace('{i}', i)} are missing: {', '.join(missing)}")
        ours[m.ours.replace("{i}", i)] = m.rule.merge(tuple(parts[k] for k in range(len(m.hf))), dims)
    return ours
