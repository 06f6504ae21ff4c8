"""The on-disk format of a megatron_emu checkpoint directory (no torch, no megatron-core: the
converter, the generator and training all read and write it by these names and rules).

Layout under ``checkpoint.dir``::

    iter_0000020/                  one complete iteration (a megatron-core ``torch_dist``
                                   directory plus the files below)
    iter_0000020/megatron_emu.json ``META_FILE``: iteration, layout, resolved config (JSON)
    iter_0000020/checksums.json    ``MANIFEST``: CRC-32 of every other file of the iteration
    iter_0000020/tokenizer/        ``TOKENIZER_DIR``: the run's tokenizer files
    iter_0000020.tmp/              a save in progress (``TMP_SUFFIX``): never read
    latest                         ``LATEST``: the name of the newest complete iteration,
                                   written last, atomically

Rules: an iteration is complete when its ``META_FILE`` exists (it is written just before the
rename out of ``.tmp``); ``latest`` holds an ``iter_NNNNNNN`` name and nothing else (never a
path elsewhere); a path given by the user is either one iteration or a directory with ``latest``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

META_FILE = "megatron_emu.json"
MANIFEST = "checksums.json"
TOKENIZER_DIR = "tokenizer"
LATEST = "latest"
TMP_SUFFIX = ".tmp"
ITER_NAME = re.compile(r"iter_\d{7,}")


class CheckpointFileError(ValueError):
    """A checkpoint file that is refused (crafted, corrupt or failing its checksum); the one-line
    message names the file and says what to do."""


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is one complete iteration directory."""
    return (Path(path) / META_FILE).is_file()


def resolve(path: str | Path) -> Optional[Path]:
    """A checkpoint directory: ``path`` itself when it is one iteration, else what its
    ``latest`` points at; None when there is nothing."""
    path = Path(path)
    if is_complete(path):
        return path
    latest = path / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if not ITER_NAME.fullmatch(name):  # never a path elsewhere
            raise CheckpointFileError(f"{latest} holds {name[:80]!r}, not an iter_NNNNNNN name; "
                                      f"write the name of a complete iter_* directory into it")
        target = path / name
        if is_complete(target):
            return target
        raise CheckpointFileError(f"{latest} points at {target.name}, which is not a complete checkpoint; "
                                  f"point it at a complete iter_* directory")
    return None
