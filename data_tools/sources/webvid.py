"""``--format webvid``: video-text pairs (WebVid-10M style).

Inputs, by file name:

- ``.csv`` / ``.parquet`` metadata, one video per row: a caption column (``--caption-field``,
  else ``name`` (WebVid), ``caption``, ``text``, ``TEXT``) and where the video is: a ``path``
  column (``path``, ``video_path``, ``video``, ``file``; relative to ``--images`` or to the
  metadata file), else the ``contentUrl``/``url`` joined with the ``KEY.json`` ``url`` of
  video2dataset tars under ``--images``, else ``{videoid}.mp4`` anywhere under ``--images``.
- ``.tar``: video2dataset / img2dataset-style tars, ``KEY.mp4`` + ``KEY.txt`` and/or ``KEY.json``
  (``caption``).

Each row becomes a "pair" document: the video (its frames sampled at preprocessing,
``data_tools/video.py``) and the caption. A video that is missing, corrupt or too large skips
its row (``missing_video``, ``corrupt_video``, ``video_too_large`` in ``summary.json``).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Iterator

from data_tools.sources import RECORD_ERRORS, RawDoc, Skip, Unit, iter_chunks, unit_records
from data_tools.sources import records
from data_tools.sources.img2dataset import caption_text, expand_inputs
from data_tools.sources.tars import TarScan, count_groups
from data_tools.video import VIDEO_EXTS

ID_COLUMNS = ("videoid", "video_id", "id", "key")
PATH_COLUMNS = ("path", "video_path", "video", "file")
URL_COLUMNS = ("contentUrl", "url", "video_url")
CAPTION_COLUMNS = ("name", "caption", "text", "TEXT")
SUFFIXES = (".csv", ".parquet", ".tar")


def _first(row: dict, names: tuple[str, ...]):
    return next((row[c] for c in names if row.get(c) not in (None, "")), None)


def document(row: dict, key: str, base: Path, opts) -> RawDoc:
    """One metadata row -> a pair (video, caption)."""
    cap_col = opts.caption_field or next((c for c in CAPTION_COLUMNS if c in row), None)
    if cap_col is None or cap_col not in row:
        raise KeyError(f"no caption column among {sorted(row)}")
    caption = row[cap_col] if isinstance(row[cap_col], str) else ""
    path, url, vid = _first(row, PATH_COLUMNS), _first(row, URL_COLUMNS), _first(row, ID_COLUMNS)
    store = records.STORE
    if path is not None:
        name = str(path)
    elif url is not None and store.by_url is not None:
        name = str(url)
    elif vid is not None:
        name = f"{vid}.mp4"
    else:
        raise KeyError(f"no video path, URL or id column among {sorted(row)}")
    source = {k: str(v) for k, v in (("videoid", vid), ("url", url)) if v is not None}
    return RawDoc(key, "pair", [("video", store.ref(name, base, "missing_video")), ("text", caption.strip())],
                  source)


def plan(inputs: list[str], opts) -> list[Unit]:
    units: list[Unit] = []
    for path in expand_inputs(inputs, SUFFIXES):
        truncated = False
        if path.endswith(".tar"):
            n, truncated = count_groups(path)
        elif path.endswith(".parquet"):
            units += _ParquetRows.plan([path], opts)  # row ranges of the parquet file
            continue
        else:
            n = sum(1 for _ in _csv_rows(path))
        chunks = list(iter_chunks(n, opts.shard_size)) or [(0, 0)]
        for i, (start, stop) in enumerate(chunks):
            last = i == len(chunks) - 1
            units.append(Unit(path, start, None if (last and truncated) else stop))
    return units


class _ParquetRows(records._Parquet):
    base = Path(".")  # the folder of the parquet file being read (set by ``read``)

    @classmethod
    def document(cls, row: dict, key: str, names: set, opts) -> RawDoc:
        return document(row, key, cls.base, opts)


def _csv_rows(path: str):
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        yield from csv.DictReader(f)


def read(unit: Unit, opts) -> Iterator:
    if unit.path.endswith(".tar"):
        yield from _read_tar(unit, opts)
        return
    if unit.path.endswith(".parquet"):
        _ParquetRows.base = Path(unit.path).parent
        yield from _ParquetRows.read(unit, opts)
        return
    base = Path(unit.path).parent
    for i, row in unit_records(_csv_rows(unit.path), unit):
        key = f"{Path(unit.path).stem}/{i:09d}"
        try:
            yield document(row, key, base, opts)
        except RECORD_ERRORS as e:
            yield Skip("malformed_json", key, f"{type(e).__name__}: {e}")


def _read_tar(unit: Unit, opts) -> Iterator:
    scan = TarScan(unit.path)
    with open(unit.path, "rb") as handle:
        for _, group in unit_records(scan, unit):
            key = f"{Path(unit.path).stem}/{group.key}"
            ext = next((e for e in VIDEO_EXTS if e in group.members), None)
            if ext is None:
                yield Skip("missing_video", key)
                continue
            try:
                caption = caption_text(group, handle, opts.caption_field).strip()
            except RECORD_ERRORS as e:
                yield Skip("malformed_json", key, f"{type(e).__name__}: {e}")
                continue
            data = group.read(ext, handle)
            yield RawDoc(key, "pair", [("video", lambda d=data: d), ("text", caption)],
                         {"tar": Path(unit.path).name, "key": group.key})
    for index, name in scan.unsafe:
        if index >= unit.start and (unit.stop is None or index < unit.stop):
            yield Skip("unsafe_path", f"{unit.path}:{name}")
    if scan.error is not None and unit.stop is None:
        yield Skip("truncated_tar", unit.path, scan.error)
