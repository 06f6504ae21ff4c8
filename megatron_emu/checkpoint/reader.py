"""Stream the model tensors out of a megatron_emu checkpoint, one layer at a time.

A checkpoint (``iter_NNNNNNN/``) is megatron-core's torch_dist format: torch DCP files where
every transformer layer's tensor is stored as its own chunk(s) (one per TP shard, under a
stacked key with a leading layer axis). This reader assembles the full, unsharded tensor of one
key (or of one layer of a stacked key) from its chunks, so memory stays at about one layer,
whatever layout the checkpoint was saved with. No process group, no model, no optimizer state.
``.metadata`` is read by the allow-list unpickler (``safe_pickle``), tensor chunks by torch's
weights-only unpickler without copying their data (``dcp_item``), and every file's bytes are
checked against the checkpoint's ``checksums.json`` as they are read (``verify``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_emu.checkpoint import dcp_item

# Checkpoint key suffixes (TE-style names megatron-core writes for the local spec too) ->
# our module's parameter names.
RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
STACKED = ("decoder.layers.", "vision.blocks.layers.")


class CheckpointReadError(ValueError):
    """The directory is not a readable megatron_emu checkpoint."""


class CheckpointReader:
    def __init__(self, ckpt_dir: str | Path, verify: bool = True, reuse_buffers: bool = False):
        from megatron_emu.checkpoint.integrity import Manifest
        from megatron_emu.checkpoint.safe_pickle import load_dcp_metadata

        self.dir = Path(ckpt_dir)
        # reuse_buffers: a tensor assembled from several chunks goes into a buffer kept per shape
        # and dtype and reused by the next read of that shape (each layer has the same shapes:
        # no fresh pages to fault in); valid only until the next read() (mcore-to-hf's loop).
        self._buffers: Optional[dict] = {} if reuse_buffers else None
        if not (self.dir / ".metadata").is_file():
            raise CheckpointReadError(f"{self.dir} has no .metadata: not a torch_dist checkpoint directory")
        self.manifest = Manifest(self.dir, verify=verify)
        meta_file = self.dir / "megatron_emu.json"
        raw = self.manifest.read_bytes(meta_file.name) if meta_file.is_file() else b"{}"
        try:
            self.meta = json.loads(raw)
        except ValueError:
            raise CheckpointReadError(f"{meta_file}: not valid JSON") from None
        # Verified, unpickled by the allow-list unpickler into plain records (no torch.distributed).
        metadata = load_dcp_metadata(self.manifest.read_bytes(".metadata"), self.dir / ".metadata", light=True)
        self.shapes: dict[str, torch.Size] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._chunks: dict[str, list] = defaultdict(list)
        for key, md in metadata.state_dict_metadata.items():
            if hasattr(md, "chunks") and not key.startswith(("optimizer", "rng_state")) \
                    and "_extra_state" not in key:
                self.shapes[key], self.dtypes[key] = md.size, md.properties.dtype
        sizes = {(key, tuple(c.offsets)): tuple(c.sizes) for key, md in metadata.state_dict_metadata.items()
                 if key in self.shapes for c in md.chunks}
        for index, info in metadata.storage_data.items():
            if index.fqn in self.shapes:
                offsets = tuple(index.offset)
                self._chunks[index.fqn].append((offsets, sizes[(index.fqn, offsets)], info))
        missing = [k for k in self.shapes if not self._chunks[k]]
        if missing:
            raise CheckpointReadError(f"{self.dir}: no data for {missing[:3]}")

    # -- names -------------------------------------------------------------------------------
    @staticmethod
    def is_stacked(key: str) -> bool:
        return key.startswith(STACKED)

    def num_layers(self, key: str) -> int:
        return int(self.shapes[key][0]) if self.is_stacked(key) else 0

    @staticmethod
    def canonical_name(key: str, layer: Optional[int] = None) -> str:
        """Checkpoint key (+ layer) -> our TP1/PP1 module's parameter name."""
        if layer is None:
            return key
        prefix = next(p for p in STACKED if key.startswith(p))
        rest = key[len(prefix):]
        return f"{prefix}{layer}.{RENAMES.get(rest, rest)}"

    def entries(self) -> Iterator[tuple[str, str, Optional[int]]]:
        """``(canonical name, key, layer)`` for every model tensor: stacked keys layer by layer
        (layer-major, so one layer's tensors come together), then the others."""
        stacked = sorted(k for k in self.shapes if self.is_stacked(k))
        by_prefix: dict[str, list] = defaultdict(list)
        for key in stacked:
            by_prefix[next(p for p in STACKED if key.startswith(p))].append(key)
        for prefix in STACKED:
            keys = by_prefix.get(prefix, [])
            for layer in range(max((self.num_layers(k) for k in keys), default=0)):
                for key in keys:
                    yield self.canonical_name(key, layer), key, layer
        for key in sorted(k for k in self.shapes if not self.is_stacked(k)):
            yield key, key, None

    def shape(self, key: str, layer: Optional[int] = None) -> torch.Size:
        return self.shapes[key][1:] if layer is not None else self.shapes[key]

    # -- data --------------------------------------------------------------------------------
    def _buffer(self, shape, dtype, group: str) -> torch.Tensor:
        if self._buffers is None:
            return torch.empty(shape, dtype=dtype)
        if self._buffers.get("group") != group:  # the ViT's buffers are not kept for the LM's layers
            self._buffers = {"group": group}
        key = (tuple(shape), dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype)
        return self._buffers[key]

    def chunks(self, key: str, layer: Optional[int] = None) -> list[tuple[tuple, torch.Tensor]]:
        """``[(offsets, chunk)]``: the stored chunks of ``key`` (or of its ``layer``, the layer
        axis dropped), each memory-mapped and verified in place (``dcp_item``), not copied.
        Raises CheckpointReadError unless they add up to the whole tensor."""
        out, filled = [], 0
        for offsets, sizes, info in self._chunks[key]:
            if layer is not None and not offsets[0] <= layer < offsets[0] + sizes[0]:
                continue
            with open(self.dir / info.relative_path, "rb") as f:
                self.manifest.check_size(info.relative_path, f, info.offset + info.length)
                view = dcp_item.map_range(f.fileno(), info.offset, info.length)
                self.manifest.check_view(info.relative_path, f, info.offset, view)
            chunk = dcp_item.load_item(view, f"{self.dir / info.relative_path} ({key})")
            view = None
            if tuple(chunk.shape) != tuple(sizes) or chunk.dtype != self.dtypes[key]:
                raise CheckpointReadError(f"{self.dir / info.relative_path}: {key} at {tuple(offsets)} holds "
                                          f"{chunk.dtype} {tuple(chunk.shape)}, .metadata says "
                                          f"{self.dtypes[key]} {tuple(sizes)}; the file is damaged or crafted: "
                                          f"restore it from a copy")
            if layer is not None:
                chunk, offsets = chunk[layer - offsets[0]], offsets[1:]
            out.append((tuple(offsets), chunk))
            filled += chunk.numel()
        numel = self.shape(key, layer).numel()
        if filled != numel:
            raise CheckpointReadError(f"{self.dir}: {key}{'' if layer is None else f' layer {layer}'} "
                                      f"is incomplete ({filled} of {numel} elements)")
        return out

    def read(self, key: str, layer: Optional[int] = None, chunks: Optional[list] = None) -> torch.Tensor:
        """The full tensor of ``key`` (or of its ``layer``), assembled from its ``chunks``
        (read here unless given); a chunk that is the whole tensor is returned as it is."""
        shape, dtype = self.shape(key, layer), self.dtypes[key]
        chunks = self.chunks(key, layer) if chunks is None else chunks
        if len(chunks) == 1 and tuple(chunks[0][1].shape) == tuple(shape) and chunks[0][1].dtype == dtype:
            return chunks[0][1]  # the whole tensor in one chunk
        out = self._buffer(shape, dtype, next((p for p in STACKED if key.startswith(p)), "")) if chunks else \
            torch.empty(shape, dtype=dtype)
        for offsets, chunk in chunks:
            out[tuple(slice(o, o + s) for o, s in zip(offsets, chunk.shape))].copy_(chunk)
        return out
