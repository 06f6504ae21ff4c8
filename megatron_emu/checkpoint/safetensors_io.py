"""Streaming safetensors shards: the header is computed from the planned tensor list, then the
tensors are written one by one as they are produced (never the whole shard in memory). Output
is standard safetensors (``safetensors.safe_open`` and transformers read it) plus a
``model.safetensors.index.json`` with ``metadata.total_size``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
INDEX_FILE = "model.safetensors.index.json"


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int) -> list[list]:
    """Split ``(name, shape, dtype)`` entries, in order, into shards of at most
    ``max_shard_bytes`` (a larger single tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for entry in entries:
        b = nbytes(entry[1], entry[2])
        if current and size + b > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += b
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardWriter:
    """Writes one planned shard: ``write(name, tensor)`` in the planned order, then ``close()``."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple, torch.dtype]]):
        self.path, self.entries, self.next = Path(path), entries, 0
        header, offset = {}, 0
        for name, shape, dtype in entries:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, shape, dtype = self.entries[self.next]
        if name != exp_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"shard {self.path.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {exp_name} {tuple(shape)} {dtype}")
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self.file.write(data.reshape(-1).view(torch.uint8).numpy().data)  # no extra copy
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.entries):
            raise RuntimeError(f"shard {self.path.name}: {len(self.entries) - self.next} tensors never written")
        self.file.close()


def write_index(directory: Path, shards: list[list], names: list[str]) -> dict:
    weight_map, total = {}, 0
    for entries, fname in zip(shards, names):
        for name, shape, dtype in entries:
            weight_map[name] = fname
            total += nbytes(shape, dtype)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


class HFReader:
    """Lazy access to the tensors of an HF directory (sharded or single safetensors file)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open
            with safe_open(self.dir / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no {INDEX_FILE} or model.safetensors (only safetensors "
                                    f"checkpoints are read: no pickled .bin files)")
        missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{self.dir}: missing shard(s) {missing}")
        self.weight_map = weight_map
        self._open: dict = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, fname: str):
        if fname not in self._open:
            from safetensors import safe_open
            self._open = {fname: safe_open(self.dir / fname, "pt")}  # one file open at a time
        return self._open[fname]

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        return self._handle(self.weight_map[name]).get_tensor(name)
