"""torch DCP's ``.metadata`` pickled without importing ``torch.distributed.checkpoint``.

Importing that package costs about 0.7 s of CPU (it imports DTensor's operator tables), more
than a whole small conversion's metadata work. Its metadata classes are plain dataclasses, so a
stand-in with the same module and class name and the same reduction (``copyreg.__newobj__`` of
the class, then its state) pickles to the same bytes; ``_Pickler`` (Python's own pickler) names
the stand-ins by their DCP names without importing them. ``tests/conversion/test_stream.py``
holds the bytes equal to pickling DCP's own objects, and megatron-core loads the result.
"""

from __future__ import annotations

import copyreg
import io
import pickle

import torch

_METADATA, _FILESYSTEM = "torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"
_NAMES: dict[type, tuple[str, str]] = {}  # stand-in class -> (DCP module, class name)


class _Stand:
    """An instance of a DCP dataclass: ``state`` is what its ``__getstate__`` returns."""

    __slots__ = ("state",)

    def __init__(self, state):
        self.state = state

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (type(self),), self.state, None, None


def _stand(module: str, name: str) -> type:
    cls = type(name, (_Stand,), {"__slots__": ()})
    _NAMES[cls] = (module, name)
    return cls


_Metadata, _TensorStorageMetadata = _stand(_METADATA, "Metadata"), _stand(_METADATA, "TensorStorageMetadata")
_ChunkStorageMetadata = _stand(_METADATA, "ChunkStorageMetadata")
_TensorProperties = _stand(_METADATA, "TensorProperties")
_MetadataIndex, _StorageMeta = _stand(_METADATA, "MetadataIndex"), _stand(_METADATA, "StorageMeta")
_StorageInfo, _MemFormat = _stand(_FILESYSTEM, "_StorageInfo"), _stand(_METADATA, "_MEM_FORMAT_ENCODING")


class _Contiguous:
    """``_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT`` (one object, as an enum member is)."""

    def __reduce_ex__(self, protocol):
        return _MemFormat, (0,)


_CONTIGUOUS = _Contiguous()


class _Pickler(pickle._Pickler):
    def save_global(self, obj, name=None):
        if obj not in _NAMES:
            return super().save_global(obj, name)
        module, name = _NAMES[obj]
        self.save(module)  # (one string object per module: memoized as the real module name is)
        self.save(name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def dumps(items: list, checkpoint_id: str, save_id: str) -> bytes:
    """The pickled ``Metadata`` of ``items``: ``(data file, key, global shape, dtype, offsets,
    sizes, start, length)`` per stored chunk, in the order written; key -> its chunks in order."""
    tensors, storage = {}, {}
    for name, key, size, dtype, offsets, sizes, start, length in items:
        if key not in tensors:
            tensors[key] = _TensorStorageMetadata({"properties": _TensorProperties(
                (dtype, torch.strided, False, _CONTIGUOUS, False)), "size": torch.Size(size), "chunks": []})
        tensors[key].state["chunks"].append(_ChunkStorageMetadata({"offsets": torch.Size(offsets),
                                                                   "sizes": torch.Size(sizes)}))
        index = _MetadataIndex({"fqn": key, "index": None, "offset": torch.Size(offsets)})
        storage[index] = _StorageInfo({"relative_path": name, "offset": start, "length": length})
    metadata = _Metadata({"state_dict_metadata": tensors, "planner_data": None, "storage_data": storage,
                          "storage_meta": _StorageMeta({"checkpoint_id": checkpoint_id, "save_id": save_id,
                                                        "load_id": None, "modules": []}),
                          "version": "1.0.0"})
    out = io.BytesIO()
    _Pickler(out, protocol=4).dump(metadata)  # 4: pickle.dump's default, which DCP uses
    return out.getvalue()
