"""The model spec -> megatron-core ``TransformerConfig`` for each tower (pure functions; the
parallel sizes come from the process groups, ``parallel.sizes``)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_emu.model.spec import ModelSpec
from megatron_emu.parallel.sizes import ParallelSizes
from megatron_emu.utils import device

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}  # ours -> megatron-core's Fp8Recipe


@dataclasses.dataclass(frozen=True)
class Fusion:
    on: bool
    how: str  # what runs, in words, for the start-up summary


def fusion_plan(impl: str, has_cuda: bool) -> dict[str, Fusion]:
    """Which fused kernels the model uses, and why not where it does not (printed at start-up:
    nothing falls back silently). On the CPU every op stays unfused, the exact reference path."""
    te = impl == "transformer_engine"
    if not has_cuda:
        off = Fusion(False, "unfused (CPU: the exact reference path)")
        return {k: off for k in ("bias_swiglu", "bias_gelu", "bias_dropout_add", "norms", "rope",
                                 "grad_accumulation")}
    return {
        "bias_swiglu": Fusion(True, "megatron-core fused SwiGLU (LM MLP)"),
        "bias_gelu": Fusion(True, "exact-GELU bias fusion (ViT MLP; megatron-core's fused "
                                  "bias-GELU is the tanh approximation, which EVA does not use)"),
        "bias_dropout_add": Fusion(True, "megatron-core fused bias-dropout-add"),
        "norms": Fusion(True, "Transformer Engine fused norms" if te
                        else "torch fused LayerNorm / RMSNorm kernels"),
        "rope": Fusion(te, "Transformer Engine fused RoPE" if te
                       else "unfused RoPE (megatron-core fuses it only through Transformer Engine)"),
        "grad_accumulation": Fusion(te, "Transformer Engine linears accumulate weight gradients "
                                        "into main_grad (the local heads and adapter unfused)" if te
                                    else "unfused weight-gradient accumulation (megatron-core's local "
                                         "linears need apex's fused_weight_gradient_mlp_cuda)"),
    }


def _common(spec: ModelSpec, sizes: ParallelSizes) -> dict:
    dtype = _DTYPES[spec.model.params_dtype]
    plan = fusion_plan(spec.model.transformer_impl, device.has_cuda())
    recompute = spec.recompute_granularity
    kwargs = dict(
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        sequence_parallel=spec.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # On CPU, full master weights are built on the CPU RNG and sliced, so every TP layout
        # starts from the same function; on GPU each rank initialises its shard on the device
        # (fast at 37B; real runs start from converted checkpoints anyway).
        use_cpu_initialization=not device.has_cuda(),
        init_method_std=spec.model.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        # Fusions: see ``fusion_plan`` (on where CUDA is present; the CPU keeps the exact path).
        bias_activation_fusion=plan["bias_swiglu"].on,
        masked_softmax_fusion=False,
        bias_dropout_fusion=plan["bias_dropout_add"].on,
        apply_rope_fusion=plan["rope"].on,
        gradient_accumulation_fusion=plan["grad_accumulation"].on,
        persist_layer_norm=False,
        batch_p2p_comm=spec.batch_p2p_comm,
        overlap_p2p_comm=not spec.batch_p2p_comm,
        # Frees sent activations early. Only safe where sends are stream-ordered (NCCL): gloo's
        # async isend still reads the tensor after the schedule swaps its storage out.
        deallocate_pipeline_outputs=device.has_cuda(),
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
    )
    if spec.fp8:
        kwargs.update(fp8=spec.fp8, fp8_recipe=FP8_RECIPES[spec.fp8_recipe])
    return kwargs


def lm_transformer_config(spec: ModelSpec, sizes: ParallelSizes) -> TransformerConfig:
    """LLaMA: RMSNorm, SwiGLU (``linear_fc1`` = [gate; up]), no biases, rotate-half RoPE."""
    lm = spec.model.lm
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        ffn_hidden_size=lm.ffn_hidden_size,
        kv_channels=lm.hidden_size // lm.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        rotary_interleaved=False,
        virtual_pipeline_model_parallel_size=spec.virtual_pipeline,
        num_layers_in_first_pipeline_stage=spec.first_stage_layers,
        **_common(spec, sizes),
    )


def vision_transformer_config(spec: ModelSpec, sizes: ParallelSizes) -> TransformerConfig:
    """EVA ViT: LayerNorm, exact-GELU MLP with biases, fused QKV.

    The whole ViT lives on the first pipeline stage, so its config says PP=1 (megatron-core
    then builds all its layers there with local layer numbers 1..L).
    """
    v = spec.model.vision
    common = _common(spec, sizes)
    # The ViT's MLP fuses bias + exact GELU itself (``specs.VisionMLP``): megatron-core's fused
    # bias-GELU is the tanh approximation.
    plan = fusion_plan(spec.model.transformer_impl, device.has_cuda())
    common.update(pipeline_model_parallel_size=1, bias_activation_fusion=plan["bias_gelu"].on)
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.width,
        num_attention_heads=v.num_heads,
        ffn_hidden_size=v.mlp_dim,
        kv_channels=v.width // v.num_heads,
        normalization="LayerNorm",
        layernorm_epsilon=v.layer_norm_eps,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        add_qkv_bias=True,
        **common,
    )


def with_overrides(config: TransformerConfig, **kwargs) -> TransformerConfig:
    return dataclasses.replace(config, **kwargs)


def local_linear_config(config: TransformerConfig) -> TransformerConfig:
    """For megatron-core's *local* linears inside a Transformer Engine model (heads, adapter):
    their fused weight-gradient accumulation would need apex, which TE's linears do not."""
    return with_overrides(config, gradient_accumulation_fusion=False) \
        if config.gradient_accumulation_fusion else config
