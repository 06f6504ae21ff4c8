"""The stop signals of a training rank: SIGTERM (scancel, requeue, preemption, the time-limit
kill, Kubernetes) and SIGUSR1 (SLURM's pre-timeout ``--signal``) both mean "finish the step,
save, exit 0".

``StopSignals().install()`` is called first thing in a training process (no torch import
here): from then on a stop signal is only recorded, never fatal, also while the model is being
built or a checkpoint loaded. ``megatron-emu-launch`` starts its ranks with these signals
blocked, so one that arrives before ``install()`` stays pending and is delivered by the unblock
below instead of killing the process or being lost.
"""

from __future__ import annotations

import signal
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def install(self) -> "StopSignals":
        """Record stop signals from now on (main thread only), then deliver any held back."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def ignore_from_now(self) -> None:
        """The run is over and the process exits: a repeated stop signal (the launcher's, SLURM's
        second delivery) must not turn a clean exit after a save into death by signal."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self._previous = {}
