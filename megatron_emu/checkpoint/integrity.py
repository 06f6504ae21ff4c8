"""Checksums of every file of a checkpoint (``checksums.json`` in the iteration directory).

Format (JSON)::

    {"format": "megatron_emu.checksums/1", "algorithm": "crc32",
     "files": {NAME: {"size": BYTES, "blocks": [[OFFSET, LENGTH, CRC32], ...]}, ...}}

The blocks of a file tile it. A torch DCP data file (``*.distcp``) has one block per stored
item, exactly as ``.metadata`` addresses it (offset, length), so a reader verifies precisely
the bytes it reads: loading only the model tensors of a checkpoint (``checkpoint.load``,
the converter, generation) never reads the optimizer state just to check it. Other files
(``.metadata``, ``common.pt``, ``metadata.json``, ``megatron_emu.json``) are one block each
and are checked whole before they are parsed.

Cost at save: megatron-core writes the data files itself (in its own writer threads or
processes), so the checksums are computed right after the write, each rank over the files it
wrote, from the page cache: one extra read of this rank's share at CRC-32 speed (ISA-L's
CRC-32 from ``isal``, about 12 GB/s per core here; zlib's, about 2 GB/s, when ``isal`` is not
installed: the same checksum), in parallel on every rank. Cost at load:
one CRC-32 pass over the bytes read (they are then in the page cache). CRC-32 detects every
burst error up to 32 bits and any random corruption with probability 1 - 2^-32; it is an
integrity check against disks, copies and truncation, not a signature.

A checkpoint without ``checksums.json`` (saved by an earlier version) loads with one log line;
``checkpoint.verify: false`` (``--no-verify`` for the tools) skips the checks.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

from megatron_emu.contracts.checkpoint_format import MANIFEST, CheckpointFileError

try:  # ISA-L's CRC-32: the same checksum as zlib.crc32, about 6x faster (SIMD)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values
    from zlib import crc32

log = logging.getLogger("megatron_emu.checkpoint")
FORMAT = "megatron_emu.checksums/1"
_CHUNK = 16 << 20


def _tile(size: int, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, length)`` blocks covering ``[0, size)``: the given ranges (inside the file,
    non-overlapping) and the gaps between them."""
    blocks, pos = [], 0
    for offset, length in sorted(set(ranges)):
        if offset < pos or offset + length > size or length <= 0:
            continue  # overlapping or outside: covered by the gap blocks instead
        if offset > pos:
            blocks.append((pos, offset - pos))
        blocks.append((offset, length))
        pos = offset + length
    if pos < size or not blocks:
        blocks.append((pos, size - pos))
    return blocks


def _crc(stream: BinaryIO, offset: int, length: int, buf: Optional[bytearray] = None) -> int:
    buf = buf if buf is not None else bytearray(min(_CHUNK, max(length, 1)))
    view, crc, left = memoryview(buf), 0, length
    stream.seek(offset)
    while left:
        n = stream.readinto(view[:min(left, len(buf))])
        if not n:
            break  # short file: the caller's size check reports it
        crc = crc32(view[:n], crc)
        left -= n
    return crc


def hash_file(path: Path, ranges: Iterable[tuple[int, int]] = (), sync: bool = False) -> dict:
    """The manifest entry of one file (one sequential pass); ``sync``: fsync it too."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(_CHUNK)
        blocks = [[o, n, _crc(f, o, n, buf)] for o, n in _tile(size, ranges)]
        if sync:
            os.fsync(f.fileno())
    return {"size": size, "blocks": blocks}


def dcp_ranges(metadata) -> dict[str, list[tuple[int, int]]]:
    """``{data file: [(offset, length), ...]}`` of the items a DCP ``Metadata`` addresses."""
    out: dict[str, list] = {}
    for info in (metadata.storage_data or {}).values():
        out.setdefault(info.relative_path, []).append((int(info.offset), int(info.length)))
    return out


def hash_files(directory: Path, names: Iterable[str], ranges: dict, sync: bool = False) -> dict:
    return {name: hash_file(directory / name, ranges.get(name, ()), sync=sync) for name in names}


def checkpoint_files(directory: Path) -> list[str]:
    """Every file of a checkpoint directory (relative names), the manifest itself excepted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write(directory: Path, files: dict) -> None:
    """``checksums.json`` (written to a temporary name, fsynced, renamed)."""
    text = json.dumps({"format": FORMAT, "algorithm": "crc32", "files": dict(sorted(files.items()))},
                      separators=(",", ":")) + "\n"
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def build(directory: str | Path, known: Optional[dict] = None) -> None:
    """Single process: checksum every file of a finished checkpoint directory (the converter);
    ``known``: entries of files already checksummed (and fsynced) by their writer as they were
    written, each checked to tile its file as ``.metadata`` addresses it, not read again."""
    from megatron_emu.checkpoint.safe_pickle import read_dcp_metadata

    directory, known = Path(directory), dict(known or {})
    ranges = dcp_ranges(read_dcp_metadata(directory / ".metadata", light=True))  # (no torch.distributed import)
    for name, entry in known.items():
        blocks = [(o, n) for o, n, _ in entry["blocks"]]
        if os.path.getsize(directory / name) != entry["size"] or blocks != _tile(entry["size"], ranges.get(name, ())):
            raise CheckpointFileError(f"{directory / name}: its writer's checksums do not match the file; "
                                      f"convert again")
    rest = [n for n in checkpoint_files(directory) if n not in known]
    write(directory, {**known, **hash_files(directory, rest, ranges, sync=True)})


@functools.lru_cache(maxsize=None)
def _note_unverified(directory: str, reason: str) -> None:
    log.info("%s: %s; its files are loaded without checksum verification", directory, reason)


class Manifest:
    """Checks a checkpoint's files against its ``checksums.json`` as they are read. Without a
    manifest (or with ``verify=False``) only truncation is detected."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.dir = Path(directory)
        self.files: Optional[dict] = None
        self._index: dict[str, tuple[list, list]] = {}
        path = self.dir / MANIFEST
        if not verify:
            _note_unverified(str(self.dir), "checksum verification is off")
        elif not path.is_file():
            _note_unverified(str(self.dir), f"no {MANIFEST} (saved without checksums)")
        else:
            try:
                data = json.loads(path.read_text())
                assert data["format"] == FORMAT and data["algorithm"] == "crc32"
                self.files = {str(k): {"size": int(v["size"]), "blocks": [tuple(map(int, b)) for b in v["blocks"]]}
                              for k, v in data["files"].items()}
            except Exception:  # noqa: BLE001 - any damage to the manifest itself
                raise CheckpointFileError(f"{path}: unreadable checksum manifest; restore it from a copy, or "
                                          f"load with checkpoint.verify=false (--no-verify)") from None

    @property
    def active(self) -> bool:
        return self.files is not None

    def _entry(self, name: str) -> Optional[dict]:
        if self.files is None:
            return None
        if name not in self.files:
            raise CheckpointFileError(f"{self.dir / name}: not listed in {self.dir / MANIFEST} (the file was "
                                      f"added or renamed after the save); do not load this checkpoint")
        return self.files[name]

    def _mismatch(self, name: str, what: str) -> CheckpointFileError:
        return CheckpointFileError(
            f"{self.dir / name}: {what} (the file changed after it was saved: disk, copy or transfer "
            f"corruption); restore it from a copy or resume from an earlier iteration (point `latest` at it); "
            f"checkpoint.verify=false (--no-verify) loads it unchecked")

    def _check_size(self, name: str, size: int, need: int) -> None:
        entry = self._entry(name)
        if entry is not None and entry["size"] != size:
            raise self._mismatch(name, f"{size} bytes, {MANIFEST} records {entry['size']}")
        if size < need:
            raise CheckpointFileError(f"{self.dir / name}: truncated ({size} bytes, data up to byte {need} "
                                      f"expected); restore it from a copy or resume from an earlier iteration")

    def check_bytes(self, name: str, data: bytes) -> None:
        """A small file read whole (``.metadata``, JSON files, ``common.pt``)."""
        self._check_size(name, len(data), 0)
        entry = self._entry(name)
        for offset, length, crc in entry["blocks"] if entry else ():
            if crc32(memoryview(data)[offset:offset + length]) != crc:
                raise self._mismatch(name, f"checksum mismatch in bytes {offset}-{offset + length}")

    def read_bytes(self, name: str) -> bytes:
        """The whole file, verified."""
        data = (self.dir / name).read_bytes()
        self.check_bytes(name, data)
        return data

    def check_size(self, name: str, stream: BinaryIO, need: int) -> None:
        """The open file has its recorded size and at least ``need`` bytes."""
        self._check_size(name, os.fstat(stream.fileno()).st_size, need)

    def check_view(self, name: str, stream: BinaryIO, offset: int, view) -> None:
        """``view`` holds bytes ``[offset, offset + len(view))`` of the open file (read or
        mapped): verified in memory when they are whole blocks (a DCP item is exactly one),
        else as ``check_range`` does."""
        length = len(view)
        self.check_size(name, stream, offset + length)
        entry = self._entry(name)
        if entry is None:
            return
        inside = [b for b in entry["blocks"] if b[0] < offset + length and b[0] + b[1] > offset]
        if not all(offset <= b[0] and b[0] + b[1] <= offset + length for b in inside):
            self.check_range(name, stream, offset, length)
            return
        for b_off, b_len, crc in inside:
            if crc32(view[b_off - offset: b_off - offset + b_len]) != crc:
                raise self._mismatch(name, f"checksum mismatch in bytes {b_off}-{b_off + b_len}")

    def check_range(self, name: str, stream: BinaryIO, offset: int, length: int) -> None:
        """Bytes ``[offset, offset + length)`` of an open file, before they are parsed: every
        block they touch is verified (a DCP item is exactly one block)."""
        self._check_size(name, os.fstat(stream.fileno()).st_size, offset + length)
        entry = self._entry(name)
        if entry is None:
            return
        if name not in self._index:
            blocks = sorted(entry["blocks"])
            self._index[name] = ([b[0] for b in blocks], blocks)
        starts, blocks = self._index[name]
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        while i < len(blocks) and blocks[i][0] < offset + length:
            b_off, b_len, crc = blocks[i]
            if b_off + b_len > offset and _crc(stream, b_off, b_len) != crc:
                raise self._mismatch(name, f"checksum mismatch in bytes {b_off}-{b_off + b_len}")
            i += 1
