"""A rank whose launcher died exits instead of waiting alone in a collective.

torchrun (or srun's step daemon, or our local launcher) is the parent of every rank. When it is
killed outright (SIGKILL, OOM killer) the ranks are re-parented and nobody signals them; a rank
inside a barrier would then wait for its collective timeout, and one inside a long save for
longer still, keeping its files and the checkpoint directory's lock busy. ``watch_parent``
starts a daemon thread that polls ``os.getppid()`` every ``poll_s`` seconds; when the parent
changes, it logs one line and ends the process with ``os._exit(1)`` (no clean-up can be trusted
to finish when the peers are gone; the next job resumes from ``latest``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("megatron_emu.train")
POLL_S = 1.0
_watching_pid = None  # the process whose watcher runs (a forked child starts its own)


def watch_parent(poll_s: float = POLL_S) -> None:
    """Start the watcher for this process (once; a no-op when already started)."""
    global _watching_pid
    if _watching_pid == os.getpid():
        return
    parent = os.getppid()
    if parent == 1:  # already an orphan (or started by init itself): nothing to watch
        return

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                message = (f"rank {os.environ.get('RANK', '?')} (pid {os.getpid()}): its launcher (pid "
                           f"{parent}) is gone; exiting so that it does not wait alone in a collective")
                log.error(message)
                print(message, file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="megatron-emu-parent-watch", daemon=True).start()
    _watching_pid = os.getpid()
