"""Numbers a person reads: parameter counts, memory sizes and durations in adaptive units."""

from __future__ import annotations


def _num(x: float) -> str:
    """About three significant digits, never in exponent notation."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def count(n: float) -> str:
    """12_345 -> "12.3 K", 1.67e9 -> "1.67 B"."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{_num(n / scale)} {unit}"
    return f"{n:.0f}"


def size_gib(gib: float) -> str:
    """A size given in GiB -> "15.4 GiB", "3.20 MiB", "512 KiB"."""
    b = gib * 2**30
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{_num(b / scale)} {unit}"
    return f"{b:.0f} B"


def duration(seconds: float) -> str:
    """3725 -> "1h02m", 75 -> "1m15s", 4.2 -> "4.2s"."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"
