"""Decisions every rank must share: taken once, or combined, and the same on every rank.

A rank that decides alone can leave its peers waiting in a collective it never enters (a data
error on one data-parallel replica, a checkpoint one rank sees and another does not on a
network filesystem). These helpers make such decisions world-wide collectives.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

_MAX_TEXT = 4096


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank (one small all-reduce)."""
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def decided_by_rank0(decide: Callable[[], Optional[str]], device: torch.device,
                     error: type = RuntimeError) -> Optional[str]:
    """Rank 0 runs ``decide()`` (a short text or None); every rank returns its result, or raises
    ``error`` with rank 0's one-line message when ``decide`` raised ``error`` there."""
    status, text = 0, b""
    if dist.get_rank() == 0:
        try:
            result = decide()
            status, text = (0, b"") if result is None else (1, result.encode())
        except error as e:
            status, text = 2, str(e).encode()
    head = torch.tensor([status, len(text[:_MAX_TEXT])], dtype=torch.int64, device=device)
    dist.broadcast(head, 0)
    status, n = (int(x) for x in head.tolist())
    body = torch.zeros(n, dtype=torch.uint8, device=device)
    if dist.get_rank() == 0 and n:
        body.copy_(torch.frombuffer(bytearray(text[:n]), dtype=torch.uint8))
    if n:
        dist.broadcast(body, 0)
    value = bytes(body.cpu().tolist()).decode(errors="replace")
    if status == 2:
        raise error(value)
    return value if status == 1 else None
