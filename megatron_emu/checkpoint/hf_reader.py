"""Lazy, tensor-by-tensor access to Hugging Face / BAAI weight files.

``HFReader(path)`` takes a directory or one weights file and reads every layout BAAI ships:

* safetensors: one file or shards with an index (``*.safetensors.index.json``);
* torch ``.bin`` files (``pytorch_model.bin``, sharded with ``pytorch_model.bin.index.json``,
  or a single native file such as ``Emu2_pytorch_model.bf16.bin``), read only with
  ``torch.load(weights_only=True)``: torch's restricted unpickler, which runs nothing a file
  names; a refused or broken file is one ``CheckpointFileError`` line naming it. A ``{"module":
  ...}`` or ``{"state_dict": ...}`` wrapper (DeepSpeed, BAAI's loader) is unwrapped.

A safetensors tensor is memory-mapped on its own (copy-on-write, no copy of the data), so only
the tensors in use are resident and each is released with its tensor (a whole mapped shard
would count towards resident memory as it is read). A ``.bin`` archive cannot be read tensor
by tensor: torch loads it whole, memory-mapped when it is a zip archive (then only the tensors
touched are paged in), so at most one ``.bin`` shard is held at a time.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Optional

import torch

from megatron_emu.checkpoint.dcp_item import map_range
from megatron_emu.checkpoint.safe_pickle import torch_load
from megatron_emu.checkpoint.safetensors_io import ST_DTYPES, SafetensorsError, read_header
from megatron_emu.contracts.checkpoint_format import CheckpointFileError

# Tried in this order in a directory; otherwise its single *.index.json / *.safetensors / *.bin.
KNOWN = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _read_index(index: Path) -> dict:
    """``weight_map`` of an index file: tensor name -> a file in the same directory."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise SafetensorsError(f"{index}: not a weights index (no JSON object with a weight_map)") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v == Path(v).name and v not in ("", ".", "..")
            for k, v in weight_map.items()):
        raise SafetensorsError(f"{index}: weight_map must map tensor names to file names in {index.parent}")
    return weight_map


def _entry_point(path: Path) -> Path:
    """The index or weights file to read for ``path`` (a directory or a file)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    for name in KNOWN:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.is_file() and (p.name.endswith(".index.json")
                                                                 or p.suffix in _WEIGHT_SUFFIXES))
    indexes = [p for p in found if p.name.endswith(".index.json")]
    candidates = indexes or found
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(f"{path}: no weights (no {', '.join(KNOWN)}, no *.safetensors or *.bin file)")
    raise FileNotFoundError(f"{path}: several weights files ({', '.join(p.name for p in candidates[:4])}); "
                            f"pass the one to convert (--hf FILE)")


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        self.header, self.start = read_header(path)

    def names(self) -> list[str]:
        return list(self.header)

    def _entry(self, name: str) -> dict:
        if name not in self.header:
            raise SafetensorsError(f"{self.path}: the index lists {name!r} but the file does not hold it")
        entry = self.header[name]
        if entry["dtype"] not in ST_DTYPES:
            raise SafetensorsError(f"{self.path}: {name!r} has dtype {entry['dtype']}, which this converter "
                                   f"does not read ({', '.join(sorted(ST_DTYPES))})")
        return entry

    def meta(self, name: str) -> torch.Tensor:
        e = self._entry(name)
        return torch.empty(tuple(e["shape"]), dtype=ST_DTYPES[e["dtype"]], device="meta")

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped copy-on-write: its own pages only, released with it."""
        e = self._entry(name)
        begin, end = e["data_offsets"]  # validated by read_header (inside the file)
        shape, dtype = tuple(e["shape"]), ST_DTYPES[e["dtype"]]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            try:
                view = map_range(f.fileno(), self.start + begin, end - begin)
            except ValueError:  # the file shrank since its header was read
                raise SafetensorsError(f"{self.path}: truncated data for {name!r}") from None
        return torch.frombuffer(view, dtype=dtype).reshape(shape)


class _TorchBinFile:
    """A ``torch.save`` archive of tensors, loaded with ``weights_only=True``."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors = self._load()

    def _load(self) -> dict:
        data = torch_load(self.path, mmap=zipfile.is_zipfile(self.path))
        for wrapper in ("module", "state_dict"):
            inner = data.get(wrapper) if isinstance(data, dict) else None
            if isinstance(inner, dict) and not any(isinstance(v, torch.Tensor) for v in data.values()):
                data = inner
                break
        if not isinstance(data, dict) or not data:
            raise CheckpointFileError(f"{self.path}: holds a {type(data).__name__}, not a dict of tensors; "
                                      f"not a model weights file")
        bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointFileError(f"{self.path}: entry {bad[0]!r} is not a named tensor; not a model "
                                      f"weights file")
        return data

    def names(self) -> list[str]:
        return list(self.tensors)

    def meta(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def close(self) -> None:
        self.tensors = {}


def _open(path: Path):
    return _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchBinFile(path)


class HFReader:
    """``keys()``, ``meta(name)`` (shape and dtype, no data read) and ``get(name)`` over a
    directory or file (see the module docstring). ``describe()`` says what was found."""

    def __init__(self, path: str | Path):
        self.source = Path(path)
        entry = _entry_point(self.source)
        self.dir = entry.parent
        self.indexed = entry.name.endswith(".index.json")
        self._safetensors: dict[str, _SafetensorsFile] = {}
        self._bin: Optional[_TorchBinFile] = None  # at most one .bin archive held at a time
        if self.indexed:
            weight_map = _read_index(entry)
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{self.dir}: missing shard(s) {missing}")
        else:
            single = _open(entry)
            weight_map = {k: entry.name for k in single.names()}
            if isinstance(single, _TorchBinFile):
                self._bin = single
            else:
                self._safetensors[entry.name] = single
        self.weight_map = weight_map
        self.files = sorted(set(weight_map.values()))
        self.format = "safetensors" if all(f.endswith(".safetensors") for f in self.files) else "bin"

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _file(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{self.source}: no tensor {name!r}")
        fname = self.weight_map[name]
        if fname.endswith(".safetensors"):
            if fname not in self._safetensors:
                self._safetensors[fname] = _SafetensorsFile(self.dir / fname)
            return self._safetensors[fname]
        if self._bin is None or self._bin.path.name != fname:
            if self._bin is not None:
                self._bin.close()
            self._bin = None  # drop the previous archive before loading the next
            self._bin = _TorchBinFile(self.dir / fname)
        if name not in self._bin.tensors:
            raise CheckpointFileError(f"{self.dir / fname}: the index lists {name!r} but the file does not hold it")
        return self._bin

    def shape(self, name: str) -> tuple:
        return tuple(self.meta(name).shape)

    def meta(self, name: str) -> torch.Tensor:
        """A ``meta`` tensor with the stored shape and dtype."""
        return self._file(name).meta(name)

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get(name)

    def describe(self) -> str:
        shards = f"{len(self.files)} shards with an index" if self.indexed else "one file"
        kind = "safetensors" if self.format == "safetensors" else "torch .bin (weights-only load)"
        return f"{kind}, {shards}"
