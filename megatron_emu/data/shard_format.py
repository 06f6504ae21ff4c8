"""The on-disk dataset format shared by ``data_tools`` (writer) and the loader (reader).

A dataset directory holds plain WebDataset tar shards (any WebDataset or energon reader can
read them) and a random-access index::

    DIR/shard-000000.tar     one sample per document: KEY.json + KEY.0.jpg, KEY.1.jpg, ...
    DIR/shard-000000.json    that shard's stats and per-document index rows (written after the tar)
    DIR/index.npy            int64 [N, 7]: shard, byte offset, byte size, text tokens (special
                             segments included), images
                             (video frames included), kind, videos ([N, 6] in version 1)
    DIR/dataset.json         format version, image size, tokenizer fingerprint, shard names;
                             ``incomplete: reason`` while a run rewrites shards or after one failed
    DIR/summary.json         documents, images, text_tokens, shards, skipped{reason: count}

``KEY.json`` = ``{"kind": "pair"|"interleaved"|"chat"|"grounded"|"edit", "segments": [{"text": str,
"ids": [int]} | {"special": int} | {"image": i} | {"video": [i, j, ...]}, ...], "source": {...}}``:
ordered text segments (already tokenized with the Emu2 tokenizer, without ``<s>``/``</s>``),
special tokens between them (the chat template's and the grounding vocabulary's,
``contracts/chat_template.py``), images (JPEG members ``KEY.i.jpg``, resized for the model) and
videos (their sampled frames, in order, as JPEG members numbered with the images). A segment with
``"loss": false`` is no cross-entropy target (the prompt of a conversation). A "pair" is one image
or video and one caption; the loader decides its order. "chat" is a conversation, "grounded" and
"edit" are image-generation samples (docs/tuning.md). Version 2 added videos (and the index's
videos column), version 3 the chat and generation kinds, special segments and ``loss``; older
datasets are still read.
This module imports only the standard library and numpy.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 3
READABLE_VERSIONS = {1: 6, 2: 7, 3: 7}  # format version -> index.npy columns
SHARD_PATTERN = "shard-{:06d}"
INDEX_FILE = "index.npy"
DATASET_FILE = "dataset.json"
SUMMARY_FILE = "summary.json"
KIND_CODES = {"pair": 0, "interleaved": 1, "chat": 3, "grounded": 4, "edit": 5}
KIND_NAMES = {v: k for k, v in KIND_CODES.items()}
# Columns of index.npy.
COL_SHARD, COL_OFFSET, COL_SIZE, COL_TEXT, COL_IMAGES, COL_KIND, COL_VIDEOS = range(7)


class ShardFormatError(ValueError):
    """A sample or a dataset directory does not follow this format."""


@dataclass
class Document:
    """One interleaved document: ``segments`` in order, each ``("text", ids)``,
    ``("special", id)``, ``("image", jpeg_bytes)`` or ``("video", [jpeg_bytes, ...])`` (frames in
    order); ``no_loss``: indices of the segments that are no cross-entropy targets."""

    key: str
    kind: str
    segments: list[tuple[str, object]] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    no_loss: frozenset = frozenset()

    @property
    def n_images(self) -> int:
        """Visual inputs of the ViT: images and video frames."""
        return sum(1 if k == "image" else len(v) for k, v in self.segments if k in ("image", "video"))

    @property
    def n_videos(self) -> int:
        return sum(1 for k, _ in self.segments if k == "video")


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
        elif kind == "special":
            segments.append({"special": int(value)})
        elif kind == "video":
            segments.append({"video": list(range(n, n + len(value)))})
            for frame in value:
                members[f"{n}.jpg"] = frame
                n += 1
        else:
            members[f"{n}.jpg"] = value
            segments.append({"image": n})
            n += 1
    for i in doc.no_loss:
        segments[i]["loss"] = False
    meta = {"kind": doc.kind, "segments": segments, "source": doc.source}
    members["json"] = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()
    return members


def decode_document(key: str, members: dict[str, bytes], keep_text: bool = False) -> Document:
    """Inverse of ``encode_document``: text segments become ``("text", ids)`` (or
    ``("text", (text, ids))`` with ``keep_text``) and images ``("image", jpeg_bytes)``."""
    try:
        meta = json.loads(members["json"])
        kind = meta["kind"]
        segments, no_loss = [], set()
        for seg in meta["segments"]:
            if seg.get("loss", True) is not True:
                no_loss.add(len(segments))
            if "special" in seg:
                segments.append(("special", int(seg["special"])))
            elif "image" in seg:
                segments.append(("image", members[f"{int(seg['image'])}.jpg"]))
            elif "video" in seg:
                frames = [members[f"{int(i)}.jpg"] for i in seg["video"]]
                if not frames:
                    raise ValueError("a video without frames")
                segments.append(("video", frames))
            else:
                ids = [int(i) for i in seg["ids"]]
                segments.append(("text", (seg.get("text", ""), ids) if keep_text else ids))
    except (KeyError, TypeError, ValueError) as e:
        raise ShardFormatError(f"sample {key!r}: {type(e).__name__}: {e}") from None
    if kind not in KIND_CODES:
        raise ShardFormatError(f"sample {key!r}: unknown kind {kind!r}")
    return Document(key=key, kind=kind, segments=segments, source=meta.get("source", {}),
                    no_loss=frozenset(no_loss))


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


def document_length(text_tokens, n_images, tokens_per_image: int, n_videos=0):
    """Tokens of a document in a sequence: ``<s>`` + text + images and video frames x (``[IMG]``
    + n_query slots + ``[/IMG]``) + one ``[VIDEO]`` per video + ``</s>``. Works on ints and numpy
    arrays."""
    return 2 + text_tokens + n_images * tokens_per_image + n_videos


def videos_column(index: np.ndarray) -> np.ndarray:
    """Videos per document (zeros for a version-1 index, which has no such column)."""
    if index.shape[1] > COL_VIDEOS:
        return np.asarray(index[:, COL_VIDEOS])
    return np.zeros(len(index), dtype=np.int64)


def load_index(directory: str | Path) -> tuple[dict, np.ndarray]:
    """``(dataset.json, index [N, 7] int64 memory-mapped; [N, 6] for version 1)`` of a dataset
    directory."""
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
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ShardFormatError(f"{meta_file}: format_version {version} "
                               f"(this release reads {sorted(READABLE_VERSIONS)})")
    index = np.load(index_file, mmap_mode="r", allow_pickle=False)
    columns = READABLE_VERSIONS[version]
    if index.ndim != 2 or index.shape[1] != columns:
        raise ShardFormatError(f"{index_file}: expected shape [N, {columns}], got {index.shape}")
    return meta, index
