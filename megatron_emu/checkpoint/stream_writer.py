"""Write a megatron-core (torch_dist) checkpoint one layer group at a time.

megatron-core's ``dist_checkpointing.save`` writes a whole state dict at once, so a converter
that calls it once must hold every tensor of its shard. Here each rank builds its model chunks
on the ``meta`` device (no memory; the sharded state dict still knows every key, global shape,
TP/PP offset and replica id), then, part by part, fills real tensors for one group of layers
and saves just those with megatron-core into ``parts/NNNN/``. A part holds at most one layer of
each stacked key (``decoder.layers.*``, ``vision.blocks.layers.*``), saved as a one-layer stack
so that every part is a complete checkpoint by itself (megatron-core checks its access
integrity; it also cannot describe a partial stack on a single rank). ``merge_parts`` then
joins the parts into one checkpoint: the parts' ``.distcp`` files are moved into it under names
of their own (each item is addressed by file, offset and length, so only the file names change:
no data is copied), the torch DCP ``.metadata`` of the parts is merged with each layer put
back at its index, and every tensor is checked to
be covered exactly by its chunks. The result is what one
``dist_checkpointing.save`` at the same layout would have written, without ``_extra_state``
objects (``checkpointing.load_weights`` accepts their absence).

Peak memory per rank: one group's input tensors, their canonical form and this rank's slices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import torch

from megatron_emu.checkpoint.reader import RENAMES as _RENAMES, STACKED


LAYERS_FILE = "layers.json"


class MergeError(RuntimeError):
    """The parts do not add up to a complete checkpoint (a bug, not bad input)."""


def rank_targets(chunks: list) -> dict[str, list]:
    """Canonical tensor name -> this rank's ShardedTensors that store part of it, each with its
    offsets and the full shape within the canonical (unstacked) tensor:
    ``{name: [(ShardedTensor, offsets, shape), ...]}``. ``_extra_state`` objects are left out.
    SwiGLU's fc1 factory becomes its two stored halves (gate and up rows)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    apply_factories(sharded)
    targets: dict[str, list] = {}
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor) or "_extra_state" in sh.key:
            continue
        if sh.prepend_axis_num:
            prefix = next(p for p in STACKED if sh.key.startswith(p))
            rest = sh.key[len(prefix):]
            name = f"{prefix}{sh.global_offset[0]}.{_RENAMES.get(rest, rest)}"
            targets.setdefault(name, []).append((sh, tuple(sh.global_offset[1:]), tuple(sh.global_shape[1:])))
        else:
            targets.setdefault(sh.key, []).append((sh, tuple(sh.global_offset), tuple(sh.global_shape)))
    return targets


def part_layers(names: list[str]) -> dict[str, int]:
    """Stacked-key prefix -> the one layer index a part's canonical names hold of it."""
    out: dict[str, int] = {}
    for n in names:
        for prefix in STACKED:
            if n.startswith(prefix):
                i = int(n[len(prefix):].split(".", 1)[0])
                if out.setdefault(prefix, i) != i:
                    raise ValueError(f"a part holds layers {out[prefix]} and {i} of {prefix}*")
    return out


def fill(target, offsets: tuple, full: torch.Tensor, dtype: torch.dtype):
    """A copy of ``target`` (a meta ShardedTensor) holding its region of the canonical ``full``
    tensor as its own, contiguous storage (so only the region is written): a view of ``full``'s
    bytes when the region is contiguous and of the right dtype, else a copy. A stacked key's
    tensor is addressed as a one-layer stack (its part is then complete on its own; the merge
    puts the layer back at its index)."""
    region = full[tuple(slice(o, o + n) for o, n in zip(offsets, target.data.shape))]
    if region.dtype == dtype and region.is_contiguous():
        # A storage of exactly the region's bytes, sharing them (torch.save writes a tensor's
        # whole storage): the region is saved as it is, without a copy.
        start = region.storage_offset() * region.element_size()
        storage = region.untyped_storage()[start:start + region.nbytes]
        data = torch.empty(0, dtype=dtype).set_(storage, 0, region.shape, region.stride())
    else:
        data = region.to(dtype=dtype, copy=True).contiguous()
    if target.prepend_axis_num:
        return dataclasses.replace(target, data=data, global_shape=(1, *target.global_shape[1:]),
                                   global_offset=(0, *target.global_offset[1:]),
                                   axis_fragmentations=(1, *target.axis_fragmentations[1:]))
    return dataclasses.replace(target, data=data)


def save_part(part_dir: Path, tensors: list, layers: dict[str, tuple[int, int]]) -> None:
    """Collective: every rank saves its (possibly empty) list of filled ShardedTensors;
    ``layers``: stacked-key prefix -> (layer index, layer count) of this part, for the merge."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    if torch.distributed.get_rank() == 0:
        part_dir.mkdir(parents=True, exist_ok=False)
    torch.distributed.barrier()
    # One writer (megatron-core forks a process per writer for every save): one file per rank.
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save({f"t{i}": sh for i, sh in enumerate(tensors)}, str(part_dir), sharded_strategy=strategy)
    if torch.distributed.get_rank() == 0:
        (part_dir / LAYERS_FILE).write_text(json.dumps(layers))
    torch.distributed.barrier()


def _move(src: Path, out: Path, part: int) -> str:
    """Move a part's data file ``__<rank>_<n>.distcp`` into ``out`` under a name of its own
    (``__<rank>_<part>[_<n>].distcp``: the writing rank stays the prefix); returns the name.
    A rename: the data is never copied."""
    rank, _, n = src.stem[2:].partition("_")
    name = f"__{rank}_{part}.distcp" if n in ("", "0") else f"__{rank}_{part}_{n}.distcp"
    os.replace(src, out / name)
    return name


def merge_parts(parts: list[Path], out: Path) -> dict:
    """Join the part checkpoints (in order) into ``out``; returns ``{key: global shape}``.
    Removes the parts."""
    from megatron_emu.checkpoint.safe_pickle import read_dcp_metadata

    out.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    storage: dict = {}
    planner: dict = {}
    extras: dict = {}  # e.g. megatron-core's ``mcore_data``, when a version sets it
    first = None
    from torch.distributed.checkpoint.metadata import Metadata

    fields = {f.name for f in dataclasses.fields(Metadata)}
    for k, part in enumerate(parts):
        md = read_dcp_metadata(part / ".metadata")  # written just now by save_part
        first = first or md
        moved = {f.name: _move(f, out, k) for f in sorted(part.glob("*.distcp"))}
        layers = json.loads((part / LAYERS_FILE).read_text())

        def placed(key: str, offsets) -> torch.Size:  # a one-layer stack -> its layer's offsets
            prefix = next((p for p in STACKED if key.startswith(p)), None)
            if prefix is None:
                return torch.Size(offsets)
            return torch.Size((offsets[0] + layers[prefix][0], *offsets[1:]))

        repeated = set()  # non-tensor entries (megatron-core >= 0.17 keeps its common state in
        # the DCP files as bytes): every part writes the same one; the first part's is kept
        for key, tmd in md.state_dict_metadata.items():
            if not hasattr(tmd, "chunks"):
                if key in tensors:
                    repeated.add(key)
                else:
                    tensors[key] = tmd
                continue
            prefix = next((p for p in STACKED if key.startswith(p)), None)
            size = torch.Size((layers[prefix][1], *tmd.size[1:])) if prefix else tmd.size
            tmd = dataclasses.replace(tmd, size=size, chunks=[
                dataclasses.replace(c, offsets=placed(key, c.offsets)) for c in tmd.chunks])
            if key not in tensors:
                tensors[key] = tmd
                continue
            have = tensors[key]
            if tuple(have.size) != tuple(tmd.size) or have.properties.dtype != tmd.properties.dtype:
                raise MergeError(f"{key}: parts disagree on shape/dtype ({have.size} vs {tmd.size})")
            have.chunks.extend(tmd.chunks)
        for index, info in md.storage_data.items():
            if index.fqn in repeated:
                continue
            if index.offset is not None:
                index = dataclasses.replace(index, offset=placed(index.fqn, index.offset))
            if index in storage:
                raise MergeError(f"{index.fqn} at {tuple(index.offset)} is written by two parts")
            storage[index] = dataclasses.replace(info, relative_path=moved[info.relative_path])
        if isinstance(md.planner_data, dict):
            planner.update(md.planner_data)
        for attr, value in vars(md).items():  # attributes set beside the dataclass fields
            if attr not in fields and isinstance(value, dict):
                extras.setdefault(attr, {}).update(value)
            elif attr not in fields:
                extras.setdefault(attr, value)
    if first is None:
        raise MergeError("no parts to merge")
    check_coverage(tensors)
    merged = dataclasses.replace(first, state_dict_metadata=tensors, storage_data=storage,
                                 planner_data=planner if isinstance(first.planner_data, dict) else first.planner_data)
    for attr, value in extras.items():
        setattr(merged, attr, value)
    tmp = out / ".metadata.tmp"
    with open(tmp, "wb") as f:  # torch DCP's own metadata format (FileSystemWriter.finish)
        pickle.dump(merged, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / ".metadata")
    for name in ("metadata.json", "common.pt"):
        if (parts[0] / name).is_file():
            shutil.copy2(parts[0] / name, out / name)
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    return {k: tuple(v.size) for k, v in tensors.items() if hasattr(v, "chunks")}


def check_coverage(tensors: dict) -> None:
    """Every tensor's chunks lie inside it, start at distinct offsets and add up to its volume."""
    for key, tmd in tensors.items():
        if not hasattr(tmd, "chunks"):
            continue
        size = tuple(tmd.size)
        seen, volume = set(), 0
        for c in tmd.chunks:
            offsets, sizes = tuple(c.offsets), tuple(c.sizes)
            if offsets in seen or any(o < 0 or o + n > s for o, n, s in zip(offsets, sizes, size)):
                raise MergeError(f"{key}: chunk at {offsets} of size {sizes} overlaps or leaves {size}")
            seen.add(offsets)
            volume += math.prod(sizes)
        if volume != math.prod(size):
            raise MergeError(f"{key}: chunks cover {volume} of {math.prod(size)} elements")
