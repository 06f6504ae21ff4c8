"""Streaming safetensors shards: the header is computed from the planned tensor list, then the
tensors are written one by one as they are produced (never the whole shard in memory). Output
is standard safetensors (``safetensors.safe_open`` and transformers read it) plus a
``model.safetensors.index.json`` with ``metadata.total_size``. The format is a JSON header and
raw little-endian bytes: nothing is unpickled. ``read_header`` validates a file's header;
``hf_reader.HFReader`` reads such directories (and weights-only torch ``.bin`` files).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
ST_DTYPES = {v: k for k, v in DTYPES.items()}
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
        self.file = open(self.path, "wb", buffering=0)
        write_all(self.file.fileno(), [struct.pack("<Q", len(raw)) + raw])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu()
        self.write_buffers(name, tuple(data.shape), data.dtype,
                           [data.reshape(-1).view(torch.uint8).numpy().data] if data.numel() else [])

    def write_buffers(self, name: str, shape: tuple, dtype: torch.dtype, buffers: list) -> None:
        """The next planned tensor as the concatenation of ``buffers`` (its bytes, in order;
        written as they are, without joining them first)."""
        exp_name, exp_shape, exp_dtype = self.entries[self.next]
        size = sum(memoryview(b).nbytes for b in buffers)
        if name != exp_name or tuple(shape) != tuple(exp_shape) or dtype != exp_dtype or \
                size != nbytes(exp_shape, exp_dtype):
            raise RuntimeError(f"shard {self.path.name}: got {name} {tuple(shape)} {dtype} ({size} bytes), "
                               f"planned {exp_name} {tuple(exp_shape)} {exp_dtype}")
        write_all(self.file.fileno(), buffers)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.entries):
            raise RuntimeError(f"shard {self.path.name}: {len(self.entries) - self.next} tensors never written")
        self.file.close()


def write_all(fd: int, buffers: list) -> None:
    """``os.writev`` of every byte of ``buffers`` (at most ``IOV_MAX`` at a time; short writes
    resumed)."""
    import os

    pending = [memoryview(b).cast("B") for b in buffers if memoryview(b).nbytes]
    while pending:
        batch = pending[:1024]  # IOV_MAX on Linux
        done = os.writev(fd, batch)
        del pending[:len(batch)]
        for i, b in enumerate(batch):  # a short write: put back what was not written
            if done < b.nbytes:
                pending[:0] = [b[done:]] + batch[i + 1:]
                break
            done -= b.nbytes


def write_index(directory: Path, shards: list[list], names: list[str]) -> dict:
    weight_map, total = {}, 0
    for entries, fname in zip(shards, names):
        for name, shape, dtype in entries:
            weight_map[name] = fname
            total += nbytes(shape, dtype)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


class SafetensorsError(ValueError):
    """A file that is not valid safetensors; the one-line message names it and what is wrong."""


# Element sizes of the safetensors dtypes (the format's list; only ``DTYPES`` can be read here).
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER = 100 << 20  # the safetensors library's own limit


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entries(path: Path, header: dict, data_size: int) -> None:
    """As the safetensors format requires: known dtypes, non-negative shapes, offsets that are
    sorted, inside the data section, non-overlapping and covering it exactly, each spanning
    ``numel x itemsize`` bytes."""
    spans = []
    for name, e in header.items():
        bad = f"{path}: not a valid safetensors file: tensor {name!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{bad} needs exactly dtype, shape and data_offsets")
        if e["dtype"] not in ITEMSIZE:
            raise SafetensorsError(f"{bad} has unknown dtype {e['dtype']!r}")
        shape, offsets = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise SafetensorsError(f"{bad} has an invalid shape {shape!r} (non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise SafetensorsError(f"{bad} has data_offsets {offsets!r} outside the data section "
                                   f"[0, {data_size}] (a truncated or crafted file)")
        n = ITEMSIZE[e["dtype"]]
        for d in shape:
            n *= d
        if offsets[1] - offsets[0] != n:
            raise SafetensorsError(f"{bad} spans {offsets[1] - offsets[0]} bytes, its shape {shape} and "
                                   f"dtype {e['dtype']} need {n}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise SafetensorsError(f"{path}: not a valid safetensors file: tensor {name!r} starts at byte "
                                   f"{begin} of the data, expected {end} (tensors overlap or leave a hole)")
        end = stop
    if end != data_size:
        raise SafetensorsError(f"{path}: not a valid safetensors file: the tensors cover {end} of the "
                               f"{data_size} data bytes")


def read_header(path: Path) -> tuple[dict, int]:
    """``({name: {"dtype", "shape", "data_offsets"}}, data start)`` of a safetensors file,
    validated (``_check_entries``) before anything is read from it."""
    import os

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (truncated: {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise SafetensorsError(f"{path}: not a safetensors file (a header of {n} bytes, the limit is "
                                   f"{MAX_HEADER})")
        if 8 + n > size:
            raise SafetensorsError(f"{path}: truncated safetensors file (its header needs {8 + n} bytes, "
                                   f"the file has {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise SafetensorsError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise SafetensorsError(f"{path}: not a valid safetensors file (__metadata__ must map strings to strings)")
    _check_entries(path, header, size - 8 - n)
    return header, 8 + n
