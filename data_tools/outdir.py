"""The output directory of ``preprocess``: what is done, what is stale, whose it is, and whether
it is complete.

- A shard ``k`` is done when ``shard-k.tar`` and ``shard-k.json`` exist, the record in the json
  names the same unit (input path, record range), the same options fingerprint, the same input
  size and modification time (``mtime_ns``) as now, and the tar has the recorded size. An edited
  input therefore redoes its units. No content hash: hashing would read every input once more
  (terabytes for LAION-scale inputs) on every re-run; an edit that keeps both size and mtime is
  not detected (delete the shard records, ``shard-*.json``, to force it). Changes inside ``--images`` are not
  tracked either.
- ``--out`` holds *another* dataset when a shard record or ``dataset.json`` there was made with
  other options or from inputs that are not among this run's inputs; ``run`` refuses it unless
  ``--overwrite``.
- Temporary files are ``.NAME.PID.tmp``; a failing run removes its own, and the next run
  removes those a killed run left for the units it owns.
- A run that is about to rewrite shards first marks ``dataset.json`` ``incomplete`` (and removes
  ``index.npy``), so an old index never stands beside new shards; the merge writes a complete
  ``dataset.json`` only when every unit is done, and marks the dataset incomplete otherwise.
  The loader refuses an incomplete dataset (``shard_format.load_index``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from megatron_emu.data import shard_format as sf

MERGE_FILES = (sf.INDEX_FILE, sf.DATASET_FILE, sf.SUMMARY_FILE)


def shard_paths(out: Path, k: int) -> tuple[Path, Path]:
    stem = sf.SHARD_PATTERN.format(k)
    return out / f"{stem}.tar", out / f"{stem}.json"


def temp_path(path: Path) -> Path:
    """``DIR/.NAME.PID.tmp`` (``.npy`` kept last for numpy)."""
    tail = ".tmp.npy" if path.suffix == ".npy" else ".tmp"
    return path.with_name(f".{path.name}.{os.getpid()}{tail}")


def atomic_write(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def input_stat(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def unit_record(unit, fingerprint: str, stat: dict) -> dict:
    """What a shard record must say for the shard to count as done for ``unit`` now."""
    return {"path": os.path.abspath(unit.path), "start": unit.start, "stop": unit.stop,
            "options": fingerprint, **stat}


def read_record(json_path: Path) -> Optional[dict]:
    try:
        record = json.loads(json_path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("unit"), dict) else None


def done(out: Path, k: int, expected: dict) -> Optional[dict]:
    """The record of shard ``k`` when it is done for the ``expected`` unit record, else None."""
    tar_path, json_path = shard_paths(out, k)
    record = read_record(json_path) if tar_path.is_file() else None
    if record is None or record["unit"] != expected:
        return None
    return record if tar_path.stat().st_size == record.get("tar_size") else None


def foreign(out: Path, inputs: set, fingerprint: str, meta: dict) -> Optional[str]:
    """Why ``out`` holds another dataset than this run's, or None (absent, empty, or the same
    dataset, possibly unfinished or with edited inputs)."""
    if not out.is_dir():
        return None
    for json_path in sorted(out.glob("shard-*.json")):
        record = read_record(json_path)
        if record is None:
            return f"{json_path.name} is not a shard record of megatron-emu-data"
        unit = record["unit"]
        if unit.get("options") != fingerprint:
            return f"{json_path.name} was made with other options (format, image size, tokenizer, ...)"
        if unit.get("path") not in inputs:
            return f"{json_path.name} was made from {unit.get('path')}, which is not an input of this run"
    meta_path = out / sf.DATASET_FILE
    if meta_path.is_file():
        try:
            saved = json.loads(meta_path.read_text())
            differs = [k for k, v in meta.items() if k in saved and saved[k] != v]
        except (OSError, ValueError, RecursionError, AttributeError):
            return f"{sf.DATASET_FILE} is not one of megatron-emu-data"
        if differs:
            return f"{sf.DATASET_FILE} differs in {', '.join(differs)}"
    return None


def clean_temp(out: Path, units: list[int], merge: bool) -> list[str]:
    """Remove temporary files a killed run left for these units (and for the merge files)."""
    patterns = []
    for k in units:
        stem = sf.SHARD_PATTERN.format(k)
        patterns += [f".{stem}.tar.*.tmp", f".{stem}.json.*.tmp"]
    if merge:
        patterns += [f".{name}.*.tmp" for name in MERGE_FILES] + [f".{sf.INDEX_FILE}.*.tmp.npy"]
    removed = []
    for pattern in patterns:
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def mark_incomplete(out: Path, reason: str) -> None:
    """``dataset.json`` says ``incomplete: reason`` (the loader refuses it); ``index.npy`` goes."""
    meta_path = out / sf.DATASET_FILE
    meta: dict = {"format_version": sf.FORMAT_VERSION}
    try:
        saved = json.loads(meta_path.read_text())
        if isinstance(saved, dict):
            meta = saved
    except (OSError, ValueError, RecursionError):
        pass
    meta["incomplete"] = reason
    atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    (out / sf.INDEX_FILE).unlink(missing_ok=True)


def run_label() -> str:
    return f"the preprocess run of pid {os.getpid()} on {socket.gethostname()} started " \
           f"{time.strftime('%Y-%m-%d %H:%M:%S')}"
