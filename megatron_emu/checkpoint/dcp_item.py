"""One tensor item of a torch DCP data file (``*.distcp``), loaded without copying its data.

DCP stores each tensor item as a ``torch.save`` archive (an uncompressed zip: ``data.pkl``
plus one record per storage) at an offset of a data file. ``torch.load`` of such an item reads
the record into a fresh storage (a copy of every byte); here the item is memory-mapped
(copy-on-write, so the tensor is writable and the file never changes), ``data.pkl`` is read by
torch's own weights-only unpickler (the same one ``torch.load(weights_only=True)`` uses: it runs
nothing a file names), and the storages are views of the mapped records, as ``torch.load(...,
mmap=True)`` does for a file of its own. Pages are only mapped, not copied; they are released
with the tensor. Anything unexpected (another archive layout, a big-endian item) falls back to
``safe_pickle.torch_load``, which refuses what the weights-only unpickler refuses.
"""

from __future__ import annotations

import io
import mmap
import struct
import sys
import zipfile

import torch

from megatron_emu.checkpoint.safe_pickle import torch_load


def _records(view: memoryview) -> dict[str, tuple[int, int]]:
    """Record name (without the archive's top folder) -> (offset, size) of its bytes in ``view``."""
    out = {}
    with zipfile.ZipFile(_Reader(view)) as zf:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError("compressed record")
            name_len, extra_len = struct.unpack_from("<HH", view, info.header_offset + 26)
            out[info.filename.split("/", 1)[-1]] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def _load_mapped(view: memoryview) -> torch.Tensor:
    from torch import _weights_only_unpickler

    records = _records(view)
    order = bytes(view[slice(*_span(records["byteorder"]))]) if "byteorder" in records else b"little"
    if order != b"little" or sys.byteorder != "little":
        raise ValueError("not a little-endian archive")
    storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id):
        typename, storage_type, key, _location, numel = saved_id
        if typename != "storage":
            raise ValueError(f"unknown persistent id {typename!r}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key not in storages:
            offset, size = records[f"data/{key}"]
            nbytes = numel * torch._utils._element_size(dtype)
            if nbytes > size:
                raise ValueError("record shorter than its storage")
            data = torch.frombuffer(view, dtype=torch.uint8, count=nbytes, offset=offset) if nbytes else \
                torch.empty(0, dtype=torch.uint8)
            storages[key] = torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=dtype,
                                                       _internal=True)
        return storages[key]

    pkl = bytes(view[slice(*_span(records["data.pkl"]))])
    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pkl), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    result = unpickler.load()
    if not isinstance(result, torch.Tensor):
        raise ValueError("not a tensor")
    return result


def _span(record: tuple[int, int]) -> tuple[int, int]:
    return record[0], record[0] + record[1]


class _Reader(io.RawIOBase):
    """A seekable read-only file over a memoryview (for ``zipfile``; no copy of the data)."""

    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else len(self.view) + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), len(self.view) - self.pos))
        b[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n


def map_range(fileno: int, offset: int, length: int) -> memoryview:
    """Bytes ``[offset, offset + length)`` of a file, memory-mapped copy-on-write."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(fileno, offset + length - start, offset=start, access=mmap.ACCESS_COPY)
    return memoryview(mapped)[offset - start:]


def load_item(view: memoryview, where: str) -> torch.Tensor:
    """The tensor of one DCP item (``view``: its bytes), sharing ``view``'s memory."""
    try:
        return _load_mapped(view)
    except Exception:  # noqa: BLE001 - anything unusual: torch's own loader decides (and refuses)
        return torch_load(io.BytesIO(bytes(view)), where)
