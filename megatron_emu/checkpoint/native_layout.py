"""BAAI's native (GitHub) Emu2 state-dict layout, both ways, next to the Hugging Face one.

The HF layout (emu2_spec.md §5.4): ``model.visual.*``, ``model.decoder.lm.*``, top-level
``project_up.weight`` / ``project_down.weight``, and a fused ViT ``attn.qkv.bias`` =
``q_bias | 0 | v_bias``.

The native layout is the state dict of the GitHub ``EmuModel`` (``Emu2/emu/emu.py``): no
``model.`` prefix (``visual.*``, ``decoder.lm.*``), the ViT biases as two parameters
``attn.q_bias`` / ``attn.v_bias`` (the k bias is zero by construction), the adapter and the
regression head inside the LM (``decoder.lm.project_up.weight``,
``decoder.lm.project_down.weight``: ``Emu2/emu/lm.py`` attaches them to the LLaMA module), and
transformers 4.31's persistent RoPE buffers ``...self_attn.rotary_emb.inv_freq`` (fp32,
``1 / theta^(2i/d)``). That is what ``EmuModel.load_state_dict(..., strict=True)`` needs.

Import (``hf_name``) accepts either layout and the older names BAAI's loader renames
(``decoder.lm.stu_regress_head`` -> ``project_down``, ``vl_adapter.projection`` -> ``project_up``),
and top-level ``project_*`` without a prefix. The separate q/v biases are the ViT bias's
``variant`` in ``hf_mapping.REGISTRY``, which splits them here and fuses them in ``from_hf``.
"""

from __future__ import annotations

import torch

from megatron_emu.checkpoint import hf_mapping

_NATIVE_HEADS = {"project_up.weight": "decoder.lm.project_up.weight",
                 "project_down.weight": "decoder.lm.project_down.weight"}
_ALIASES = {
    "decoder.lm.project_up.weight": "project_up.weight",
    "decoder.lm.project_down.weight": "project_down.weight",
    "decoder.lm.stu_regress_head.weight": "project_down.weight",
    "vl_adapter.projection.weight": "project_up.weight",
}
INV_FREQ = "self_attn.rotary_emb.inv_freq"


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """transformers 4.31's ``LlamaRotaryEmbedding.inv_freq``: fp32 ``[head_dim // 2]``."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))


def to_native(hf: dict[str, torch.Tensor], head_dim: int, theta: float) -> dict[str, torch.Tensor]:
    """HF Emu2 names/layouts -> native ones (works on ``meta`` tensors too)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if name in _NATIVE_HEADS:
            out[_NATIVE_HEADS[name]] = t
            continue
        hit = hf_mapping.find_hf(name)
        if hit is not None and hit[0].variant is not None:  # BAAI keeps this tensor in its variant form
            names, rule = hit[0].variant
            pairs = zip((n.replace("{i}", hit[1]) for n in names), rule.split(t, None))
        else:
            pairs = [(name, t)]
        for name, t in pairs:
            name = name[len("model."):] if name.startswith("model.") else name
            out[name] = t
            if name.endswith(".self_attn.q_proj.weight"):
                out[name[: -len("q_proj.weight")] + "rotary_emb.inv_freq"] = inv_freq(head_dim, theta, t.device)
    return out


def hf_name(name: str) -> str:
    """A tensor name of either layout -> its HF layout name (``q_bias`` / ``v_bias`` keep theirs)."""
    for prefix in ("", "model."):
        if name.startswith(prefix) and name[len(prefix):] in _ALIASES:
            return _ALIASES[name[len(prefix):]]
    if name.startswith(("visual.", "decoder.")):
        return "model." + name
    return name


def describe(names: list[str]) -> dict:
    """Which layout a set of input names is in: ``{"prefix", "qkv_bias", "layout"}``."""
    prefixed = any(n.startswith(("model.visual.", "model.decoder.")) for n in names)
    bare = any(n.startswith(("visual.", "decoder.")) for n in names)
    separate = any(n.endswith(("attn.q_bias", "attn.v_bias")) for n in names)
    fused = any(n.endswith("attn.qkv.bias") for n in names)
    prefix = "mixed" if prefixed and bare else ("model." if prefixed else ("none" if bare else "n/a"))
    bias = "separate q_bias/v_bias" if separate else ("fused qkv.bias" if fused else "no ViT")
    layout = ("BAAI native" if prefix == "none" else "Hugging Face") if prefix != "n/a" else "plain"
    return {"prefix": prefix, "qkv_bias": bias, "layout": layout}
