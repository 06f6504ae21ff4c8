"""Input formats for ``megatron-emu-data preprocess``.

Every format turns its inputs into work units (``Unit``: one input file and a record range, one
output shard each) and reads a unit into ``RawDoc`` items (or ``Skip`` markers for bad input).
Units are planned in the parent process; workers read them independently, which makes the output
deterministic whatever the number of workers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

ImageRef = Callable[[], bytes]  # returns the encoded image, or raises SkipSample("missing_image")


@dataclass(frozen=True)
class Unit:
    """Records ``[start, stop)`` of one input file (``stop`` None: to the end)."""

    path: str
    start: int
    stop: Optional[int]


@dataclass
class RawDoc:
    """A document before tokenization and image processing.

    ``segments``: ``("text", str)``, ``("special", id)``, ``("image", ImageRef)`` or
    ``("video", ImageRef)`` (the encoded video file) in reading order; ``no_loss``: indices of
    the segments that are no cross-entropy targets (a conversation's prompt).
    """

    key: str
    kind: str  # "pair" | "interleaved" | "chat" | "grounded" | "edit"
    segments: list = field(default_factory=list)
    source: dict = field(default_factory=dict)
    no_loss: set = field(default_factory=set)


@dataclass
class Skip:
    """A record skipped with a reason (the ``summary.json['skipped']`` key)."""

    reason: str
    key: str
    detail: str = ""


Item = Union[RawDoc, Skip]

# What reading one crafted record may raise (a wrong type, a missing key, Infinity where an
# int belongs, a line nested 100k deep, invalid UTF-8): the record is skipped as malformed_json.
RECORD_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError,
                 RecursionError)


def _not_json(name: str):
    raise ValueError(f"{name} is not valid JSON")


def loads(data) -> object:
    """``json.loads`` that refuses ``NaN``/``Infinity`` (Python accepts them, JSON does not)."""
    return json.loads(data, parse_constant=_not_json)


def loads_object(data, what: str) -> dict:
    """A JSON object, or ``ValueError`` naming ``what`` when it is another JSON value."""
    value = loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"{what} is a JSON {type(value).__name__}, not an object")
    return value


def get_format(name: str):
    """The format module for ``--format``: it provides ``plan(inputs, opts) -> list[Unit]`` and
    ``read(unit, opts) -> Iterator[Item]``."""
    from data_tools.sources import img2dataset, records, tuning, webvid

    formats = {"img2dataset": img2dataset, "mmc4": records.MMC4, "obelics": records.OBELICS,
               "laion": records.LAION, "jsonl": records.JSONL, "webvid": webvid,
               "llava": tuning.LLAVA, "gen": tuning.GEN}
    try:
        return formats[name]
    except KeyError:
        raise ValueError(f"unknown --format {name!r}; choose from {sorted(formats)}") from None


def unit_records(records, unit: Unit):
    """``(index, record)`` of the unit's range ``[start, stop)`` of an iterable of records."""
    import itertools

    return itertools.islice(enumerate(records), unit.start, unit.stop)


def iter_chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)
