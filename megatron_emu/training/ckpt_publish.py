"""Publishing a written checkpoint: checksums, fsync, rename, ``latest``.

Runs on every rank once megatron-core has written ``iter_NNNNNNN.tmp`` (synchronously, or as
the finalisation of an asynchronous save). Each rank checksums and fsyncs the files it wrote
(``__<rank>_*.distcp``: they are still in its page cache); rank 0 copies the run's tokenizer
into ``tokenizer/``, does the same for every other file, gathers the entries, writes
``checksums.json``, fsyncs the directory, renames it into place, fsyncs the parent, and only
then replaces ``latest`` (written, fsynced, renamed, parent fsynced). A crash at any point leaves ``latest`` on a complete, durable checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_emu.checkpoint import integrity, tokenizer_files
from megatron_emu.checkpoint.safe_pickle import read_dcp_metadata
from megatron_emu.contracts.checkpoint_format import LATEST, META_FILE, TMP_SUFFIX

log = logging.getLogger("megatron_emu.checkpoint")
_RANK_FILE = re.compile(r"__(\d+)_")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """``text`` into ``path`` via a temporary file, fsynced before the rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _owner(name: str, world: int) -> int:
    """The rank that wrote a file (megatron-core names data files ``__<rank>_<n>.distcp``);
    rank 0 for everything else."""
    m = _RANK_FILE.match(name)
    return int(m.group(1)) if m and int(m.group(1)) < world else 0


def checksum_own_files(tmp: Path) -> dict:
    """Manifest entries of the files of ``tmp`` this rank wrote (fsynced on the way)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ranges = integrity.dcp_ranges(read_dcp_metadata(tmp / ".metadata"))
    mine = [n for n in integrity.checkpoint_files(tmp) if _owner(n, world) == rank]
    return integrity.hash_files(tmp, mine, ranges, sync=True)


def publish(directory: Path, name: str, meta_text: str, keep_last: int, tokenizer: Optional[str] = None) -> None:
    """All ranks: see the module docstring. ``tokenizer``: a tokenizer directory rank 0 copies
    into the checkpoint (``tokenizer/``, checksummed with the rest)."""
    final, tmp = directory / name, directory / f"{name}{TMP_SUFFIX}"
    rank = torch.distributed.get_rank()
    torch.distributed.barrier()  # every rank's files (and rank 0's .metadata) are written
    if rank == 0:
        write_durably(tmp / META_FILE, meta_text)
        if tokenizer_files.is_tokenizer_dir(tokenizer):
            tokenizer_files.bundle(tokenizer, tmp)
        elif tokenizer:
            log.warning("data.tokenizer %s is not a tokenizer directory (%s); the checkpoint is saved "
                        "without one", tokenizer, ", ".join(tokenizer_files.FILES))
    entries = checksum_own_files(tmp)
    gathered = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(entries, gathered, dst=0)
    if rank == 0:
        files = {k: v for part in gathered for k, v in part.items()}
        integrity.write(tmp, files)
        fsync_dir(tmp)
        if final.exists():  # re-saving the same iteration (e.g. after a crash before `latest`)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(directory)
        write_durably(directory / LATEST, name + "\n")
        fsync_dir(directory)
        prune(directory, keep_last, keep=name)
    torch.distributed.barrier()


def prune(directory: Path, keep_last: int, keep: str) -> None:
    done = sorted(p for p in directory.glob("iter_*") if p.is_dir() and not p.name.endswith(TMP_SUFFIX))
    for old in done[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
