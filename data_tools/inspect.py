"""``megatron-emu-data inspect DIR``: validate a preprocessed dataset and show a few samples.

Checks every shard listed in ``dataset.json``: the tar reads to the end, every sample parses,
every image decodes at the dataset's image size, token ids are in the vocabulary (and equal a
re-tokenization of the stored text with ``--tokenizer``), image members match the image
segments, and ``index.npy`` agrees with the shards (offsets, token and image counts).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from data_tools.sources.tars import TarScan
from megatron_emu.data import shard_format as sf
from megatron_emu.contracts import chat_template
from megatron_emu.contracts import vocab as st
from megatron_emu.data.tokenizer import Emu2Tokenizer


_NAMES = {i: name for name, i in {**st.TOKEN_IDS, **st.CHAT_IDS}.items()}


def _check_image(data: bytes, size: int) -> Optional[str]:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a finding
        return f"image does not decode ({type(e).__name__}: {e})"
    if im.size != (size, size):
        return f"image is {im.size[0]}x{im.size[1]}, dataset says {size}"
    return None


def inspect(directory: str | Path, tokenizer: Optional[str] = None, show: int = 3) -> dict:
    """Returns ``{"shards", "documents", "broken": [messages], "samples": [...]}``."""
    directory = Path(directory)
    meta, index = sf.load_index(directory)
    tok = Emu2Tokenizer(tokenizer) if tokenizer else None
    size = int(meta["image_size"])
    broken: list[str] = []
    samples: list[dict] = []
    documents = 0
    for shard_id, name in enumerate(meta["shards"]):
        path = directory / name
        if not path.is_file():
            broken.append(f"{name}: missing")
            continue
        rows = index[index[:, sf.COL_SHARD] == shard_id]
        scan = TarScan(path)
        n = 0
        with open(path, "rb") as handle:
            for group in scan:
                where = f"{name}:{group.key}"
                members = {ext: group.read(ext, handle) for ext in group.members}
                problems = _check_sample(group.key, members, size, tok)
                if n < len(rows):
                    row = rows[n]
                    doc_json = members.get("json", b"{}")
                    offset = group.members.get("json", (0, 0))[0]
                    if not (row[sf.COL_OFFSET] < offset < row[sf.COL_OFFSET] + row[sf.COL_SIZE]):
                        problems.append("index.npy offset does not point at this sample")
                    problems += _check_counts(doc_json, row)
                else:
                    problems.append("sample missing from index.npy")
                broken += [f"{where}: {p}" for p in problems]
                if not problems and len(samples) < show:
                    samples.append(_show(group.key, members, tok))
                n += 1
        if scan.error:
            broken.append(f"{name}: tar ends early ({scan.error})")
        if n != len(rows):
            broken.append(f"{name}: {n} samples in the tar, {len(rows)} in index.npy")
        documents += n
    return {"shards": len(meta["shards"]), "documents": documents, "broken": broken,
            "samples": samples}


def _check_sample(key: str, members: dict, size: int, tok) -> list[str]:
    try:
        doc = sf.decode_document(key, members, keep_text=True)
    except sf.ShardFormatError as e:
        return [str(e)]
    problems = []
    jpgs = sorted(e for e in members if e.endswith(".jpg"))
    if len(jpgs) != doc.n_images:
        problems.append(f"{len(jpgs)} image members for {doc.n_images} image segments")
    for kind, value in doc.segments:
        if kind in ("image", "video"):
            for frame in ([value] if kind == "image" else value):
                msg = _check_image(frame, size)
                if msg:
                    problems.append(msg)
            continue
        if kind == "special":
            problem = chat_template.special_problem(value, doc.kind)
            if problem:
                problems.append(problem)
            continue
        text, ids = value
        if any(not 0 <= i < st.EMU2_VOCAB_SIZE for i in ids):
            problems.append("token id outside the Emu2 vocabulary")
        elif any(i >= st.LLAMA_VOCAB_SIZE or i in (st.BOS_ID, st.EOS_ID) for i in ids):
            problems.append("special token id in a text segment")
        elif tok is not None and tok.encode(text) != ids:
            problems.append("token ids differ from the tokenizer's encoding of the text")
    return problems


def _check_counts(doc_json: bytes, row: np.ndarray) -> list[str]:
    try:
        meta = json.loads(doc_json)
        n_text = sum(len(s["ids"]) if "ids" in s else 1 for s in meta["segments"] if "ids" in s or "special" in s)
        n_img = sum(1 if "image" in s else len(s["video"]) for s in meta["segments"]
                    if "image" in s or "video" in s)
        n_video = sum(1 for s in meta["segments"] if "video" in s)
    except (ValueError, KeyError, TypeError):
        return []  # already reported by _check_sample
    out = []
    if n_text != row[sf.COL_TEXT]:
        out.append(f"{n_text} text tokens, index.npy says {row[sf.COL_TEXT]}")
    if n_img != row[sf.COL_IMAGES]:
        out.append(f"{n_img} images, index.npy says {row[sf.COL_IMAGES]}")
    if len(row) > sf.COL_VIDEOS and n_video != row[sf.COL_VIDEOS]:
        out.append(f"{n_video} videos, index.npy says {row[sf.COL_VIDEOS]}")
    return out


def _show(key: str, members: dict, tok) -> dict:
    doc = sf.decode_document(key, members, keep_text=True)
    parts = []
    for kind, value in doc.segments:
        if kind == "image":
            parts.append("[IMG]<image>...[/IMG]")
        elif kind == "video":
            parts.append(f"[VIDEO]({len(value)} frames)")
        elif kind == "special":
            parts.append(_NAMES.get(value, str(value)))
        else:
            parts.append(tok.decode(value[1]) if tok else value[0])
    return {"key": key, "kind": doc.kind, "images": doc.n_images, "text": " ".join(parts)[:300]}
