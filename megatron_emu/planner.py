"""``--dry-run`` planner: parameters per component and per pipeline stage, and estimated
memory per GPU, from the config alone (no process group, no GPU, no data).

Parameter counts are exact for our megatron-core model (tests check them against the built
model at several layouts). Memory is an estimate:

* weights ``P * dtype``; fp32 main gradients ``4 P`` (``grad_reduce_in_fp32``); Adam state
  (fp32 master + two moments) ``12 P``, divided by DP under the distributed optimizer;
  frozen parameters carry weights only.
* activations per LM layer and micro-batch, with sequence parallelism (Korthikanti et al.,
  2022): ``s b h (34 + 5 a s / h) / t`` bytes (bf16) without recompute, ``34 s b h / t`` with
  selective recompute, ``2 s b h / t`` with full recompute; the ViT likewise over its
  ``images x 1025`` tokens (video frames are images here: they count toward
  ``data.max_images_per_sequence``); 1F1B keeps ``pp - stage`` micro-batches in flight on a stage;
  the last stage adds fp32 logits ``2 x 4 s b V / t``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_emu.config import derived
from megatron_emu.contracts import image_layout, params
from megatron_emu.model.spec import ModelSpec
from megatron_emu.utils import units

GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class PlanSpec:
    """The model and the layout asked for (a dry run has no process groups to read sizes from)."""

    model: ModelSpec
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    use_distributed_optimizer: bool = True
    video_frames: int = 8  # data.video_frames


@dataclass
class Component:
    name: str
    params: int  # total over the whole model
    tp_sharded: int  # part of ``params`` split over TP ranks
    stage: int  # pipeline rank holding it (-1: per-layer, see lm_layer)


def _vision(spec: PlanSpec) -> tuple[int, int]:
    v = spec.model.model.vision
    W, M, p = v.width, v.mlp_dim, v.patch_size
    stem = W * 3 * p * p + W + W + (derived.patch_grid(v) ** 2 + 1) * W
    block_sharded = 3 * W * W + 3 * W + W * W + W * M + M + M * W
    block_repl = 2 * W + 4 * W  # row-parallel biases (proj, fc2) and two post-norms
    return stem + v.num_layers * (block_sharded + block_repl), v.num_layers * block_sharded


def lm_layer_params(spec: PlanSpec) -> tuple[int, int]:
    lm = spec.model.model.lm
    H, F = lm.hidden_size, lm.ffn_hidden_size
    d = H // lm.num_attention_heads
    kv = (lm.num_query_groups or lm.num_attention_heads) * d
    sharded = H * (H + 2 * kv) + H * H + H * 2 * F + F * H
    return sharded + 2 * H, sharded


def components(spec: PlanSpec) -> list[Component]:
    lm, v = spec.model.model.lm, spec.model.model.vision
    H, Vp, W = lm.hidden_size, derived.padded_vocab_size(lm), v.width
    last = spec.pp - 1
    vis, vis_sharded = _vision(spec)
    return [
        Component("vision", vis, vis_sharded, 0),
        Component("adapter", W * H, W * H, 0),
        Component("embedding", Vp * H, Vp * H, 0),
        Component("lm_final_norm", H, 0, last),
        Component("lm_head", Vp * H, Vp * H, last),
        Component("regression_head", H * W, H * W, last),
    ]


def plan(spec: PlanSpec) -> dict:
    """The dry-run report as a JSON-ready dict."""
    m = spec.model
    tp, pp, dp, freeze = spec.tp, spec.pp, spec.dp, list(m.freeze)
    lm = m.model.lm
    layer_total, layer_sharded = lm_layer_params(spec)
    stages = derived.lm_layers_per_stage(lm.num_layers, pp, m.virtual_pipeline, m.first_stage_layers)
    comps = components(spec)
    per_stage = [0] * pp
    per_rank = [0.0] * pp  # parameters on one GPU of the stage
    frozen_rank = [0.0] * pp
    for c in comps:
        per_stage[c.stage] += c.params
        local = c.tp_sharded / tp + (c.params - c.tp_sharded)
        per_rank[c.stage] += local
        if params.whole_family_frozen(c.name, freeze):
            frozen_rank[c.stage] += local
    for s, layers in enumerate(stages):
        per_stage[s] += len(layers) * layer_total
        local = len(layers) * (layer_sharded / tp + layer_total - layer_sharded)
        per_rank[s] += local
        if params.whole_family_frozen("lm_layers", freeze):
            frozen_rank[s] += local
    wbytes = 2 if m.model.params_dtype == "bfloat16" else 4
    opt_div = dp if spec.use_distributed_optimizer else 1
    s_len, b, H, a = m.seq_length, spec.micro_batch_size, lm.hidden_size, lm.num_attention_heads
    act_coef = {None: 34 + 5 * a * s_len / H, "selective": 34, "full": 2}[m.recompute_granularity]
    sp_div = tp if m.sequence_parallel else 1
    layer_act = s_len * b * H * act_coef / sp_div * (wbytes / 2)
    v = m.model.vision
    vit_tokens = b * m.max_images_per_sequence * derived.vision_seq_length(v)
    vit_coef = {None: 34 + 5 * v.num_heads * derived.vision_seq_length(v) / v.width,
                "selective": 34, "full": 2}[m.recompute_granularity]
    vit_frozen = params.whole_family_frozen("vision", freeze)
    vit_act = 0.0 if vit_frozen else vit_tokens * v.width * vit_coef / sp_div * v.num_layers
    memory = []
    for s in range(pp):
        trainable = per_rank[s] - frozen_rank[s]
        weights = per_rank[s] * wbytes
        grads = trainable * 4
        optim = trainable * 12 / opt_div
        in_flight = pp - s
        act = in_flight * (len(stages[s]) * layer_act + (vit_act if s == 0 else 0.0))
        if s == pp - 1:
            act += 2 * 4 * s_len * b * derived.padded_vocab_size(lm) / tp
        memory.append({
            "stage": s, "weights": weights / GIB, "grads": grads / GIB, "optimizer": optim / GIB,
            "activations": act / GIB, "total": (weights + grads + optim + act) / GIB,
        })
    return {
        "layout": {"tp": tp, "pp": pp, "dp": dp, "vpp": m.virtual_pipeline,
                   "sequence_parallel": m.sequence_parallel, "gpus": tp * pp * dp},
        "total_params": sum(per_stage),
        "params_per_component": {c.name: c.params for c in comps} | {"lm_layers": lm.num_layers * layer_total},
        "params_per_stage": per_stage,
        "lm_layers_per_stage": [len(x) for x in stages],
        "params_per_gpu": [int(x) for x in per_rank],
        "memory_gib_per_gpu": max(m["total"] for m in memory),
        "memory_per_stage": memory,
        "video": video_capacity(spec),
    }


def video_capacity(spec: PlanSpec) -> dict:
    """How videos fit a sequence: tokens per video, and at most how many whole videos a
    sequence holds (each frame is one image of ``max_images_per_sequence``)."""
    m, frames = spec.model, spec.video_frames
    per_video = image_layout.tokens_per_video(frames, m.model.adapter.n_query)
    fit = min(m.max_images_per_sequence // frames, (m.seq_length + 1 - 2) // per_video)
    return {"frames_per_video": frames, "tokens_per_video": per_video, "videos_per_sequence": fit}


def format_plan(p: dict) -> str:
    """Human-readable tables of ``plan()``."""
    lay = p["layout"]
    lines = [f"layout: TP{lay['tp']} PP{lay['pp']} DP{lay['dp']}"
             f"{' VPP' + str(lay['vpp']) if lay['vpp'] else ''}{' +SP' if lay['sequence_parallel'] else ''}"
             f" = {lay['gpus']} GPUs",
             f"total parameters: {p['total_params']:,} ({units.count(p['total_params'])})", "",
             f"{'component':<18}{'parameters':>18}"]
    for name, n in p["params_per_component"].items():
        lines.append(f"{name:<18}{n:>18,}")
    lines += ["", f"{'stage':<7}{'LM layers':>10}{'parameters':>17}{'per GPU':>15}"
              f"{'weights':>11}{'grads':>11}{'optim':>11}{'activ':>11}{'total':>11}"]
    for s, m in enumerate(p["memory_per_stage"]):
        mem = "".join(f"{units.size_gib(m[k]):>11}" for k in ("weights", "grads", "optimizer",
                                                              "activations", "total"))
        lines.append(f"{s:<7}{p['lm_layers_per_stage'][s]:>10}{p['params_per_stage'][s]:>17,}"
                     f"{p['params_per_gpu'][s]:>15,}{mem}")
    lines.append(f"\nestimated peak memory per GPU: {units.size_gib(p['memory_gib_per_gpu'])}")
    v = p["video"]
    lines.append(f"video: {v['frames_per_video']} frames (ViT images) = {v['tokens_per_video']} tokens; "
                 f"at most {v['videos_per_sequence']} whole video(s) per sequence")
    return "\n".join(lines)
