"""Prompts with videos for ``megatron-emu-generate --video``.

A ``<video>`` placeholder in the prompt marks where each ``--video`` goes (in order), as
``<image>`` marks each ``--image``. A video becomes the training layout's block (``[VIDEO]`` +
per frame ``[IMG]`` + ``[gIMG]`` x n_query + ``[/IMG]``) and its frames are sampled exactly as
preprocessing samples them (``megatron_emu/data/video.py``), resized bicubic to the model size
and CLIP-normalised like images.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_emu.contracts import chat_template, image_layout
from megatron_emu.contracts import vocab

_PLACEHOLDERS = re.compile(f"({re.escape(vocab.IMAGE)}|{re.escape(image_layout.VIDEO_PLACEHOLDER)})")


def prompt_ids(text: str, tokenizer, n_query: int, n_frames: int) -> tuple[list[int], list[str]]:
    """``<s>`` + text with every ``<image>`` expanded to an image block and every ``<video>``
    to a video block of ``n_frames`` frames; returns (ids, ["image" | "video", ...] in order)."""
    ids, order = [vocab.BOS_ID], []
    for part in _PLACEHOLDERS.split(text):
        if part == vocab.IMAGE:
            ids += image_layout.image_block(n_query)
            order.append("image")
        elif part == image_layout.VIDEO_PLACEHOLDER:
            ids += image_layout.video_block(n_frames, n_query)
            order.append("video")
        elif part:
            ids += tokenizer.encode(part)
    return ids, order


def chat_prompt_ids(question: str, system: str, tokenizer, n_query: int, n_frames: int) -> tuple[list[int], list[str]]:
    """``megatron-emu-generate --chat``: the question in the chat template (``<s>`` system message
    ``[USER]: question [ASSISTANT]:``, ``contracts/chat_template.py``), its placeholders expanded
    as by ``prompt_ids``, each text piece encoded on its own as preprocessing does."""
    ids, order = [vocab.BOS_ID], []
    for part in chat_template.generation_prompt(question, system):
        if part.kind == "token":
            ids.append(part.value)
            continue
        for piece in _PLACEHOLDERS.split(part.value):
            if piece in (vocab.IMAGE, image_layout.VIDEO_PLACEHOLDER):
                more, kinds = prompt_ids(piece, tokenizer, n_query, n_frames)
                ids, order = ids + more[1:], order + kinds
            elif piece.strip():
                ids += tokenizer.encode(chat_template.normalize_text(piece))  # as preprocessing
    return ids, order


def load_video(path: str, n_frames: int, size: int) -> torch.Tensor:
    """A video file -> its ``n_frames`` sampled frames, CLIP-normalised ``[n_frames, 3, size, size]``.
    A file that does not decode raises ``ValueError`` naming it."""
    import numpy as np
    from PIL import Image

    from megatron_emu.data.decode import normalize
    from megatron_emu.data.video import decode_frames

    try:
        frames = decode_frames(Path(path).read_bytes(), n_frames)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - demuxers/decoders of crafted files raise anything
        raise ValueError(f"--video {path}: not a readable video ({type(e).__name__}: {e})") from None
    arrays = [np.asarray(f.resize((size, size), Image.BICUBIC)).transpose(2, 0, 1).copy() for f in frames]
    return normalize(torch.from_numpy(np.stack(arrays)))
