"""Write a megatron-core (torch_dist) checkpoint one layer group at a time, without holding it.

megatron-core's ``dist_checkpointing.save`` writes a whole state dict at once, so a converter
that calls it must hold every tensor of its shard. Here each rank knows, from the config alone,
every key, global shape, TP/PP offset and replica it stores (``layout.rank_targets``: neither
megatron-core nor the model is needed), then, group by group, fills real tensors and appends
each main-replica region as one torch DCP item (a ``torch.save`` archive, as DCP's own writer
stores it) to this rank's single data file ``__<rank>_0.distcp`` (``DcpWriter``). The CRC-32 of
every item is taken from the bytes as they are written (no second read for ``checksums.json``).
``finish`` then gathers every rank's items and writes the torch DCP ``.metadata`` megatron-core
would have written for the same sharded state dict (``tests/conversion/test_stream.py`` holds the
two equal), with every tensor checked to be covered exactly by its chunks, plus megatron-core's
``metadata.json`` and an empty ``common.pt``; ``_extra_state`` objects are left out
(``checkpointing.load_weights`` accepts their absence).

Peak memory per rank: one group's input tensors, their canonical form and this rank's slices.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from megatron_emu.checkpoint.safetensors_io import write_all

# megatron-core's ``metadata.json`` (``dist_checkpointing.core.CheckpointingConfig("torch_dist")``).
MCORE_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                "common_backend_version": 1}


class MergeError(RuntimeError):
    """The ranks' items do not add up to a complete checkpoint (a bug, not bad input)."""


def fill(target, offsets: tuple, full: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The data of ``target`` (a ``layout.Target``): its region of the canonical ``full``
    tensor with its own, contiguous storage of exactly the region's bytes (``torch.save``
    writes a tensor's whole storage), shaped as stored (a stacked key's leading layer axis
    prepended). A view of ``full``'s bytes when the region is contiguous and of the right dtype,
    else a copy."""
    region = full[tuple(slice(o, o + n) for o, n in zip(offsets, target.shape))]
    if region.dtype == dtype and region.is_contiguous():
        start = region.storage_offset() * region.element_size()
        storage = region.untyped_storage()[start:start + region.nbytes]
        data = torch.empty(0, dtype=dtype).set_(storage, 0, region.shape, region.stride())
    else:
        data = region.to(dtype=dtype, copy=True).contiguous()
    return data.view((1,) * target.prepend_axis_num + tuple(data.shape))


class _CrcFile:
    """The data file, written through: every byte also goes into the current item's CRC-32.
    ``substitute``: ``(address, size, buffers)``: the write of those ``size`` bytes at that
    address (a placeholder tensor's storage, never touched) writes ``buffers`` instead."""

    def __init__(self, path: Path):
        from megatron_emu.checkpoint.integrity import crc32

        self.file, self.crc32, self.crc, self.pos = open(path, "wb"), crc32, 0, 0
        self.substitute = None

    def write(self, data) -> int:
        view = memoryview(data)
        if self.substitute and view.nbytes == self.substitute[1] and \
                np.frombuffer(view, dtype=np.uint8).ctypes.data == self.substitute[0]:
            buffers, self.substitute = self.substitute[2], None
            self.file.flush()
            write_all(self.file.fileno(), buffers)
        else:
            self.file.write(view)
            buffers = [view]
        # The CRC of the same bytes, taken after they are written.
        for b in buffers:
            self.crc = self.crc32(b, self.crc)
        self.pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.file.flush()


class DcpWriter:
    """This rank's data file: ``add`` / ``add_rows`` append one DCP item per main-replica target."""

    def __init__(self, out: Path, rank: int):
        self.name = f"__{rank}_0.distcp"
        self.out, self.stream = Path(out), _CrcFile(Path(out) / self.name)
        self.items: list[tuple] = []  # (key, global shape, dtype, offsets, sizes, start, length, crc)

    def add(self, target, offsets: tuple, full: torch.Tensor, dtype: torch.dtype) -> None:
        """Write ``target``'s region of ``full`` (nothing for a replica another rank writes)."""
        self._save(target, lambda: fill(target, offsets, full, dtype))

    def add_rows(self, target, buffers: list, dtype: torch.dtype) -> None:
        """Write ``target`` given as the bytes of its data in pieces (``buffers``, in order):
        ``torch.save`` writes a placeholder of its shape whose storage, never touched, is
        replaced by the pieces as it is written (nothing is joined or copied first)."""
        def placeholder():
            data = torch.empty((1,) * target.prepend_axis_num + tuple(target.shape), dtype=dtype)
            if sum(memoryview(b).nbytes for b in buffers) != data.nbytes:
                raise MergeError(f"{target.key}: {data.nbytes} bytes expected from the pieces")
            if data.nbytes:
                self.stream.substitute = (data.data_ptr(), data.nbytes, buffers)
            return data
        self._save(target, placeholder)
        if self.stream.substitute is not None:
            raise MergeError(f"{target.key}: torch.save did not write the placeholder's storage at once")

    def _save(self, target, data) -> None:
        from torch.utils.serialization import config as serialization

        if not target.main:
            return
        data = data()
        start, self.stream.crc = self.stream.tell(), 0
        # The zip CRC-32 torch.save computes for every item costs a pass over the data that
        # nothing reads (torch.load does not check it; checksums.json covers the files), and it
        # would read add_rows' placeholders: off for these saves only.
        before, serialization.save.compute_crc32 = serialization.save.compute_crc32, False
        try:
            torch.save(data, self.stream)
        finally:
            serialization.save.compute_crc32 = before
        self.items.append((target.key, tuple(target.global_shape), data.dtype, tuple(target.global_offset),
                           tuple(data.shape), start, self.stream.tell() - start, self.stream.crc))

    def close(self) -> dict:
        """Flush and fsync the data file; returns its ``checksums.json`` entry (one block per item)."""
        self.stream.flush()
        os.fsync(self.stream.file.fileno())
        self.stream.file.close()
        return {self.name: {"size": self.stream.tell(), "blocks": [[i[5], i[6], i[7]] for i in self.items]}}


def _all_gather(obj) -> list:
    """``obj`` of every rank (no process group: this is the only rank)."""
    if not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def finish(writer: DcpWriter) -> dict:
    """Collective: close every rank's writer, then rank 0 writes ``.metadata`` (``dcp_metadata``),
    ``metadata.json`` (as megatron-core's ``save_config`` writes it) and ``common.pt``. Returns
    every data file's ``checksums.json`` entry (on every rank)."""
    from megatron_emu.checkpoint import dcp_metadata

    entry = writer.close()
    gathered = _all_gather((writer.name, writer.items, entry))
    distributed = torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        tensors, chunks, seen = {}, [], set()
        for name, items, _ in gathered:
            for key, size, dtype, offsets, sizes, start, length, _crc in items:
                if tensors.setdefault(key, (size, dtype, []))[:2] != (size, dtype):
                    raise MergeError(f"{key}: ranks disagree on shape/dtype ({tensors[key][:2]} vs {size, dtype})")
                if (key, offsets) in seen:
                    raise MergeError(f"{key} at {offsets} is written twice")
                seen.add((key, offsets))
                tensors[key][2].append((offsets, sizes))
                chunks.append((name, key, size, dtype, offsets, sizes, start, length))
        check_coverage({key: (size, lst) for key, (size, _, lst) in tensors.items()})
        tmp = writer.out / ".metadata.tmp"
        with open(tmp, "wb") as f:  # torch DCP's own metadata format (FileSystemWriter.finish)
            f.write(dcp_metadata.dumps(chunks, str(writer.out), str(uuid.uuid4())))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, writer.out / ".metadata")
        (writer.out / "metadata.json").write_text(json.dumps(MCORE_CONFIG))
        torch.save({}, writer.out / "common.pt")  # the common state: every entry here is sharded
    if distributed:
        torch.distributed.barrier()
    return {k: v for _, _, e in gathered for k, v in e.items()}


def check_coverage(tensors: dict) -> None:
    """Every tensor's chunks lie inside it, start at distinct offsets and add up to its volume:
    ``{key: (size, [(offsets, sizes), ...])}``."""
    for key, (size, chunks) in tensors.items():
        seen, volume = set(), 0
        for offsets, sizes in chunks:
            if offsets in seen or any(o < 0 or o + n > s for o, n, s in zip(offsets, sizes, size)):
                raise MergeError(f"{key}: chunk at {offsets} of size {sizes} overlaps or leaves {size}")
            seen.add(offsets)
            volume += math.prod(sizes)
        if volume != math.prod(size):
            raise MergeError(f"{key}: chunks cover {volume} of {math.prod(size)} elements")
