"""Layer specs: how megatron-core builds our two transformer towers, per backend.

Both towers are megatron-core ``TransformerLayer``s (so TP, SP, recompute and FP8 apply):

* LM: LLaMA pre-norm layers, megatron-core's own GPT specs (local or Transformer Engine).
* ViT: EVA post-norm blocks, ``x = x + LN1(Attn(x)); x = x + LN2(MLP(x))``, expressed with an
  identity input norm and the norm applied to the attention / MLP output (``PostNorm*``), and a
  fused QKV whose bias has only q and v parts (``QVBias*``: the k third is masked out, so its
  parameter stays zero and receives no gradient).

The two backends ("local": megatron-core's local modules, for CPU/CI; "transformer_engine":
TE modules, FP8-capable, GPU) produce the same sharded checkpoint keys (megatron-core's
``sharded_state_dict_keys_map`` maps TE's fused layernorm names).
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


class _ShardedNormMixin:
    """Replicated (over TP and DP) sharded state dict, for parents such as megatron-core's
    ``MLP`` that call ``sharded_state_dict`` on every child. Needs its TP group
    (``bind_tp_group``; megatron-core builds norms without one)."""

    tp_group = None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        if self.tp_group is None:
            raise RuntimeError(f"{type(self).__name__}: no TP group bound (specs.bind_tp_group after building)")
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )


def bind_tp_group(module: torch.nn.Module, tp_group) -> None:
    """Give every replicated norm under ``module`` its TP group (for its sharded state dict)."""
    for m in module.modules():
        if isinstance(m, _ShardedNormMixin):
            m.tp_group = tp_group


class _LayerNorm(_ShardedNormMixin, torch.nn.LayerNorm):
    pass


class _RMSNorm(_ShardedNormMixin, torch.nn.RMSNorm):
    pass


class SPTorchNorm:
    """torch LayerNorm/RMSNorm whose parameters are tagged for sequence parallelism.

    megatron-core's ``WrappedTorchNorm`` refuses SP because it does not tag its parameters;
    with the tag, ``finalize_model_grads`` all-reduces their gradients over the TP group.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = _RMSNorm(hidden_size, eps=eps)
        else:
            norm = _LayerNorm(hidden_size, eps=eps)
        norm.to(dtype=config.params_dtype)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm


def core_attention(impl: str, backend: str) -> type:
    """The core-attention module: TE's fused attention with the TE spec; on the local spec
    torch SDPA (``auto``/``sdpa``) or megatron-core's unfused ``DotProductAttention``."""
    if impl == "transformer_engine":
        return _te_modules()[2]
    if backend in ("auto", "sdpa"):
        from megatron_emu.model.attention import SDPAttention

        return SDPAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def _local_modules():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear, None, SPTorchNorm


def _te_modules():
    try:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )
    except ImportError as e:  # pragma: no cover - GPU machines only
        raise RuntimeError(
            "model.transformer_impl=transformer_engine needs Transformer Engine "
            "(pip install -e '.[gpu]'); use transformer_impl: local otherwise"
        ) from e
    return TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention, TENorm


@functools.lru_cache(maxsize=None)
def qv_bias_linear(base: type) -> type:
    """A column-parallel QKV linear (subclass of ``base``) whose k-bias is identically zero.

    Output rows follow megatron-core's per-group layout ``[q_g, k_g, v_g]`` for each local
    query group g (``heads_per_group * d``, ``d``, ``d`` rows), so the mask is periodic.
    """

    class QVBiasLinear(base):  # type: ignore[misc, valid-type]
        def __init__(self, input_size, output_size, *, config, **kwargs):
            kwargs["skip_bias_add"] = True
            super().__init__(input_size, output_size, config=config, **kwargs)
            group = kwargs.get("tp_group")
            tp = group.size() if group is not None else max(1, config.tensor_model_parallel_size)
            d = config.kv_channels
            groups = (config.num_query_groups or config.num_attention_heads) // tp
            per_group = config.num_attention_heads // (config.num_query_groups or config.num_attention_heads)
            pattern = torch.cat([torch.ones(per_group * d), torch.zeros(d), torch.ones(d)])
            self.register_buffer("_qv_mask", pattern.repeat(groups).to(config.params_dtype),
                                 persistent=False)

        def forward(self, x, *args, **kwargs):
            out, bias = super().forward(x, *args, **kwargs)
            if bias is not None:
                out = out + bias * self._qv_mask.to(bias.dtype)
            return out, None

    QVBiasLinear.__name__ = f"QVBias{base.__name__}"
    return QVBiasLinear


class PostNormSelfAttention(SelfAttention):
    """Self-attention followed by a norm of its output (EVA post-norm): returns
    ``(LN1(attn(x) + b), None)`` with shape ``[s, b, h]`` (``[s/tp, b, h]`` under SP)."""

    def __init__(self, config: TransformerConfig, submodules, *args, post_norm=None, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.post_norm = post_norm(config, config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, *args, **kwargs):
        out, bias = super().forward(*args, **kwargs)
        if bias is not None:
            out = out + bias
        return self.post_norm(out), None


class _KnownMLPFilter(logging.Filter):
    """megatron-core warns for MLP subclasses it does not list; ours takes the default
    (model-parallel) TP group, which is the configured one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


def quiet_known_mlp_notice() -> None:
    """Drop megatron-core's "Unknown MLP type" notice for our MLP subclasses (once per process;
    called when a model is built, never at import)."""
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _KnownMLPFilter) for f in logger.filters):
        logger.addFilter(_KnownMLPFilter())


class VisionMLP(MLP):
    """The ViT's MLP: with ``bias_activation_fusion`` it fuses bias + *exact* GELU itself
    (``fused_gelu``; megatron-core's fusion is the tanh approximation); otherwise megatron-core's
    MLP unchanged."""

    def __init__(self, config: TransformerConfig, submodules, *args, pg_collection=None,
                 is_mtp_layer: bool = False, **kwargs):
        # megatron-core >= 0.17 builds every layer's MLP with (pg_collection, is_mtp_layer, name);
        # 0.16 passes nothing for MLP subclasses. MLP itself takes the TP group.
        if pg_collection is not None:
            kwargs.setdefault("tp_group", pg_collection.tp)
        accepted = inspect.signature(MLP.__init__).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        super().__init__(config, submodules, *args, **kwargs)
        self.fuse_exact_gelu = (config.bias_activation_fusion and config.add_bias_linear
                                and not config.gated_linear_unit)

    def forward(self, hidden_states, *args, **kwargs):
        if not self.fuse_exact_gelu:
            return super().forward(hidden_states, *args, **kwargs)
        from megatron_emu.model.fused_gelu import bias_gelu_exact

        intermediate, bias = self.linear_fc1(hidden_states)
        return self.linear_fc2(bias_gelu_exact(intermediate, bias))


class PostNormMLP(VisionMLP):
    """MLP followed by a norm of its output (EVA post-norm): ``(LN2(mlp(x) + b), None)``."""

    def __init__(self, config: TransformerConfig, submodules, *args, post_norm=None, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.post_norm = post_norm(config, config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, hidden_states, *args, **kwargs):
        out, bias = super().forward(hidden_states, *args, **kwargs)
        if bias is not None:
            out = out + bias
        return self.post_norm(out), None


def vision_layer_spec(impl: str, qkv_bias: str, postnorm: bool, masked: bool,
                      attention_backend: str = "auto") -> ModuleSpec:
    """EVA ViT block. ``masked``: a padding mask is passed (sequence padded for SP)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    column, row, _, norm = _te_modules() if impl == "transformer_engine" else _local_modules()
    attention = core_attention(impl, attention_backend)
    qkv = qv_bias_linear(column) if qkv_bias == "qv" else column
    mask = AttnMaskType.padding if masked else AttnMaskType.no_mask
    attn_sub = SelfAttentionSubmodules(linear_qkv=qkv, core_attention=attention, linear_proj=row)
    mlp_sub = MLPSubmodules(linear_fc1=column, linear_fc2=row)
    if postnorm:
        self_attention = ModuleSpec(module=PostNormSelfAttention, submodules=attn_sub,
                                    params={"attn_mask_type": mask, "post_norm": norm})
        mlp = ModuleSpec(module=PostNormMLP, submodules=mlp_sub, params={"post_norm": norm})
        pre_attn_norm = pre_mlp_norm = IdentityOp
    else:
        self_attention = ModuleSpec(module=SelfAttention, submodules=attn_sub,
                                    params={"attn_mask_type": mask})
        mlp = ModuleSpec(module=VisionMLP, submodules=mlp_sub)
        pre_attn_norm = pre_mlp_norm = norm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_attn_norm,
            self_attention=self_attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def lm_layer_spec(impl: str, attention_backend: str = "auto") -> ModuleSpec:
    """LLaMA layer: pre-norm RMSNorm, causal attention (RoPE applied by the block), SwiGLU."""
    if impl == "transformer_engine":
        _te_modules()
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = core_attention(impl, attention_backend)
    spec.submodules.input_layernorm = SPTorchNorm
    spec.submodules.pre_mlp_layernorm = SPTorchNorm
    return spec


def final_norm(impl: str) -> type:
    return _te_modules()[3] if impl == "transformer_engine" else SPTorchNorm


def block_spec(layer: ModuleSpec, num_layers: int, impl: str, with_final_norm: bool):
    return TransformerBlockSubmodules(
        layer_specs=[layer] * num_layers,
        layer_norm=final_norm(impl) if with_final_norm else None,
    )
