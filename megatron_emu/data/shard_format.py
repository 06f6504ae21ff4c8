"""The on-disk dataset format shared by ``data_tools`` (writer) and the loader (reader).

A dataset directory holds plain WebDataset tar shards (any WebDataset or energon reader can
read them) and a random-access index::

    DIR/shard-000000.tar     one sample per document: KEY.json + KEY.0.jpg, KEY.1.jpg, ...
    DIR/shard-000000.json    that shard's stats and per-document index rows (written after the tar)
    DIR/index.npy            int64 [N, 6]: shard, byte offset, byte size, text tokens, images, kind
    DIR/dataset.json         format version, image size, tokenizer fingerprint, shard names;
                             ``incomplete: reason`` while a run rewrites shards or after one failed
    DIR/summary.json         documents, images, text_tokens, shards, skipped{reason: count}

``KEY.json`` = ``{"kind": "pair"|"interleaved", "segments": [{"text": str, "ids": [int]} |
{"image": i}, ...], "source": {...}}``: ordered text segments (already tokenized with the Emu2
tokenizer, without ``<s>``/``</s>``) and images (JPEG members ``KEY.i.jpg``, resized for the
model). A "pair" is one image and one caption; the loader decides its order.
This module imports only the standard library and numpy.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
SHARD_PATTERN = "shard-{:06d}"
INDEX_FILE = "index.npy"
DATASET_FILE = "dataset.json"
SUMMARY_FILE = "summary.json"
KIND_CODES = {"pair": 0, "interleaved": 1}
KIND_NAMES = {v: k for k, v in KIND_CODES.items()}
# Columns of index.npy.
COL_SHARD, COL_OFFSET, COL_SIZE, COL_TEXT, COL_IMAGES, COL_KIND = range(6)


class ShardFormatError(ValueError):
    """A sample or a dataset directory does not follow this format."""


@dataclass
class Document:
    """One interleaved document: ``segments`` in order, each ``("text", ids)`` or
    ``("image", jpeg_bytes)``."""

    key: str
    kind: str
    segments: list[tuple[str, object]] = field(default_factory=list)
    source: dict = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return sum(1 for k, _ in self.segments if k == "image")


def safe_member_name(name: str) -> bool:
    """False for tar member names that could escape a directory (absolute or with ``..``)."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


def split_key(name: str) -> tuple[str, str]:
    """WebDataset grouping: ``dir/abc.0.jpg`` -> (``dir/abc``, ``0.jpg``) (basename up to the first dot)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def encode_document(doc: Document) -> dict[str, bytes]:
    """Tar members (``ext -> bytes``) of a document."""
    segments, members, n = [], {}, 0
    for kind, value in doc.segments:
        if kind == "text":
            segments.append({"text": value[0], "ids": list(map(int, value[1]))})
        else:
            members[f"{n}.jpg"] = value
            segments.append({"image": n})
            n += 1
    meta = {"kind": doc.kind, "segments": segments, "source": doc.source}
    members["json"] = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()
    return members


def decode_document(key: str, members: dict[str, bytes], keep_text: bool = False) -> Document:
    """Inverse of ``encode_document``: text segments become ``("text", ids)`` (or
    ``("text", (text, ids))`` with ``keep_text``) and images ``("image", jpeg_bytes)``."""
    try:
        meta = json.loads(members["json"])
        kind = meta["kind"]
        segments = []
        for seg in meta["segments"]:
            if "image" in seg:
                segments.append(("image", members[f"{int(seg['image'])}.jpg"]))
            else:
                ids = [int(i) for i in seg["ids"]]
                segments.append(("text", (seg.get("text", ""), ids) if keep_text else ids))
    except (KeyError, TypeError, ValueError) as e:
        raise ShardFormatError(f"sample {key!r}: {type(e).__name__}: {e}") from None
    if kind not in KIND_CODES:
        raise ShardFormatError(f"sample {key!r}: unknown kind {kind!r}")
    return Document(key=key, kind=kind, segments=segments, source=meta.get("source", {}))


def write_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member with fixed metadata, so equal inputs give byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def read_span(path: str | Path, offset: int, size: int, handle=None) -> dict[str, bytes]:
    """Members of the sample stored at ``[offset, offset + size)`` of a shard: ``ext -> bytes``."""
    if handle is None:
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(size)
    else:
        handle.seek(offset)
        raw = handle.read(size)
    if len(raw) != size:
        raise ShardFormatError(f"{path}: sample at byte {offset} is truncated")
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(raw + b"\0" * 1024), mode="r:") as tar:
        for m in tar:
            if m.isfile() and safe_member_name(m.name):
                out[split_key(m.name)[1]] = tar.extractfile(m).read()
    return out


def document_length(text_tokens, n_images, tokens_per_image: int):
    """Tokens of a document in a sequence: ``<s>`` + text + images x (``[IMG]`` + n_query x
    ``<image>`` + ``[/IMG]``) + ``</s>``. Works on ints and numpy arrays."""
    return 2 + text_tokens + n_images * tokens_per_image


def load_index(directory: str | Path) -> tuple[dict, np.ndarray]:
    """``(dataset.json, index [N, 6] int64 memory-mapped)`` of a dataset directory."""
    directory = Path(directory)
    meta_file, index_file = directory / DATASET_FILE, directory / INDEX_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{meta_file}: not a JSON object")
    if meta.get("incomplete"):
        raise ShardFormatError(f"{directory} is an incomplete dataset ({meta['incomplete']}); finish it by "
                               f"re-running the same `megatron-emu-data preprocess` command or array job")
    if not meta_file.is_file() or not index_file.is_file():
        raise ShardFormatError(f"{directory} is not a megatron_emu dataset (no {DATASET_FILE} or "
                               f"{INDEX_FILE}; make it with `megatron-emu-data preprocess`)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{meta_file}: format_version {meta.get('format_version')} "
                               f"(this release reads {FORMAT_VERSION})")
    index = np.load(index_file, mmap_mode="r", allow_pickle=False)
    if index.ndim != 2 or index.shape[1] != 6:
        raise ShardFormatError(f"{index_file}: expected shape [N, 6], got {index.shape}")
    return meta, index
