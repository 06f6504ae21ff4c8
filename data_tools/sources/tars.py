"""Safe, fault-tolerant reading of WebDataset-style tars (img2dataset output, our shards).

Members are grouped by key as WebDataset does (basename up to the first dot). Members with an
absolute path or ``..`` are ignored. A truncated or corrupt tar ends the iteration with one
``truncated_tar`` error instead of an exception, keeping every complete sample before it.
"""

from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from megatron_emu.data.shard_format import safe_member_name, split_key

log = logging.getLogger("megatron_emu.data_tools")


@dataclass
class TarGroup:
    """One sample: ``members`` maps extension -> (data offset, size) in ``path``."""

    path: str
    key: str
    members: dict

    def read(self, ext: str, handle=None) -> bytes:
        offset, size = self.members[ext]
        if handle is not None:
            handle.seek(offset)
            return handle.read(size)
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)


class TarScan:
    """Iterate the groups of a tar; ``error`` is set when the tar ended early."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.error: Optional[str] = None
        self.unsafe: list[tuple[int, str]] = []  # (index of the next group, member name)

    def __iter__(self) -> Iterator[TarGroup]:
        current: Optional[TarGroup] = None
        n = 0
        try:
            with tarfile.open(self.path, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    if not safe_member_name(m.name):
                        self.unsafe.append((n, m.name))
                        continue
                    key, ext = split_key(m.name)
                    if current is None or key != current.key:
                        if current is not None:
                            yield current
                            n += 1
                        current = TarGroup(self.path, key, {})
                    current.members[ext] = (m.offset_data, m.size)
                if current is not None:
                    # A member whose data runs past the end of the file is a truncation too.
                    end = max(o + s for o, s in current.members.values())
                    if end > Path(self.path).stat().st_size:
                        raise tarfile.ReadError("unexpected end of data")
                    yield current
        except (tarfile.TarError, EOFError, OSError) as e:
            self.error = f"{type(e).__name__}: {e}"


def count_groups(path: str | Path) -> tuple[int, bool]:
    """``(complete groups, ended early)`` of a tar, by reading headers only."""
    scan = TarScan(path)
    n = sum(1 for _ in scan)
    return n, scan.error is not None


class UrlImageIndex:
    """``url -> (tar, offset, size)`` of the images (and videos) in img2dataset / video2dataset
    tars (their ``KEY.json`` ``url`` field), to join parquet/CSV/JSONL records with downloads."""

    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "mp4", "webm", "mkv", "avi", "mov")

    def __init__(self, tars: list[str]):
        self.table: dict[str, tuple[str, int, int]] = {}
        for path in tars:
            with open(path, "rb") as handle:
                for group in TarScan(path):
                    ext = next((e for e in self.IMAGE_EXTS if e in group.members), None)
                    if ext is None or "json" not in group.members:
                        continue
                    try:
                        url = json.loads(group.read("json", handle)).get("url")
                    except (ValueError, AttributeError, RecursionError):  # not a JSON object
                        continue
                    if url and isinstance(url, str):
                        self.table.setdefault(url, (path, *group.members[ext]))
        log.info("image index: %d images/videos by URL from %d tar(s)", len(self.table), len(tars))

    def get(self, url: str) -> Optional[bytes]:
        hit = self.table.get(url)
        if hit is None:
            return None
        path, offset, size = hit
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
