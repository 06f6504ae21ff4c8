"""``--format img2dataset``: image-text pairs from img2dataset WebDataset tars.

Each sample is ``KEY.jpg|png|webp`` + ``KEY.txt`` (caption) and/or ``KEY.json`` (``caption``,
``url``, ...). ``--caption-field`` picks a JSON field instead of ``txt`` (e.g. ``capsfusion``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from data_tools.sources import RECORD_ERRORS, RawDoc, Skip, Unit, iter_chunks, loads_object, unit_records
from data_tools.sources.tars import TarScan, count_groups

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_inputs(inputs: list[str], suffixes: tuple[str, ...]) -> list[str]:
    """Files given directly, or found (sorted) in given directories."""
    files: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
        elif p.is_file():
            files.append(str(p))
        else:
            raise FileNotFoundError(f"--input {item}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"no input files ending in {suffixes} under {inputs}")
    return files


def plan(inputs: list[str], opts) -> list[Unit]:
    units: list[Unit] = []
    for path in expand_inputs(inputs, (".tar",)):
        n, truncated = count_groups(path)
        chunks = list(iter_chunks(n, opts.shard_size)) or [(0, 0)]
        for i, (start, stop) in enumerate(chunks):
            last = i == len(chunks) - 1
            units.append(Unit(path, start, None if (last and truncated) else stop))
    return units


def caption_text(group, handle, field: str | None) -> str:
    if field is None and "txt" in group.members:
        return group.read("txt", handle).decode("utf-8", errors="replace")
    if "json" in group.members:
        meta = loads_object(group.read("json", handle), f"{group.key}.json")
        value = meta.get(field or "caption")
        return value if isinstance(value, str) else ""
    return ""


def read(unit: Unit, opts) -> Iterator:
    scan = TarScan(unit.path)
    with open(unit.path, "rb") as handle:
        for _, group in unit_records(scan, unit):
            key = f"{Path(unit.path).stem}/{group.key}"
            ext = next((e for e in IMAGE_EXTS if e in group.members), None)
            if ext is None:
                yield Skip("missing_image", key)
                continue
            try:
                caption = caption_text(group, handle, opts.caption_field).strip()
            except RECORD_ERRORS as e:
                yield Skip("malformed_json", key, f"{type(e).__name__}: {e}")
                continue
            source = {"tar": Path(unit.path).name, "key": group.key}
            data = group.read(ext, handle)
            yield RawDoc(key, "pair", [("image", lambda d=data: d), ("text", caption)], source)
    for index, name in scan.unsafe:
        if index >= unit.start and (unit.stop is None or index < unit.stop):
            yield Skip("unsafe_path", f"{unit.path}:{name}")
    if scan.error is not None and unit.stop is None:
        yield Skip("truncated_tar", unit.path, scan.error)
