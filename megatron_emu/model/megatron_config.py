"""Our typed config -> megatron-core ``TransformerConfig`` for each tower (pure functions)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_emu.config.schema import EmuConfig
from megatron_emu.utils import device

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _common(cfg: EmuConfig) -> dict:
    par, dtype = cfg.parallel, _DTYPES[cfg.model.params_dtype]
    recompute = cfg.train.recompute_granularity
    kwargs = dict(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # On CPU, full master weights are built on the CPU RNG and sliced, so every TP layout
        # starts from the same function; on GPU each rank initialises its shard on the device
        # (fast at 37B; real runs start from converted checkpoints anyway).
        use_cpu_initialization=not device.has_cuda(),
        init_method_std=cfg.model.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        # Fusions stay off: the local path must run on CPU; TE brings its own fused kernels.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_comm=par.batch_p2p_comm,
        overlap_p2p_comm=not par.batch_p2p_comm,
        # Frees sent activations early. Only safe where sends are stream-ordered (NCCL): gloo's
        # async isend still reads the tensor after the schedule swaps its storage out.
        deallocate_pipeline_outputs=device.has_cuda(),
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
    )
    if cfg.train.fp8:
        kwargs.update(fp8=cfg.train.fp8, fp8_recipe="delayed")
    return kwargs


def lm_transformer_config(cfg: EmuConfig) -> TransformerConfig:
    """LLaMA: RMSNorm, SwiGLU (``linear_fc1`` = [gate; up]), no biases, rotate-half RoPE."""
    lm, par = cfg.model.lm, cfg.parallel
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
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=par.num_layers_in_first_pipeline_stage,
        **_common(cfg),
    )


def vision_transformer_config(cfg: EmuConfig) -> TransformerConfig:
    """EVA ViT: LayerNorm, exact-GELU MLP with biases, fused QKV.

    The whole ViT lives on the first pipeline stage, so its config says PP=1 (megatron-core
    then builds all its layers there with local layer numbers 1..L).
    """
    v = cfg.model.vision
    common = _common(cfg)
    common.update(pipeline_model_parallel_size=1)
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
