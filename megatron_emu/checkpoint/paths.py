"""Names inside ``checkpoint.dir`` and how a checkpoint path is resolved (no torch, no
megatron-core: the converter and the generator use it without importing the training stack)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from megatron_emu.checkpoint.safe_pickle import CheckpointFileError

META_FILE = "megatron_emu.json"
LATEST = "latest"


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def resolve(path: str | Path) -> Optional[Path]:
    """A checkpoint directory: ``path`` itself when it is one iteration, else what its
    ``latest`` points at; None when there is nothing."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if not re.fullmatch(r"iter_\d{7,}", name):  # never a path elsewhere
            raise CheckpointFileError(f"{latest} holds {name[:80]!r}, not an iter_NNNNNNN name; "
                                      f"write the name of a complete iter_* directory into it")
        target = path / name
        if (target / META_FILE).is_file():
            return target
        raise CheckpointFileError(f"{latest} points at {target.name}, which is not a complete checkpoint; "
                                  f"point it at a complete iter_* directory")
    return None
