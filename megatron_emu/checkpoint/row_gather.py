"""``mcore-to-hf`` output tensors written straight from a checkpoint's mapped chunks.

Every HF tensor that ``hf_mapping.to_hf`` (and ``native_layout.to_native``) derives from a
canonical tensor is a selection of its rows along dimension 0 (the QKV split, the SwiGLU halves,
the vocabulary trim; most tensors are themselves). Mapping a tensor of row numbers in place of
the data says which rows, in which order (``row_runs``); the bytes of those rows are then handed
to ``os.writev`` as views of the memory-mapped, verified chunks (``row_buffers``): neither the
TP-split chunks nor the split QKV are assembled or copied in memory first. An output that is
not a row selection (the native layout's RoPE frequencies) or a chunk split this module does not
walk is left to the caller (``None``), which assembles the tensor as before.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

Runs = list[tuple[int, int]]


def row_ids(shape: tuple) -> torch.Tensor:
    """Row numbers of a tensor of ``shape`` (at least 1-D), shaped so that row operations
    (slicing, reshape along dimension 0, ``cat``) apply to them as to the data."""
    return torch.arange(shape[0], dtype=torch.int64).reshape(shape[0], *([1] * (len(shape) - 1)))


def row_runs(mapped: Callable, name: str, shape: tuple) -> list[tuple[str, tuple, Optional[Runs]]]:
    """``[(output name, output shape, runs)]`` of ``mapped(name, tensor of shape)`` from shapes
    alone: ``runs`` are the ``[start, stop)`` row ranges of the input, in output order, or
    ``None`` for an output that is not a selection of input rows."""
    if len(shape) == 0:  # a scalar: nothing to select
        return [(n, tuple(t.shape), None) for n, t in mapped(name, torch.empty(()))]
    out = []
    for out_name, t in mapped(name, row_ids(shape)):
        if t.dtype != torch.int64:  # computed, not selected (the native layout's inv_freq)
            out.append((out_name, tuple(t.shape), None))
            continue
        rows = t.reshape(-1)
        listed = rows.tolist()
        runs = [(listed[a], listed[a] + b - a) for a, b in _runs(rows)]
        out.append((out_name, (rows.numel(), *shape[1:]), runs))
    return out


def _row_views(chunk: torch.Tensor) -> tuple[memoryview, int]:
    """A chunk's bytes and the bytes of one of its rows."""
    return memoryview(chunk.reshape(-1).view(torch.uint8).numpy()), math.prod(chunk.shape[1:]) * chunk.element_size()


def row_buffers(chunks: list[tuple[tuple, torch.Tensor]], shape: tuple, runs: Runs) -> Optional[list]:
    """The bytes of rows ``runs`` of the tensor of ``shape`` that ``chunks`` (``[(offsets,
    chunk)]``, together the whole tensor) tile, as views in output order; ``None`` when a chunk
    is not contiguous or the chunks split the tensor along a dimension other than 0 (or, for a
    2-D tensor, 1: row-parallel weights, gathered row by row)."""
    if len(shape) == 0 or any(not c.is_contiguous() for _, c in chunks):
        return None
    full_width = all(tuple(c.shape[1:]) == tuple(shape[1:]) for _, c in chunks)
    if not full_width and len(shape) != 2:
        return None
    bands: dict[tuple[int, int], list] = {}  # (first row, rows) -> the band's chunks by column
    for offsets, c in chunks:
        bands.setdefault((offsets[0], c.shape[0]), []).append((offsets[1:], c))
    ordered = [(start, size, [_row_views(c) for _, c in sorted(cols, key=lambda x: x[0])])
               for (start, size), cols in sorted(bands.items())]
    out = []
    for a, b in runs:
        for start, size, cols in ordered:
            lo, hi = max(a, start) - start, min(b, start + size) - start
            if lo >= hi:
                continue
            if len(cols) == 1:  # whole rows: one slab
                view, row = cols[0]
                out.append(view[lo * row:hi * row])
                continue
            for r in range(lo, hi):
                out += [view[r * row:(r + 1) * row] for view, row in cols]
    return out


def source_runs(ids: torch.Tensor) -> Optional[list[tuple[int, int, int]]]:
    """Rows tagged ``(source + 1) << 32 | row`` (``hf_source.CanonicalSource.rows``) ->
    ``[(source, start, stop)]`` in order; ``None`` if any row is 0 (made, not selected)."""
    ids = ids.reshape(-1)
    if bool((ids == 0).any()):
        return None
    sources, rows = ids >> 32, ids & 0xFFFFFFFF
    listed, tags = rows.tolist(), sources.tolist()
    return [(tags[a] - 1, listed[a], listed[a] + b - a) for a, b in _runs(rows, sources)]


def _runs(rows: torch.Tensor, tags: Optional[torch.Tensor] = None) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges of ``rows`` (1-D) over which each row follows the one
    before it (and ``tags`` stay the same)."""
    if rows.numel() == 0:
        return []
    breaks = rows[1:] != rows[:-1] + 1
    if tags is not None:
        breaks |= tags[1:] != tags[:-1]
    starts = [0] + (torch.nonzero(breaks).reshape(-1) + 1).tolist()
    return list(zip(starts, starts[1:] + [rows.numel()]))


def select_rows(runs: list[tuple[int, int, int]], sources: list[torch.Tensor], start: int, stop: int) -> list:
    """The bytes of rows ``[start, stop)`` of the tensor whose rows ``runs`` take from
    ``sources`` (contiguous, the tensor's row shape and dtype), as views in order."""
    out, pos = [], 0
    for k, a, b in runs:
        lo, hi = max(start, pos), min(stop, pos + b - a)
        if lo < hi:
            view, row = _row_views(sources[k])
            out.append(view[(a + lo - pos) * row:(a + hi - pos) * row])
        pos += b - a
    return out
