"""Record-based formats: ``jsonl`` (our interleaved JSONL), ``mmc4`` (JSONL), ``obelics`` and
``laion`` (parquet). Their images come from ``--images DIR``: a folder of image files (matched by
file name or relative path) or a folder of img2dataset tars (matched by URL).

``jsonl`` lines: ``{"key": optional str, "segments": [{"text": str} | {"image": path-or-url} |
{"video": path-or-url}, ...]}`` (a video's frames are sampled at preprocessing, ``video.py``).
MMC4: each image is placed right before its ``matched_text_index`` sentence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

from data_tools.images import SkipSample
from data_tools.sources import RECORD_ERRORS, RawDoc, Skip, Unit, iter_chunks, loads_object, unit_records
from data_tools.sources.img2dataset import expand_inputs
from data_tools.sources.tars import UrlImageIndex


class ImageStore:
    """Resolves image references (file names, relative paths or URLs) to encoded bytes."""

    def __init__(self, directory: Optional[str]):
        self.root = Path(directory) if directory else None
        self.by_url: Optional[UrlImageIndex] = None
        self.by_name: dict[str, str] = {}
        if self.root is None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"--images {directory}: not a directory")
        tars = sorted(str(p) for p in self.root.rglob("*.tar"))
        if tars:
            self.by_url = UrlImageIndex(tars)
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not p.name.endswith(".tar"):
                self.by_name.setdefault(p.name, str(p))

    def ref(self, name: str, base: Optional[Path] = None, missing: str = "missing_image"):
        """An ``ImageRef`` for ``name`` (an image or a video file); it raises
        ``SkipSample(missing)`` when called and the file is not there."""
        def load() -> bytes:
            data = self._lookup(name, base)
            if data is None:
                raise SkipSample(missing, name)
            return data
        return load

    def _lookup(self, name: str, base: Optional[Path]) -> Optional[bytes]:
        if self.by_url is not None and "://" in name:
            return self.by_url.get(name)
        for root in (self.root, base):
            if root is None or os.path.isabs(name) or ".." in Path(name).parts:
                continue
            p = root / name
            if p.is_file():
                return p.read_bytes()
        path = self.by_name.get(Path(name).name)
        return Path(path).read_bytes() if path else None


STORE: Optional[ImageStore] = None  # set by the parent before workers fork


class _Lines:
    """Line-numbered JSON records of ``.jsonl`` files."""

    suffixes = (".jsonl", ".json")

    @classmethod
    def plan(cls, inputs: list[str], opts) -> list[Unit]:
        units = []
        for path in expand_inputs(inputs, cls.suffixes):
            with open(path, "rb") as f:
                n = sum(1 for _ in f)
            units += [Unit(path, a, b) for a, b in (list(iter_chunks(n, opts.shard_size)) or [(0, 0)])]
        return units

    @classmethod
    def read(cls, unit: Unit, opts) -> Iterator:
        base = Path(unit.path).parent
        with open(unit.path, "rb") as f:
            for i, line in unit_records(f, unit):
                key = f"{Path(unit.path).stem}/{i:09d}"
                try:
                    document = cls.document(loads_object(line, "the line"), key, base)
                except RECORD_ERRORS as e:
                    yield Skip("malformed_json", key, f"{type(e).__name__}: {e}")
                else:
                    yield document


def _segment_list(items) -> list:
    """Merge neighbouring text items into one segment."""
    out: list = []
    for kind, value in items:
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + " " + value)
        else:
            out.append((kind, value))
    return out


class JSONL(_Lines):
    @staticmethod
    def document(record: dict, key: str, base: Path) -> RawDoc:
        segments = []
        for seg in record.get("segments", record.get("content")):
            if "image" in seg:
                segments.append(("image", STORE.ref(str(seg["image"]), base)))
            elif "video" in seg:
                segments.append(("video", STORE.ref(str(seg["video"]), base, "missing_video")))
            else:
                segments.append(("text", str(seg["text"])))
        kinds = sorted(k for k, _ in segments)
        kind = "pair" if kinds in (["image", "text"], ["text", "video"]) else "interleaved"
        return RawDoc(str(record.get("key", key)).replace(".", "_"), kind, _segment_list(segments),
                      {k: record[k] for k in ("url",) if k in record})


class MMC4(_Lines):
    @staticmethod
    def document(record: dict, key: str, base: Path) -> RawDoc:
        texts = [str(t) for t in record["text_list"]]
        before: dict[int, list] = {}
        for info in record.get("image_info") or []:
            idx = min(max(int(info["matched_text_index"]), 0), max(len(texts) - 1, 0))
            name = info.get("image_name") or info.get("raw_url")
            if STORE.by_url is not None and info.get("raw_url"):
                name = info["raw_url"]
            before.setdefault(idx, []).append(("image", STORE.ref(str(name), base)))
        items = []
        for i, text in enumerate(texts or [""]):
            items += before.get(i, [])
            items.append(("text", text))
        return RawDoc(key, "interleaved", _segment_list(items), {"url": record.get("url", "")})


class _Parquet:
    @classmethod
    def plan(cls, inputs: list[str], opts) -> list[Unit]:
        import pyarrow.parquet as pq

        units = []
        for path in expand_inputs(inputs, (".parquet",)):
            try:
                n = pq.ParquetFile(path).metadata.num_rows
            except (OSError, ValueError) as e:  # pyarrow's errors do not name the file
                raise ValueError(f"--input {path}: not a readable parquet file ({e})") from None
            units += [Unit(path, a, b) for a, b in (list(iter_chunks(n, opts.shard_size)) or [(0, 0)])]
        return units

    @classmethod
    def read(cls, unit: Unit, opts) -> Iterator:
        import pyarrow.parquet as pq

        f = pq.ParquetFile(unit.path)
        names = set(f.schema_arrow.names)
        i = 0
        for batch in f.iter_batches(batch_size=1024):
            rows = batch.to_pylist()
            for row in rows:
                if i >= unit.start and (unit.stop is None or i < unit.stop):
                    key = f"{Path(unit.path).stem}/{i:09d}"
                    try:
                        document = cls.document(row, key, names, opts)
                    except RECORD_ERRORS as e:
                        yield Skip("malformed_json", key, f"{type(e).__name__}: {e}")
                    else:
                        yield document
                i += 1
            if unit.stop is not None and i >= unit.stop:
                break


class OBELICS(_Parquet):
    @staticmethod
    def document(row: dict, key: str, names: set, opts) -> RawDoc:
        images, texts = row["images"], row["texts"]
        if len(images) != len(texts):
            raise ValueError("images and texts differ in length")
        items = []
        for url, text in zip(images, texts):
            if url is not None:
                items.append(("image", STORE.ref(str(url))))
            elif text is not None:
                items.append(("text", str(text)))
        meta = row.get("general_metadata")
        url = loads_object(meta, "general_metadata").get("url", "") if meta else ""
        return RawDoc(key, "interleaved", _segment_list(items), {"url": str(url)})


class LAION(_Parquet):
    URL_COLUMNS = ("URL", "url", "image_url")
    CAPTION_COLUMNS = ("capsfusion", "TEXT", "text", "caption", "top_caption")

    @classmethod
    def document(cls, row: dict, key: str, names: set, opts) -> RawDoc:
        url_col = next((c for c in cls.URL_COLUMNS if c in names), None)
        cap_col = opts.caption_field or next((c for c in cls.CAPTION_COLUMNS if c in names), None)
        if url_col is None or cap_col is None or cap_col not in names:
            raise KeyError(f"no URL/caption column among {sorted(names)}")
        caption = row[cap_col] if isinstance(row[cap_col], str) else ""
        url = str(row[url_col])
        return RawDoc(key, "pair", [("image", STORE.ref(url)), ("text", caption.strip())], {"url": url})
