"""Text generation after an interleaved prompt (text and images), on one CPU or GPU rank.

The model is built at TP1/PP1 and filled from a megatron_emu checkpoint of any layout
(megatron-core resharding) or from a Hugging Face Emu2 directory (``hf_mapping.from_hf``).
Each step reruns the full sequence (no KV cache: meant for checks and small models, not
serving). Images are resized to the model size with bicubic filtering and CLIP-normalised.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from megatron_emu.contracts import vocab as st


def _single_rank_config(cfg):
    par = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              virtual_pipeline_model_parallel_size=None, sequence_parallel=False,
                              num_layers_in_first_pipeline_stage=None, data_parallel_size=None)
    model = dataclasses.replace(cfg.model, transformer_impl="local") if not _has_cuda() else cfg.model
    return dataclasses.replace(cfg, parallel=par, model=model)


def _has_cuda() -> bool:
    from megatron_emu.utils import device
    return device.has_cuda()


def load_model(ckpt: Optional[str] = None, hf: Optional[str] = None, verify: bool = True):
    """``(model chunk, cfg, tokenizer dir or None)``; call inside an initialised process group.
    ``verify``: check the checkpoint's files (its tokenizer copy too) against its ``checksums.json``.
    ``hf``: an Emu2 directory in the HF or BAAI's native layout (``hf_source``)."""
    from megatron_emu.config.io import from_dict
    from megatron_emu.model.builder import build_model_chunks
    from megatron_emu.parallel.groups import init_distributed, init_model_parallel

    if ckpt is not None:
        from megatron_emu.checkpoint.convert import resolve_checkpoint
        from megatron_emu.checkpoint.model_state import read_meta

        from megatron_emu.checkpoint import tokenizer_files

        path = resolve_checkpoint(ckpt)
        cfg = _single_rank_config(from_dict(read_meta(path, verify)["config"]))
        tokenizer = tokenizer_files.find(path, None, cfg.data.tokenizer)  # the checkpoint's own copy first
        if tokenizer is not None and tokenizer == tokenizer_files.bundled(path) and verify:
            from megatron_emu.checkpoint.integrity import Manifest

            manifest = Manifest(path)
            for f in tokenizer_files.FILES:
                manifest.read_bytes(f"{tokenizer_files.SUBDIR}/{f}")
    else:
        from megatron_emu.checkpoint.convert import config_from_hf

        cfg = _single_rank_config(config_from_hf(hf))
        hf_dir = Path(hf) if Path(hf).is_dir() else Path(hf).parent
        tokenizer = hf_dir if (hf_dir / "tokenizer.model").is_file() else None
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, freeze=[]))
    init_distributed()
    pgs = init_model_parallel(cfg)
    (model,) = build_model_chunks(cfg, pgs)
    if ckpt is not None:
        from megatron_emu.checkpoint.model_state import load_model_state

        load_model_state(path, [model], verify)
    else:
        from megatron_emu.checkpoint.hf_mapping import Dims
        from megatron_emu.checkpoint.hf_source import CanonicalSource

        canonical = CanonicalSource({"": hf}, Dims.from_config(cfg)).canonical_all()
        missing, unexpected = model.load_state_dict(canonical, strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{hf}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return model, cfg, tokenizer


def prompt_ids(text: str, tokenizer, n_query: int) -> tuple[list[int], int]:
    """``<s>`` + text where every ``<image>`` placeholder becomes ``[IMG]`` + n_query x
    ``<image>`` + ``[/IMG]``; returns (ids, number of images)."""
    ids = [st.BOS_ID]
    parts = text.split(st.IMAGE)
    for i, part in enumerate(parts):
        if part:
            ids += tokenizer.encode(part)
        if i < len(parts) - 1:
            ids += [st.IMG_ID] + [st.IMAGE_ID] * n_query + [st.IMG_END_ID]
    return ids, len(parts) - 1


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """Image files -> CLIP-normalised ``[n, 3, size, size]`` float."""
    import numpy as np
    from PIL import Image

    from megatron_emu.data.decode import normalize

    arrays = []
    for p in paths:
        im = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(im).transpose(2, 0, 1).copy())
    return normalize(torch.from_numpy(np.stack(arrays))) if arrays else torch.empty(0, 3, size, size)


@torch.no_grad()
def generate(model, ids: list[int], images: Optional[torch.Tensor], max_new_tokens: int, greedy: bool = True,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0, eos: int = st.EOS_ID) -> list[int]:
    """New token ids (at most ``max_new_tokens``, stopping after ``</s>``)."""
    from megatron_emu.utils import device

    dev = device.device()
    tokens = torch.tensor([ids], dtype=torch.long, device=dev)
    if images is not None:
        images = images.to(dev, next(model.parameters()).dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.forward_logits(tokens, images)[0, -1].float().cpu()
        if greedy:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / max(temperature, 1e-5)
            if top_k:
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        out.append(nxt)
        if nxt == eos:
            break
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=dev)], dim=1)
    return out
