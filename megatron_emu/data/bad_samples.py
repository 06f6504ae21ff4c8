"""Bad samples in the loader: found, skipped, counted, logged once; too many in a row stop the job.

Two checks, so that every rank of a data-parallel replica builds the same sequence whatever it
decodes (later pipeline stages never decode pixels):

1. Before packing, on every rank (a pure function of the shard bytes, so the same plan position
   gives the same sequence on every rank, under every layout and after a resume): the
   document's byte span reads (a truncated shard fails here), its JSON parses, its text ids are
   plain text ids (no special id, no ``<s>``/``</s>``), its special segments are the chat
   template's or grounding tokens (never an image-block token; ``[USER]`` / ``[ASSISTANT]`` in
   conversations only), and every image is a JPEG whose header
   parses and that ends with the end-of-image marker. A document that fails is dropped from its
   sequence; the rest of the sequence is packed as planned.
2. Decoding pixels, only where they are needed: an image that passed 1 but still does not
   decode becomes a black image and is counted; its tokens stay, so pipeline stages agree.

Workers report one outcome per document (``None`` or a ``BadSample``) plus one per image that
failed to decode; ``BadSampleMonitor`` (main process) counts the outcomes of the batches handed
to the trainer, logs each bad sample's shard and key once, and raises ``BadDataError`` after
``max_consecutive`` bad outcomes without a good document in between.
"""

from __future__ import annotations

import io
import logging
from typing import NamedTuple, Optional

from PIL import Image

from megatron_emu.contracts import chat_template
from megatron_emu.contracts import vocab as st
from megatron_emu.data.shard_format import Document, split_key

log = logging.getLogger("megatron_emu.data")
LOG_LIMIT = 100  # distinct bad samples logged per process; all are counted


class BadDataError(RuntimeError):
    """Too many bad samples in a row: the data is broken, not one sample."""


class BadSample(NamedTuple):
    shard: str
    key: str
    reason: str


def check_jpeg(data: bytes) -> Optional[str]:
    """Why these bytes are not a complete JPEG (cheap: markers and header, no decoding)."""
    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return "image is not a complete JPEG (start or end marker missing)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return f"image is {im.format}, not JPEG"
    except Exception as e:  # noqa: BLE001 - a crafted header may raise anything
        return f"image header does not parse ({type(e).__name__}: {e})"
    return None


def check_document(doc: Document) -> Optional[str]:
    """Why a decoded document cannot go into a sequence, or None."""
    for kind, value in doc.segments:
        if kind in ("image", "video"):
            for frame in ([value] if kind == "image" else value):
                problem = check_jpeg(frame)
                if problem:
                    return problem
        elif kind == "special":
            problem = chat_template.special_problem(value, doc.kind)
            if problem:
                return problem
        elif value and (min(value) < 0 or max(value) >= st.LLAMA_VOCAB_SIZE
                        or st.BOS_ID in value or st.EOS_ID in value):
            return "text has special or out-of-vocabulary token ids"
    return None


def span_key(handle, offset: int) -> str:
    """The WebDataset key of the sample at ``offset`` of an open shard (its first member's
    name), or ``byte OFFSET`` when the header cannot be read."""
    try:
        handle.seek(offset)
        name = handle.read(100).split(b"\0", 1)[0].decode("utf-8")
        return split_key(name)[0] if name else f"byte {offset}"
    except (OSError, ValueError):
        return f"byte {offset}"


class BadSampleMonitor:
    """Counts bad outcomes in plan order; ``total`` is what the training loop reports."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0
        self._logged: set = set()

    def update(self, outcomes: list) -> None:
        for bad in outcomes:
            if bad is None:
                self.consecutive = 0
                continue
            bad = BadSample(*bad)
            self.total += 1
            self.consecutive += 1
            self._log(bad)
            if self.consecutive >= self.max_consecutive:
                raise BadDataError(
                    f"{self.consecutive} bad samples in a row (data.max_consecutive_bad_samples="
                    f"{self.max_consecutive}), the last {bad.shard} key {bad.key}: {bad.reason}; the data "
                    f"is broken: check it with `megatron-emu-data inspect DIR`")

    def _log(self, bad: BadSample) -> None:
        ident = (bad.shard, bad.key)
        if len(self._logged) >= LOG_LIMIT or ident in self._logged:
            return
        self._logged.add(ident)
        log.warning("skipped a bad sample: shard %s, key %s (%s)", bad.shard, bad.key, bad.reason)
        if len(self._logged) == LOG_LIMIT:
            log.warning("further bad samples are counted (bad_samples in metrics.jsonl), not logged")
