"""``megatron-emu-launch [--stop-grace SECONDS] TORCHRUN_OPTIONS -m megatron_emu.train ...``
(also ``python -m megatron_emu.launch``): torchrun, with every torchrun option (it runs
``torch.distributed.run`` in this process), that turns SIGTERM and SIGUSR1 into a stop request.

torchrun itself dies of SIGUSR1, and on SIGTERM it signals its ranks, kills them 30 s later
and exits non-zero even when they saved. This launcher instead forwards either signal to its
ranks (the training loop finishes the step, saves a checkpoint and exits 0; ranks started later,
e.g. while the rendezvous is still running, get it too) and keeps supervising them: its exit code
is theirs, 0 after a clean stop. Ranks still running ``--stop-grace`` seconds after the first
signal (default 600) are killed. The ranks start with SIGTERM/SIGUSR1 blocked until
``megatron_emu.train`` installs its handler, so a signal during start-up is delivered then
instead of killing a rank or being lost (launch other programs with torchrun). SIGINT (Ctrl-C),
SIGHUP and SIGQUIT keep torchrun's meaning: stop the ranks now.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time

from megatron_emu.utils.stop_signals import STOP_SIGNALS

PROG = "megatron-emu-launch"
DEFAULT_GRACE_S = 600.0


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


class StopForwarder(threading.Thread):
    """Waits for SIGTERM/SIGUSR1 (blocked in every thread, taken here with sigwait); then
    signals every child (a rank, with its process group) once, including children that appear
    later, and kills those still alive after the grace period."""

    def __init__(self, grace_s: float):
        super().__init__(name="stop-forwarder", daemon=True)
        self.grace_s = grace_s
        self.signal: signal.Signals | None = None
        self.killed = False
        self._sent: set[int] = set()
        self._lock = threading.Lock()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            signum = signal.sigwait(STOP_SIGNALS)
            with self._lock:
                first = self.signal is None
                if signum != self.signal:  # SLURM may send the same one twice (to the step and via srun)
                    _say(f"{signal.Signals(signum).name}: asking {len(me.children()) or 'the'} rank(s) to finish "
                         f"the step, save a checkpoint and exit (killed after {self.grace_s:g} s)")
                if signum != self.signal:  # a new signal reaches every rank; a repeat is not re-sent
                    self.signal, self._sent = signal.Signals(signum), set()
                self._forward(me)
            if first:
                threading.Thread(target=self._supervise, args=(me,), name="stop-supervisor", daemon=True).start()

    def _supervise(self, me) -> None:
        """Ranks started after the signal get it too; those left at the deadline are killed."""
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            with self._lock:
                self._forward(me)
        self._kill(me)

    def _forward(self, me) -> None:
        for child in me.children():
            if child.pid not in self._sent:
                self._sent.add(child.pid)
                _signal_rank(child.pid, self.signal)

    def _kill(self, me) -> None:
        children = me.children()
        if not children:  # still in the rendezvous: interrupt the agent itself
            _say(f"no rank started within {self.grace_s:g} s of {self.signal.name}; giving up")
            _thread.interrupt_main()
            return
        self.killed = True
        _say(f"{len(children)} rank(s) still running {self.grace_s:g} s after {self.signal.name}; killing them")
        for child in children:
            _signal_rank(child.pid, signal.SIGKILL)


def _signal_rank(pid: int, sig: int) -> None:
    """Signal a rank's process group (the rank and its DataLoader workers), as torchrun does;
    the rank alone when it does not lead a group of its own."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _seconds(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        _say(f"{name}: expected seconds, got {value!r}")
        raise SystemExit(2) from None


def _split_own_options(argv: list[str]) -> tuple[float, list[str]]:
    grace = _seconds("MEGATRON_EMU_STOP_GRACE_S", os.environ.get("MEGATRON_EMU_STOP_GRACE_S", str(DEFAULT_GRACE_S)))
    argv = list(argv)
    while argv and argv[0].startswith("--stop-grace"):
        opt = argv.pop(0)
        grace = _seconds("--stop-grace", opt.split("=", 1)[1] if "=" in opt else (argv.pop(0) if argv else ""))
    return grace, argv


def _exit_code(failures: dict) -> int:
    """The first failed rank's exit code (128 + signal when a signal ended it)."""
    first = failures[min(failures)]
    code = first.exitcode
    return 128 - code if code < 0 else (code or 1)


def main(argv: list[str] | None = None) -> int:
    # Before anything starts a thread: every thread and every rank inherits the blocked signals.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for sig in STOP_SIGNALS:  # an inherited "ignore" would discard them instead of holding them
        signal.signal(sig, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        print(f"  --stop-grace SECONDS  kill the ranks this long after the first stop signal (default "
              f"{DEFAULT_GRACE_S:g}, or MEGATRON_EMU_STOP_GRACE_S); must come first\n\ntorchrun's options:\n")
    grace, argv = _split_own_options(argv)

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    ours = {s.name for s in STOP_SIGNALS}
    kept = [s.strip() for s in getattr(args, "signals_to_handle", "SIGINT,SIGHUP,SIGQUIT").split(",")
            if s.strip() and s.strip() not in ours]
    args.signals_to_handle = ",".join(kept) or "SIGINT"
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = args.signals_to_handle  # older torch reads only this
    forwarder = StopForwarder(grace)
    forwarder.start()
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        for rank, failure in sorted(e.failures.items()):
            _say(f"rank {rank} (local rank {failure.local_rank}) failed with exit code {failure.exitcode}"
                 f"{'' if forwarder.killed else ' (its output is above)'}")
        return _exit_code(e.failures)
    except (SignalException, KeyboardInterrupt) as e:
        name = getattr(e, "sigval", None)
        _say(f"stopped by {name.name if name else 'an interrupt'}; the ranks were terminated")
        return 128 + int(name) if name else 130
    if forwarder.signal is not None:
        _say(f"the ranks stopped cleanly after {forwarder.signal.name}")
    return 0
