"""Emu2 configuration for transformers (``AutoConfig`` with ``trust_remote_code=True``).

Written for megatron_emu, which copies this file into every Emu2 directory that
``megatron-emu-convert mcore-to-hf`` writes. It reads the ``config.json`` fields of BAAI's
Emu2 / Emu2-Chat / Emu2-Gen releases (the LLaMA decoder's fields, ``d_model`` = the visual
width, ``model_version`` "base" or "chat", and ``vision_config``, a plain dict), so BAAI's
directories load with it too.
"""

from transformers import PretrainedConfig

VISION_DEFAULTS = {
    "image_size": 448, "patch_size": 14, "width": 1792, "layers": 64, "head_width": 112,
    "mlp_ratio": 8.571428571428571, "layer_norm_eps": 1e-6, "postnorm": True, "qkv_bias": True,
    "n_query": 64, "v_query": 64, "drop_path_rate": 0, "xattn": True, "eva_model_name": "eva-clip-E-14-plus",
}


class EmuConfig(PretrainedConfig):
    """Emu2: an EVA-CLIP ViT (``vision_config``), 2-D average pooling to ``n_query`` tokens,
    ``project_up`` into a LLaMA decoder, the LM head and ``project_down`` (regression into the
    ``d_model``-wide visual space). Defaults are BAAI/Emu2's (37B)."""

    _auto_class = "AutoConfig"

    def __init__(self, vocab_size=32272, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                 num_attention_heads=52, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                 initializer_range=0.02, rms_norm_eps=1e-6, model_version="base", pad_token_id=32000,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, use_cache=True, pretraining_tp=1,
                 rope_theta=10000.0, rope_scaling=None, attention_bias=False, attention_dropout=0.0,
                 d_model=1792, vision_config=None, **kwargs):
        if model_version not in ("base", "chat"):
            raise ValueError(f"model_version must be 'base' or 'chat', got {model_version!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.model_version = model_version
        self.use_cache = use_cache
        self.pretraining_tp = pretraining_tp
        self.rope_theta = rope_theta
        if rope_scaling is not None:  # (transformers 5 warns about the attribute itself)
            self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.d_model = d_model
        self.vision_config = {**VISION_DEFAULTS, **(vision_config or {})}
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def llama_kwargs(self) -> dict:
        """The arguments of the ``LlamaConfig`` of the decoder."""
        out = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                   intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                   num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                   hidden_act=self.hidden_act, max_position_embeddings=self.max_position_embeddings,
                   initializer_range=self.initializer_range, rms_norm_eps=self.rms_norm_eps,
                   use_cache=self.use_cache, pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
                   eos_token_id=self.eos_token_id, tie_word_embeddings=False, pretraining_tp=self.pretraining_tp,
                   rope_theta=self.rope_theta, attention_bias=self.attention_bias,
                   attention_dropout=self.attention_dropout)
        if getattr(self, "rope_scaling", None):
            out["rope_scaling"] = self.rope_scaling
        return out
