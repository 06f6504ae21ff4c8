"""Graceful stops: SIGTERM / SIGUSR1 (preemption, SLURM's pre-timeout signal) and a wall-clock
budget. A handler only sets a flag; the loop finishes the current step, and every rank agrees
on stopping through one all-reduce, so all of them save the same iteration and exit 0."""

from __future__ import annotations

import logging
import signal
import time
from typing import Optional

import torch

log = logging.getLogger("megatron_emu.train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, exit_duration_mins: Optional[float] = None):
        self.start = time.monotonic()
        self.budget_s = None if exit_duration_mins is None else 60.0 * exit_duration_mins
        self.received: Optional[str] = None
        self._previous = {}
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self, device: torch.device) -> Optional[str]:
        """The reason to stop now, agreed by all ranks (a collective: every rank calls it)."""
        local = 0
        if self.received:
            local = 1
        elif self.budget_s is not None and time.monotonic() - self.start >= self.budget_s:
            local = 2
        flag = torch.tensor([local], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return {0: None, 1: "signal", 2: "train.exit_duration_mins reached"}[int(flag.item())]

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
