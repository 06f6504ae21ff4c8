"""Graceful stops: SIGTERM / SIGUSR1 (preemption, SLURM's pre-timeout signal) and a wall-clock
budget. A handler only sets a flag (``megatron_emu.utils.stop_signals``, installed as early as
the process can); the loop finishes the current step, and every rank agrees on stopping through
one all-reduce, so all of them save the same iteration and exit 0."""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from megatron_emu.utils.stop_signals import STOP_SIGNALS, StopSignals

log = logging.getLogger("megatron_emu.train")
__all__ = ["STOP_SIGNALS", "StopRequest", "URGENT"]

# SIGTERM is followed by SIGKILL after the scheduler's grace (SLURM's KillWait, 30 s by
# default; Kubernetes' terminationGracePeriod): save at once. The others leave time.
URGENT = "signal SIGTERM"
REASONS = {0: None, 1: "signal SIGUSR1", 2: "train.exit_duration_mins reached", 3: URGENT}


class StopRequest:
    """``signals``: handlers already installed by the entry point (kept, not restored here);
    without it this object installs and restores its own."""

    def __init__(self, exit_duration_mins: Optional[float] = None, signals: Optional[StopSignals] = None):
        self.start = time.monotonic()
        self.budget_s = None if exit_duration_mins is None else 60.0 * exit_duration_mins
        self._owned = signals is None
        self.signals = StopSignals().install() if signals is None else signals

    @property
    def received(self) -> Optional[str]:
        return self.signals.received

    def should_stop(self, device: torch.device) -> Optional[str]:
        """The reason to stop now, agreed by all ranks (a collective: every rank calls it)."""
        local = 0
        if self.signals.received:
            local = 3 if self.signals.received == "SIGTERM" else 1
        elif self.budget_s is not None and time.monotonic() - self.start >= self.budget_s:
            local = 2
        flag = torch.tensor([local], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return REASONS[int(flag.item())]

    def restore(self) -> None:
        if self._owned:
            self.signals.restore()
