"""A checkpoint keeps its tokenizer: the four files of an Emu2 tokenizer directory (the Hugging
Face layout `megatron-emu-data tokenizer` writes) are copied into ``iter_NNNNNNN/tokenizer/``
when training saves and when ``hf-to-mcore`` converts, and listed in the iteration's
``checksums.json``; ``mcore-to-hf`` and ``megatron-emu-generate`` use that copy, so they need no
``--tokenizer`` and do not depend on the directory the run was started from. A checkpoint saved
before this (no ``tokenizer/``) falls back to ``data.tokenizer`` or ``--tokenizer``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from megatron_emu.contracts.checkpoint_format import TOKENIZER_DIR

FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
SUBDIR = TOKENIZER_DIR


def is_tokenizer_dir(path: Optional[str | Path]) -> bool:
    return path is not None and str(path) != "" and all((Path(path) / f).is_file() for f in FILES)


def absolute(path: Optional[str]) -> Optional[str]:
    """``path`` made absolute and normalised (None and "" stay as they are)."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def bundle(src: str | Path, ckpt_dir: str | Path) -> Path:
    """Copy the tokenizer files of ``src`` into ``ckpt_dir/tokenizer/`` (fsynced)."""
    dest = Path(ckpt_dir) / SUBDIR
    dest.mkdir(exist_ok=True)
    for f in FILES:
        shutil.copyfile(Path(src) / f, dest / f)
        with open(dest / f, "rb") as fh:
            os.fsync(fh.fileno())
    return dest


def bundled(ckpt_dir: str | Path) -> Optional[Path]:
    """The checkpoint's own tokenizer copy, if it has one."""
    path = Path(ckpt_dir) / SUBDIR
    return path if is_tokenizer_dir(path) else None


def find(ckpt_dir: str | Path, explicit: Optional[str], stored: Optional[str]) -> Optional[Path]:
    """The tokenizer to use for a checkpoint: ``explicit`` (``--tokenizer``), else the
    checkpoint's copy, else the stored ``data.tokenizer`` (older checkpoints); None if none of
    them is a tokenizer directory."""
    for candidate in (explicit, bundled(ckpt_dir), stored):
        if is_tokenizer_dir(candidate):
            return Path(candidate)
    return None


def copy_verified(manifest, ckpt_dir: Path, out: Path) -> None:
    """Copy the checkpoint's tokenizer files to ``out``, each checked against ``checksums.json``
    (``manifest``: an ``integrity.Manifest`` of ``ckpt_dir``)."""
    for f in FILES:
        (out / f).write_bytes(manifest.read_bytes(f"{SUBDIR}/{f}"))
