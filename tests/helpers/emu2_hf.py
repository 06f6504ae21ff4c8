"""Emu2 weight directories as BAAI ships them, written from the reference model's parameters
(HF names, tests/helpers/reference.py) without megatron_emu's mapping code.

Layouts (emu2_spec.md §5.4-5.6, and BAAI's GitHub ``Emu2/emu/{emu,lm,eva_vit}.py``):
* ``hf``: ``model.visual.*`` / ``model.decoder.lm.*``, fused ``attn.qkv.bias``, top-level ``project_*``;
* ``native``: no ``model.`` prefix, ``attn.q_bias`` / ``attn.v_bias`` (no qkv bias),
  ``decoder.lm.project_up/down`` (``heads="lm"``, what GitHub's ``EmuModel`` holds) or top-level
  ``project_*`` (``heads="top"``), and transformers 4.31's ``rotary_emb.inv_freq`` buffers.
Formats: safetensors or torch ``.bin``, one file or ``shards`` files with an index.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def native_state_dict(params: dict, heads: str = "lm", head_dim: int = 16, theta: float = 10000.0) -> dict:
    """HF-named reference parameters -> the native layout (see the module docstring)."""
    out = {}
    for name, t in params.items():
        if name in ("project_up.weight", "project_down.weight"):
            out[("decoder.lm." if heads == "lm" else "") + name] = t
            continue
        assert name.startswith("model."), name
        bare = name[len("model."):]
        if bare.endswith("attn.qkv.bias"):
            w = t.shape[0] // 3
            assert not t[w: 2 * w].any()  # the k third of a fused EVA bias is zero
            out[bare.replace("qkv.bias", "q_bias")] = t[:w].clone()
            out[bare.replace("qkv.bias", "v_bias")] = t[2 * w:].clone()
            continue
        out[bare] = t
        if bare.endswith("self_attn.q_proj.weight"):
            inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
            out[bare.replace("q_proj.weight", "rotary_emb.inv_freq")] = inv
    return out


def write_weights(directory: Path, tensors: dict, fmt: str = "safetensors", shards: int = 1,
                  stem: str = "model") -> None:
    """``tensors`` as ``fmt`` files in ``directory``: one file, or ``shards`` with an index."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{k + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: tensors[n].contiguous() for n in group}
        if fmt == "safetensors":
            save_file(part, directory / fname)
        else:
            torch.save(part, directory / fname)
        weight_map.update({n: fname for n in group})
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


def write_emu2_dir(directory: Path, params: dict, config: dict, tokenizer_dir: Path = None,
                   layout: str = "hf", fmt: str = "safetensors", shards: int = 1, heads: str = "lm",
                   stem: str = "model") -> Path:
    """An Emu2 directory: weights, ``config.json`` and (optionally) the tokenizer files."""
    tensors = params if layout == "hf" else native_state_dict(
        params, heads, config["hidden_size"] // config["num_attention_heads"], config["rope_theta"])
    write_weights(directory, tensors, fmt, shards, stem)
    (directory / "config.json").write_text(json.dumps(config))
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / f, directory / f)
    return directory


def same_files(a: Path, b: Path) -> None:
    """Two directories hold the same file names with the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
