"""The sharded layout of a megatron_emu checkpoint, derived from the config alone: which DCP key,
global shape, offset and replica every rank stores of every canonical tensor, as megatron-core's
``sharded_state_dict`` of the model would say, without importing megatron-core or building the
model (``tests/conversion/test_stream.py`` holds the two equal, at several layouts).

The rules: tensor names and their TP dimension come from ``hf_mapping.REGISTRY``; full shapes from
the config's dimensions; global rank = pp_rank * tp + tp_rank (megatron-core's default order with
DP 1); pipeline rank 0 holds the ViT, the adapter and the embedding, the last the final norm and
both heads, each its even share of LM layers; layer stacks are stored under one key with the
layer number as a prepended axis (``reader.STACKED``, LM norms renamed as in ``reader.RENAMES``);
a TP-replicated tensor is stored by TP rank 0 only; SwiGLU's fc1 is stored as its gate and up
halves, each split over TP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_emu.checkpoint.hf_mapping import REGISTRY, find_ours
from megatron_emu.checkpoint.reader import RENAMES, STACKED

_STORED = {v: k for k, v in RENAMES.items()}  # canonical suffix -> stored suffix
_SWIGLU = "mlp.linear_fc1.weight"


@dataclass(frozen=True)
class Target:
    """One region of a canonical tensor that a rank stores under ``key``."""

    key: str
    global_shape: tuple
    global_offset: tuple
    shape: tuple  # the region's own shape (without the stacked axis)
    offsets: tuple  # where the region starts in the canonical tensor
    prepend_axis_num: int  # 1: a layer stack's key (the layer is the leading axis)
    main: bool  # False: a replica another rank writes


def full_shapes(cfg) -> dict[str, tuple]:
    """Canonical name -> full (unsharded) shape, every tensor of the model."""
    from megatron_emu.config.derived import padded_vocab_size, vision_seq_length

    v, lm = cfg.model.vision, cfg.model.lm
    w, h, d = v.width, lm.hidden_size, lm.hidden_size // lm.num_attention_heads
    groups = lm.num_query_groups or lm.num_attention_heads
    vocab = padded_vocab_size(lm)
    per_layer = {
        "vision.blocks.layers.{i}.": {
            "self_attention.linear_qkv.weight": (3 * w, w), "self_attention.linear_qkv.bias": (3 * w,),
            "self_attention.linear_proj.weight": (w, w), "self_attention.linear_proj.bias": (w,),
            "self_attention.post_norm.weight": (w,), "self_attention.post_norm.bias": (w,),
            "mlp.linear_fc1.weight": (v.mlp_dim, w), "mlp.linear_fc1.bias": (v.mlp_dim,),
            "mlp.linear_fc2.weight": (w, v.mlp_dim), "mlp.linear_fc2.bias": (w,),
            "mlp.post_norm.weight": (w,), "mlp.post_norm.bias": (w,)},
        "decoder.layers.{i}.": {
            "input_layernorm.weight": (h,),
            "self_attention.linear_qkv.weight": ((lm.num_attention_heads + 2 * groups) * d, h),
            "self_attention.linear_proj.weight": (h, lm.num_attention_heads * d), "pre_mlp_layernorm.weight": (h,),
            _SWIGLU: (2 * lm.ffn_hidden_size, h), "mlp.linear_fc2.weight": (h, lm.ffn_hidden_size)}}
    shapes = {"vision.patch_embed.weight": (w, 3, v.patch_size, v.patch_size), "vision.patch_embed.bias": (w,),
              "vision.cls_token": (1, 1, w), "vision.pos_embed": (1, vision_seq_length(v), w),
              "adapter.project_up.weight": (h, w), "embedding.word_embeddings.weight": (vocab, h),
              "decoder.final_layernorm.weight": (h,), "heads.output_layer.weight": (vocab, h),
              "heads.project_down.weight": (w, h)}
    for prefix, layers in (("vision.blocks.layers.{i}.", v.num_layers), ("decoder.layers.{i}.", lm.num_layers)):
        for i in range(layers):
            shapes.update({(prefix + k).replace("{i}", str(i)): s for k, s in per_layer[prefix].items()})
    known = {m.ours for m in REGISTRY}
    assert all(find_ours(n)[0].ours in known for n in shapes)  # every tensor has its mapping
    return shapes


def _stage(name: str, pp: int, lm_stages: list) -> list[int]:
    """The pipeline ranks that hold canonical tensor ``name``."""
    if name.startswith("decoder.layers."):
        layer = int(name.split(".")[2])
        return [p for p, layers in enumerate(lm_stages) if layer in layers]
    if name.startswith(("decoder.final_layernorm", "heads.")):
        return [pp - 1]
    return [0]


def rank_targets(cfg, rank: int, shapes: dict) -> dict[str, list[Target]]:
    """Canonical name -> the regions of it that global ``rank`` stores (TP x PP, DP 1)."""
    from megatron_emu.config.derived import lm_layers_per_stage

    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    tp_rank, pp_rank = rank % tp, rank // tp
    lm_stages = lm_layers_per_stage(cfg.model.lm.num_layers, pp)
    layers = {"vision.blocks.layers.": cfg.model.vision.num_layers, "decoder.layers.": cfg.model.lm.num_layers}
    out: dict[str, list[Target]] = {}
    for name, shape in shapes.items():
        if pp_rank not in _stage(name, pp, lm_stages):
            continue
        dim = find_ours(name)[0].tp
        # SwiGLU's fc1 is stored as two halves (gate, up), each split over TP ranks.
        halves = 2 if name.startswith("decoder.layers.") and name.endswith(_SWIGLU) else 1
        regions = []
        for half in range(halves):
            offsets, local = [0] * len(shape), list(shape)
            if dim is not None:
                local[dim] = shape[dim] // halves // tp
                offsets[dim] = half * (shape[dim] // halves) + tp_rank * local[dim]
            regions.append((tuple(offsets), tuple(local)))
        prefix = next((p for p in STACKED if name.startswith(p)), None)
        for offsets, local in regions:
            if prefix is None:
                key, gshape, goffset, axis = name, shape, offsets, 0
            else:
                layer, rest = name[len(prefix):].split(".", 1)
                key = prefix + _STORED.get(rest, rest)
                gshape, goffset, axis = (layers[prefix], *shape), (int(layer), *offsets), 1
            out.setdefault(name, []).append(Target(key, tuple(gshape), tuple(goffset), local, offsets, axis,
                                                   dim is not None or tp_rank == 0))
    return out
