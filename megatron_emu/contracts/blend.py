"""The blend syntax of ``data.path`` / ``data.valid_path``: ``"DIR"`` or ``"WEIGHT:DIR"``."""

from __future__ import annotations

import math


def split_entry(entry: str) -> tuple[float | None, str]:
    """``"3:/data/laion"`` -> ``(3.0, "/data/laion")``; ``"/data/mmc4"`` -> ``(None, "/data/mmc4")``.
    A prefix that is not a number (``C:\\data``, ``s3:bucket``) is part of the path."""
    head, sep, tail = entry.partition(":")
    if sep:
        try:
            weight = float(head)
        except ValueError:
            return None, entry
        if math.isfinite(weight):
            return weight, tail
    return None, entry
