"""This rank's micro-batches: read once per tensor-parallel group, broadcast to its peers.

Every rank of a TP group trains on the same micro-batch, so only its first rank runs a data
loader (reads shards, decodes images); the others receive the batch by broadcast. A pipeline
stage gets only the fields it uses (``contracts.batch``: the first stage tokens, images and
image rows; the last stage labels, CE mask and regression indices; stages in between nothing
and read nothing).

Host tensors travel over a CPU (gloo) group: a fixed-size header of shapes, then the tensors,
so no device synchronisation is involved. Images already on the GPU (DALI decoding) travel over
the device group, their shape known from the header.
"""

from __future__ import annotations

import datetime
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_emu.contracts.batch import FIRST_STAGE_FIELDS, LAST_STAGE_FIELDS, Emu2Batch
from megatron_emu.data.bad_samples import BadDataError
from megatron_emu.utils import device

_DTYPES = {"tokens": torch.int64, "labels": torch.int64, "ce_mask": torch.float32,
           "images": torch.uint8, "image_rows": torch.int64, "reg_rows": torch.int64,
           "reg_features": torch.int64}
_ORDER = tuple(_DTYPES)
_MAX_DIMS = 4  # a header slot: present, on_device, ndim, dims...
_SLOT = 3 + _MAX_DIMS


def stage_fields(first_stage: bool, last_stage: bool) -> tuple[str, ...]:
    return (FIRST_STAGE_FIELDS if first_stage else ()) + (LAST_STAGE_FIELDS if last_stage else ())


class BatchSource:
    """``next(source) -> Emu2Batch`` (host tensors, pinned when ``pin``; ``None`` where the
    stage needs nothing).

    loader: the data loader on the TP group's source rank, ``None`` on its peers.
    cpu_group / device_group: the TP group for host tensors (gloo) and for device tensors;
    ``None`` when TP = 1. src: the source's global rank.
    """

    def __init__(self, loader, ce_ignore_ids: Sequence[int], fields: Sequence[str],
                 cpu_group=None, device_group=None, src: int = 0, pin: bool = False):
        self.loader, self.ce_ignore_ids, self.fields = loader, tuple(ce_ignore_ids), tuple(fields)
        self.cpu_group, self.device_group, self.src, self.pin = cpu_group, device_group, src, pin
        self.is_source = loader is not None

    def __iter__(self):
        return self

    def __next__(self) -> Optional[Emu2Batch]:
        if not self.fields:
            return None
        batch, error = None, None
        if self.is_source:
            try:
                batch = next(self.loader).to_batch(self.ce_ignore_ids).only(self.fields)
            except Exception as e:  # noqa: BLE001 - re-raised here and on every peer below
                error = e
        if self.cpu_group is not None:
            self._share_error(error)
            batch = self._broadcast(batch)  # peers receive into pinned buffers directly
        elif error is not None:
            raise error
        return batch.pin_memory() if self.pin and self.is_source else batch

    # -- state (only the source has a loader; rank 0 is always a source) ----------------------
    def state_dict(self) -> Optional[dict]:
        return self.loader.state_dict() if self.is_source else None

    def load_state_dict(self, state: dict) -> None:
        if self.is_source:
            self.loader.load_state_dict(state)

    @property
    def bad_samples(self) -> int:
        """Documents this rank's loader dropped so far (0 on ranks without a loader)."""
        return self.loader.bad_samples if self.is_source else 0

    def close(self) -> None:
        if self.is_source:
            self.loader.close()

    # -- broadcast --------------------------------------------------------------------------
    def _share_error(self, error: Optional[Exception]) -> None:
        """The source's loader failed: every peer raises the same error, with the same one-line
        message (``BadDataError`` stays itself), instead of waiting for a batch."""
        text = b"" if error is None else str(error).encode()[:4096]
        head = torch.tensor([len(text), int(isinstance(error, BadDataError))], dtype=torch.int64)
        dist.broadcast(head, self.src, group=self.cpu_group)
        if int(head[0]) == 0:
            return
        message = torch.frombuffer(bytearray(text), dtype=torch.uint8) if self.is_source else \
            torch.empty(int(head[0]), dtype=torch.uint8)
        dist.broadcast(message, self.src, group=self.cpu_group)
        if error is not None:
            raise error
        text = bytes(message.tolist()).decode(errors="replace")
        raise BadDataError(text) if int(head[1]) else RuntimeError(f"data loader of TP rank 0: {text}")

    def _header(self, batch: Optional[Emu2Batch]) -> torch.Tensor:
        header = torch.full((len(_ORDER), _SLOT), -1, dtype=torch.int64)
        if batch is not None:
            for i, name in enumerate(_ORDER):
                t = getattr(batch, name)
                if t is not None:
                    header[i, :3] = torch.tensor([1, int(t.device.type != "cpu"), t.dim()])
                    header[i, 3:3 + t.dim()] = torch.tensor(t.shape)
        dist.broadcast(header, self.src, group=self.cpu_group)
        return header

    def _broadcast(self, batch: Optional[Emu2Batch]) -> Emu2Batch:
        header = self._header(batch)
        out = {}
        for i, name in enumerate(_ORDER):
            present, on_device, ndim = (int(x) for x in header[i, :3])
            if present != 1:
                out[name] = None
                continue
            if self.is_source:
                t = getattr(batch, name).contiguous()
            else:
                shape = [int(x) for x in header[i, 3:3 + ndim]]
                t = torch.empty(shape, dtype=_DTYPES[name], device=device.device() if on_device else "cpu",
                                pin_memory=self.pin and not on_device)
            if t.numel():
                dist.broadcast(t, self.src, group=self.device_group if on_device else self.cpu_group)
            out[name] = t
        return Emu2Batch(**out)


def cpu_tp_groups(tp_group, timeout_s: Optional[float] = None) -> Optional[object]:
    """A gloo group with the ranks of this rank's TP group (collective: every rank calls it),
    with the job's collective timeout. Where the default backend is gloo already, the TP
    group itself."""
    if dist.get_world_size(tp_group) == 1:
        return None
    if dist.get_backend(tp_group) == "gloo":
        return tp_group
    tp = dist.get_world_size(tp_group)
    mine = torch.tensor(dist.get_process_group_ranks(tp_group), dtype=torch.int64, device=device.device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    groups = sorted({tuple(int(r) for r in t.cpu()) for t in every})
    found = None
    for ranks in groups:  # every rank creates every group, in the same order
        assert len(ranks) == tp
        g = dist.new_group(list(ranks), backend="gloo",
                           timeout=None if timeout_s is None else datetime.timedelta(seconds=timeout_s))
        if dist.get_rank() in ranks:
            found = g
    return found
