"""Fine-tuning formats (docs/tuning.md): ``llava`` conversations (Emu2-Chat) and ``gen`` samples
(Emu2-Gen: grounded generation and image editing). Images and videos come from ``--images DIR``
or the input file's folder, as for ``jsonl``.

``llava``: a JSON file holding a list of records (or a ``.jsonl`` file, one record per line)::

    {"id": "...", "image": "a.jpg" | ["a.jpg", ...], "video": "v.mp4" | [...],
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

``<image>`` / ``<video>`` in the human turns mark where the images and videos go, in order
(without any, they go before the first question, as in LLaVA). The conversation is laid out with
the chat template (``megatron_emu/contracts/chat_template.py``) and the system message of
``--system-message``; only the answers are trained. A ShareGPT turn ``{"from": "system", ...}``
is the conversation's own system message (several are joined by a newline; placeholders in it are
text): it replaces ``--system-message`` for that conversation. A ``.jsonl`` line that does not
parse (also one nested too deeply) is skipped as ``malformed_json``; a ``.json`` file that does not
parse is refused in one line naming it.

``gen``: JSONL, one sample per line, with ``kind``::

    {"kind": "grounded", "segments": [{"text": "A photo of"},
         {"phrase": "a cat", "box": [x0, y0, x1, y1], "object": "cat.jpg"}, ...], "image": "whole.jpg"}
    {"kind": "edit", "source": "a.jpg", "instruction": "Make it black and white.", "target": "b.jpg"}

Grounded: ``<grounding>`` text ``<phrase>`` phrase ``</phrase>`` ``<object>`` [box image]
``</object>`` [object image] ... [whole image]; the box image is a white rectangle (box corners as
fractions of the image side) on black. Edit: [source] instruction [target]. The last image is
the one generated (``train.regression: last_image``).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Iterator

from data_tools.sources import RECORD_ERRORS, RawDoc, Skip, Unit, iter_chunks, loads
from data_tools.sources import records
from data_tools.sources.img2dataset import expand_inputs
from megatron_emu.contracts import chat_template, image_layout, vocab

_PLACEHOLDERS = re.compile(f"({re.escape(vocab.IMAGE)}|{re.escape(image_layout.VIDEO_PLACEHOLDER)})")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
BOX_SIDE = 448  # the drawn box image (resized to --image-size like every image)


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


class LLAVA:
    """Conversations -> ``chat`` documents."""

    @staticmethod
    def plan(inputs: list[str], opts) -> list[Unit]:
        units = []
        for path in expand_inputs(inputs, (".json", ".jsonl")):
            n = len(_load_records(path))
            units += [Unit(path, a, b) for a, b in (list(iter_chunks(n, opts.shard_size)) or [(0, 0)])]
        return units

    @staticmethod
    def read(unit: Unit, opts) -> Iterator:
        base = Path(unit.path).parent
        system = chat_template.system_message(opts.system_message)
        for i, record in enumerate(_load_records(unit.path)[unit.start:unit.stop], unit.start):
            key = f"{Path(unit.path).stem}/{i:09d}"
            try:
                if not isinstance(record, dict):
                    raise ValueError(f"the record is a JSON {type(record).__name__}, not an object")
                yield conversation(record, key, base, system)
            except RECORD_ERRORS as e:
                yield Skip("malformed_json", key, f"{type(e).__name__}: {e}")
            except _Mismatch as e:
                yield Skip("placeholder_mismatch", key, str(e))


class _Mismatch(Exception):
    """Placeholders and files of a record disagree."""


_LOADED: dict = {}  # the last file read, by (path, size, mtime): plan() reads it once, forked workers share it


def _load_records(path: str) -> list:
    """The records of a ``.json`` list or ``.jsonl`` file; ``ValueError`` naming the file."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _parse(path)
    return _LOADED[key]


def _parse(path: str) -> list:
    try:
        text = Path(path).read_text(encoding="utf-8")
        if path.endswith(".jsonl"):
            return [_line(line) for line in text.splitlines() if line.strip()]
        data = loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"--input {path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, list):
        raise ValueError(f"--input {path}: a llava file holds a JSON list of records, not a {type(data).__name__}")
    return data


def _line(line: str):
    try:
        return loads(line)
    except RECORD_ERRORS:  # also a line nested too deeply (RecursionError)
        return None  # skipped as malformed_json when read


def conversation(record: dict, key: str, base: Path, system: str) -> RawDoc:
    turns = [(str(t["from"]).lower(), str(t["value"])) for t in record["conversations"]]
    own = [text.strip() for role, text in turns if role == "system"]
    system = "\n".join(own) if own else system  # ShareGPT: the conversation's own system message
    turns = [(ROLES[role], text) for role, text in turns if role != "system"]
    while turns and turns[-1][0] == "user":  # a question without an answer trains nothing
        turns.pop()
    files = {"image": _as_list(record.get("image")), "video": _as_list(record.get("video"))}
    questions = " ".join(text for role, text in turns if role == "user")
    for kind, placeholder in (("image", vocab.IMAGE), ("video", image_layout.VIDEO_PLACEHOLDER)):
        found = questions.count(placeholder)
        if found == 0 and files[kind] and turns:  # LLaVA: the images go before the first question
            turns[0] = ("user", placeholder * len(files[kind]) + "\n" + turns[0][1])
        elif found != len(files[kind]):
            raise _Mismatch(f"{found} {placeholder} placeholder(s) for {len(files[kind])} {kind} file(s)")
    parts = chat_template.conversation(turns, system)
    refs = {kind: iter(names) for kind, names in files.items()}
    raw = RawDoc(str(record.get("id", key)).replace(".", "_").replace("/", "_") or key, "chat")
    for j, part in enumerate(parts):
        if part.kind == "token":
            _add(raw, ("special", part.value), part.loss)
            continue
        plain = part.loss or (j == 0 and bool(system))  # answers and the system message: text only
        for piece in [part.value] if plain else _PLACEHOLDERS.split(part.value):
            if piece == vocab.IMAGE:
                _add(raw, ("image", records.STORE.ref(next(refs["image"]), base)), part.loss)
            elif piece == image_layout.VIDEO_PLACEHOLDER:
                _add(raw, ("video", records.STORE.ref(next(refs["video"]), base, "missing_video")), part.loss)
            elif piece.strip():
                _add(raw, ("text", piece), part.loss)
    return raw


def _add(raw: RawDoc, segment: tuple, loss: bool = True) -> None:
    if not loss:
        raw.no_loss.add(len(raw.segments))
    raw.segments.append(segment)


class GEN(records._Lines):
    """Grounded-generation and editing samples -> ``grounded`` / ``edit`` documents."""

    suffixes = (".jsonl",)

    @staticmethod
    def document(record: dict, key: str, base: Path) -> RawDoc:
        kind = record["kind"]
        key = str(record.get("key", key)).replace(".", "_")
        store = records.STORE
        if kind == "edit":
            return RawDoc(key, "edit", [("image", store.ref(str(record["source"]), base)),
                                        ("text", str(record["instruction"])),
                                        ("image", store.ref(str(record["target"]), base))])
        if kind != "grounded":
            raise ValueError(f"kind {kind!r}: a gen sample is 'grounded' or 'edit'")
        raw = RawDoc(key, "grounded", [("special", vocab.token_id("<grounding>"))])
        for seg in record["segments"]:
            if "phrase" not in seg:
                raw.segments.append(("text", str(seg["text"])))
                continue
            raw.segments += [("special", vocab.token_id("<phrase>")), ("text", str(seg["phrase"])),
                             ("special", vocab.token_id("</phrase>")), ("special", vocab.token_id("<object>")),
                             ("image", _box_ref(seg["box"])), ("special", vocab.token_id("</object>"))]
            if seg.get("object"):
                raw.segments.append(("image", store.ref(str(seg["object"]), base)))
        raw.segments.append(("image", store.ref(str(record["image"]), base)))
        return raw


def _box_ref(box):
    """An image reference drawing ``box`` ([x0, y0, x1, y1], fractions) white on black."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"box {list(box)}: corners are fractions of the image, x0 < x1 and y0 < y1")

    def draw() -> bytes:
        from PIL import Image, ImageDraw

        im = Image.new("RGB", (BOX_SIDE, BOX_SIDE))
        s = BOX_SIDE - 1
        ImageDraw.Draw(im).rectangle([round(x0 * s), round(y0 * s), round(x1 * s), round(y1 * s)], fill="white")
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=95)
        return out.getvalue()
    return draw

