"""Reading the pickled files of a checkpoint without running code from them.

A megatron-core ``torch_dist`` checkpoint holds three kinds of pickled data:

* ``.metadata``: torch DCP's index (a ``Metadata`` dataclass tree), which torch itself reads with
  a bare ``pickle.load``. ``load_dcp_metadata`` reads it with an unpickler whose ``find_class``
  only resolves the names in ``ALLOWED`` (DCP's metadata and planner dataclasses and enums,
  ``torch.Size``, dtypes, layouts, and megatron-core's two empty placeholder classes for
  old checkpoints); any other global (``os.system``, ``builtins.eval``, ...) is refused before
  it is called.
* ``common.pt`` and sharded objects (the per-rank RNG state; megatron-core >= 0.17 also keeps its
  common state as DCP bytes): ``torch.save`` archives of plain containers and tensors, read by
  ``torch_load`` with ``torch.load(weights_only=True)`` (torch's own restricted unpickler; the
  flag is passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off).
* tensor chunks in ``*.distcp``: DCP already reads them with ``weights_only=True``.

Every refusal is a ``CheckpointFileError`` with one line that names the file. Nothing here
changes global state (no ``add_safe_globals``): ``weights_only`` needs no extra classes for
what megatron_emu saves.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO, Union

from megatron_emu.contracts.checkpoint_format import CheckpointFileError

_DCP = "torch.distributed.checkpoint"
_MCORE_TORCH = "megatron.core.dist_checkpointing.strategies.torch"

ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")]
    + [(f"{_DCP}.metadata", n) for n in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
        "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + [(f"{_DCP}.planner", n) for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")]
    + [(f"{_DCP}.filesystem", n) for n in ("_StorageInfo", "_StoragePrefix")]
    # empty classes megatron-core defines only so that older checkpoints' metadata unpickles
    + [(_MCORE_TORCH, "MCoreMetadata"), (_MCORE_TORCH, "MCoreSavePlan")]
)


def _detail(e: BaseException) -> str:
    """``Type: first sentence`` of an exception (torch's messages run to several lines)."""
    text = str(e).splitlines()[0] if str(e) else "no detail"
    return f"{type(e).__name__}: {text.split('. ')[0].rstrip('.')}"


def _refuse(where: Any, what: str) -> CheckpointFileError:
    return CheckpointFileError(f"{where}: {what}; the file is corrupt or crafted: do not load this "
                               f"checkpoint (restore the file from a copy or use an earlier iteration)")


class _Record:
    """A plain stand-in for an allowed DCP or megatron-core class (``light`` reading): the
    pickled fields as attributes, hashable by them (``MetadataIndex`` keys a dict); an enum
    member is its ``value``. Reading ``.metadata`` this way needs neither ``torch.distributed``
    (about 0.7 s of CPU to import) nor megatron-core."""

    def __init__(self, *args: Any):
        self.value = args[0] if args else None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # TensorProperties: (dtype, layout, requires_grad, format, pin)
            state = dict(zip(("dtype", "layout", "requires_grad", "memory_format", "pin_memory"), state))
        self.__dict__.update(state)

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __hash__(self) -> int:
        return hash((type(self).__name__, *sorted(self.__dict__.items())))


_RECORDS: dict[str, type] = {}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, where: Any, light: bool = False):
        super().__init__(file)
        self.where, self.light = where, light

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in ALLOWED and self.light and module.startswith((_DCP, "megatron")):
            return _RECORDS.setdefault(name, type(name, (_Record,), {}))
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and name.isidentifier() and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _refuse(self.where, f"refused to unpickle {module}.{name} (not a torch DCP metadata class)")

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse(self.where, "refused a persistent id (not torch DCP metadata)")


def load_dcp_metadata(data: bytes, where: Any, light: bool = False):
    """torch DCP ``Metadata`` from the bytes of a ``.metadata`` file (``where`` names it);
    ``light``: made of plain ``_Record`` stand-ins with the same fields (for reading only)."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), where, light).load()
    except CheckpointFileError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or garbled pickle: any error is "corrupt"
        raise _refuse(where, f"unreadable torch DCP metadata ({_detail(e)})") from None
    if light:
        is_metadata = type(metadata) is _RECORDS.get("Metadata")
    else:
        from torch.distributed.checkpoint.metadata import Metadata
        is_metadata = isinstance(metadata, Metadata)
    if not is_metadata:
        raise _refuse(where, f"holds a {type(metadata).__name__}, not torch DCP metadata")
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", "")
        if not _plain_file_name(name):  # data files sit in the checkpoint directory itself
            raise _refuse(where, f"names a data file outside its directory ({name!r})")
    return metadata


def _plain_file_name(name: object) -> bool:
    """A file name in the same directory: no separator, not ``.``/``..``, not hidden."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name \
        and not name.startswith(".") and "\x00" not in name


def read_dcp_metadata(path: Union[str, Path], light: bool = False):
    """``load_dcp_metadata`` of a file."""
    path = Path(path)
    return load_dcp_metadata(path.read_bytes(), path, light)


def torch_load(source: Union[str, Path, BinaryIO], where: Any = None, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on CPU (``mmap``: storages memory-mapped from a zip
    archive on disk); a refusal or a broken archive is a one-line ``CheckpointFileError``
    naming ``where`` (default: the path)."""
    import torch

    where = source if where is None else where
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:  # weights_only refused a global or an opcode
        lines = str(e).splitlines() or [""]
        detail = next((line.strip() for line in lines if "unsupported" in line.lower()), lines[0].strip())
        raise _refuse(where, f"refused by torch's weights-only loader ({detail.split('. ')[0].rstrip('.')})") from None
    except Exception as e:  # noqa: BLE001 - a truncated or garbled archive
        raise _refuse(where, f"unreadable torch archive ({_detail(e)})") from None
