"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward contract,
no parameters, so checkpoint keys do not change). megatron-core's version materialises the
``[b, heads, s, s]`` scores; SDPA lets torch pick FlashAttention, cuDNN or memory-efficient
kernels on the GPU (the math kernel on the CPU) and never holds the scores on the fused paths.

Shapes (per tensor-parallel rank): query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``
(``ng`` query groups: grouped-query attention) -> context ``[sq, b, np * hn]``. Masks follow
megatron-core: causal by mask type, or a boolean ``attention_mask`` broadcastable to
``[b, np, sq, sk]`` that is True where attention is *not* allowed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, **_):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("model.attention_backend=sdpa does not support context parallelism")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("model.attention_backend=sdpa supports only the vanilla softmax")
        tp = pg_collection.tp.size() if pg_collection is not None else config.tensor_model_parallel_size
        self.attn_mask_type = attn_mask_type
        self.heads = config.num_attention_heads // tp
        self.groups = (config.num_query_groups or config.num_attention_heads) // tp
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("model.attention_backend=sdpa: apply_query_key_layer_scaling is fp16-only")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention: attention bias and packed sequences are not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        causal = mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None and not causal:
            mask = ~attention_mask  # SDPA: True = may attend
        dropout = self.dropout if self.training else 0.0
        kwargs = {"enable_gqa": True} if self.groups != self.heads else {}
        if dropout > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     is_causal=causal, scale=self.softmax_scale, **kwargs)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.softmax_scale, **kwargs)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * out.shape[-1])
