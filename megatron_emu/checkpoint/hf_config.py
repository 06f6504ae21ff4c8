"""``config.json`` of the Hugging Face layouts (Emu2, emu2_spec.md §5.2; plain LLaMA) from our
config, and the reverse: architecture overrides read from an HF directory."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_emu.config.schema import EmuConfig
from megatron_emu.contracts import vocab as st

TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


def _lm_fields(cfg: EmuConfig, dtype: str) -> dict:
    lm = cfg.model.lm
    return {
        "bos_token_id": st.BOS_ID, "eos_token_id": st.EOS_ID, "pad_token_id": st.PAD_ID,
        "hidden_act": "silu", "hidden_size": lm.hidden_size, "initializer_range": cfg.model.init_method_std,
        "intermediate_size": lm.ffn_hidden_size, "max_position_embeddings": lm.max_position_embeddings,
        "num_attention_heads": lm.num_attention_heads, "num_hidden_layers": lm.num_layers,
        "num_key_value_heads": lm.num_query_groups or lm.num_attention_heads, "pretraining_tp": 1,
        "rms_norm_eps": lm.norm_eps, "rope_scaling": None, "rope_theta": lm.rope_theta,
        "tie_word_embeddings": False, "torch_dtype": TORCH_DTYPE[dtype], "use_cache": True,
        "vocab_size": lm.vocab_size, "attention_bias": False, "attention_dropout": 0.0,
    }


def emu2_config(cfg: EmuConfig, dtype: str, remote_code: bool = True) -> dict:
    """Every field of BAAI/Emu2's (or, ``model.model_version: chat``, Emu2-Chat's) config.json (no
    ``model_type``, as the original); ``remote_code``: with the ``auto_map`` naming our
    ``configuration_emu.py`` / ``modeling_emu.py``."""
    v = cfg.model.vision
    chat = cfg.model.model_version == "chat"
    out = {
        "_name_or_path": "emu2", "architectures": ["EmuForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_emu.EmuConfig",
                     "AutoModelForCausalLM": "modeling_emu.EmuForCausalLM"},
        "d_model": v.width, "model_version": cfg.model.model_version, "transformers_version": "4.31.0",
        **_lm_fields(cfg, dtype),
        "vision_config": {
            "drop_path_rate": 0, "eva_model_name": "eva-clip-E-14-plus", "head_width": v.width // v.num_heads,
            "image_size": v.image_size, "intermediate_size": v.mlp_dim, "layer_norm_eps": v.layer_norm_eps,
            "layers": v.num_layers, "mlp_ratio": v.mlp_dim / v.width, "n_query": cfg.model.adapter.n_query,
            "patch_size": v.patch_size, "postnorm": v.postnorm, "qkv_bias": True,
            # tokens per video frame: the model was trained with n_query per frame (docs/tuning.md)
            "v_query": cfg.model.adapter.n_query, "width": v.width, "xattn": not chat,
        },
    }
    if not remote_code:
        del out["auto_map"]
    return dict(sorted(out.items()))


def llama_config(cfg: EmuConfig, dtype: str) -> dict:
    return dict(sorted({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                        **_lm_fields(cfg, dtype), "mlp_bias": False, "head_dim":
                        cfg.model.lm.hidden_size // cfg.model.lm.num_attention_heads}.items()))


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return json.loads(path.read_text())


def lm_overrides(hf: dict) -> list[str]:
    """``--set`` style overrides of model.lm from a LLaMA / Emu2 config.json."""
    pairs = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
             "num_attention_heads": "num_attention_heads", "intermediate_size": "ffn_hidden_size",
             "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
             "max_position_embeddings": "max_position_embeddings"}
    out = [f"model.lm.{ours}={hf[theirs]}" for theirs, ours in pairs.items() if theirs in hf]
    kv = hf.get("num_key_value_heads")
    if kv is not None and kv != hf.get("num_attention_heads"):
        out.append(f"model.lm.num_query_groups={kv}")
    return out


def vision_overrides(hf: dict) -> list[str]:
    """Overrides of model.vision / model.adapter from an Emu2 ``vision_config``."""
    v = hf
    out = [f"model.vision.image_size={v['image_size']}", f"model.vision.patch_size={v['patch_size']}",
           f"model.vision.width={v['width']}", f"model.vision.num_layers={v['layers']}",
           f"model.vision.num_heads={v['width'] // v['head_width']}",
           f"model.vision.mlp_dim={v.get('intermediate_size') or int(v['width'] * v['mlp_ratio'])}",
           f"model.vision.layer_norm_eps={v.get('layer_norm_eps', 1e-6)}"]
    if "n_query" in v:
        out.append(f"model.adapter.n_query={v['n_query']}")
    return out


def emu2_overrides(hf: dict) -> list[str]:
    """Every model override an Emu2 config.json defines (LM, vision, vocabulary, version)."""
    version = hf.get("model_version", "base")
    return lm_overrides(hf) + vision_overrides(hf["vision_config"]) + [
        f"model.lm.vocab_size={hf['vocab_size']}", f"model.model_version={version}"]
