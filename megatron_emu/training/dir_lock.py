"""One writer per ``checkpoint.dir``: ``checkpoint.dir/.lock`` names the job that writes there.

The lock file holds the owner's identity as JSON: host, pid, the pid's start time, SLURM job
id (if any), when it took the lock and a random token. Rank 0 creates it atomically (written
under a temporary name, then ``link``ed into place, which fails when a lock exists; ``O_EXCL``
where links are not supported) and refreshes its mtime every ``HEARTBEAT_S`` seconds from a
daemon thread; it is removed when the job ends, however it ends short of SIGKILL.

A lock found in place belongs to a live job, and the new job is refused with one line naming
it, unless it is stale:

* same SLURM job id as ours: an earlier run of this job (a requeue or a restart in the same
  allocation) whose processes are gone; taken over, unless it is on this host and its pid is
  still the same live process (two concurrent steps of one job);
* same host: its pid is gone, or now belongs to another process (start time differs);
* another host (its pid cannot be checked from here): its SLURM job is no longer running
  (``squeue``, when the holder was a SLURM job and ``squeue`` answers: a chained job may start
  right after its predecessor died), or no heartbeat for ``STALE_AFTER_S`` seconds (20 missed
  heartbeats; far above NFS attribute caching and clock skew). A job that is only paused that
  long (SIGSTOP) loses its lock: it notices at its next save (``lost_reason``) and stops
  without writing.

Taking over is logged (one warning) and done by renaming the stale file away first, so of two
jobs that start together only one wins. The holder's stale ``iter_*.tmp`` directories may then
be removed (``checkpointing.cleanup_partial``): that is only done under the lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import torch

from megatron_emu.training.checkpointing import CheckpointError

log = logging.getLogger("megatron_emu.checkpoint")
LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class DirLockError(CheckpointError):
    """Another live job holds the checkpoint directory."""


def _start_time(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, or psutil missing: unknown
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_SLURM_ALIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                "RESIZING"}


def _slurm_job_state(job_id: str) -> Optional[str]:
    """The state SLURM reports for ``job_id`` ("GONE" when it no longer knows it), or None when
    SLURM cannot be asked."""
    import subprocess

    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return "GONE" if "Invalid job id" in out.stderr else None
    states = out.stdout.split()
    return states[0] if states else "GONE"


def describe(holder: dict) -> str:
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"SLURM job {holder['slurm_job_id']}")
    if isinstance(holder.get("started"), (int, float)):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])))
    return ", ".join(parts)


class DirLock:
    def __init__(self, directory: str | Path, stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_FILE
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        pid = os.getpid()
        self.identity = {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid),
                         "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.time(),
                         "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- taking it ---------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock or raise ``DirLockError`` (one line naming the holder)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return
            holder, age = self._read()
            if holder is None:
                continue  # released meanwhile
            reason = self.stale_reason(holder, age)
            if reason is None:
                raise DirLockError(
                    f"checkpoint.dir {self.dir} is in use by another job ({describe(holder)}): two jobs "
                    f"must not write one checkpoint directory; stop that job or choose another "
                    f"checkpoint.dir (if that job is gone for good, delete {self.path})")
            if self._remove_stale(holder):
                log.warning("taking over the lock of %s on %s: %s", describe(holder), self.dir, reason)
        raise DirLockError(f"{self.path}: could not take the lock (other jobs keep starting on this "
                           f"checkpoint.dir); start one job per checkpoint.dir")

    def _create(self) -> bool:
        text = json.dumps(self.identity) + "\n"
        tmp = self.dir / f"{LOCK_FILE}.{self.identity['token']}.tmp"
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:  # no hard links on this file system: exclusive create instead
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, path: Optional[Path] = None) -> tuple[Optional[dict], float]:
        """``(holder identity or None when absent, seconds since its last heartbeat)``; an
        unreadable lock is an identity-less holder ``{}`` (judged by age alone)."""
        path = path or self.path
        try:
            text, mtime = path.read_text(), path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        try:
            holder = json.loads(text)
            holder = holder if isinstance(holder, dict) else {}
        except ValueError:
            holder = {}
        return holder, time.time() - mtime

    def stale_reason(self, holder: dict, age: float) -> Optional[str]:
        """Why ``holder``'s lock is stale, or None when it may belong to a live job."""
        me = self.identity
        same_host = holder.get("host") == me["host"]
        pid = holder.get("pid")
        live_here = same_host and isinstance(pid, int) and _alive(pid) and (
            holder.get("pid_start") is None or _start_time(pid) is None
            or abs(_start_time(pid) - holder["pid_start"]) < 1.0)
        if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"] and not live_here:
            return f"it was taken by an earlier run of this SLURM job ({me['slurm_job_id']})"
        if same_host and isinstance(pid, int):
            if not _alive(pid):
                return f"process {pid} is gone"
            if not live_here:
                return f"pid {pid} now belongs to another process"
            return None
        job = holder.get("slurm_job_id")
        if job and job != me["slurm_job_id"]:
            state = _slurm_job_state(job)
            if state is not None and state not in _SLURM_ALIVE:
                return f"its SLURM job {job} is no longer running ({state.lower()})"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (more than {self.stale_after_s:.0f} s)"
        return None

    def _remove_stale(self, holder: dict) -> bool:
        aside = self.dir / f"{LOCK_FILE}.stale.{self.identity['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another job moved it first
        moved, _ = self._read(aside)
        if moved != holder:  # a fresh lock of a job that won the race: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    # -- holding it --------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                if self.lost_reason() is None:
                    try:
                        os.utime(self.path)
                    except OSError:
                        pass

        self._thread = threading.Thread(target=beat, name="megatron-emu-lock-heartbeat", daemon=True)
        self._thread.start()

    def lost_reason(self) -> Optional[str]:
        """None while the lock is still ours; else why not."""
        holder, _ = self._read()
        if holder is None:
            return f"{self.path} was removed by someone else; this job stops without saving"
        if holder.get("token") != self.identity["token"]:
            return f"{self.path} was taken over by another job ({describe(holder)}); this job stops without saving"
        return None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost_reason() is None:
            self.path.unlink(missing_ok=True)


def acquire(directory: str | Path) -> Optional[DirLock]:
    """Collective: rank 0 takes the lock of ``directory``; every rank raises the same
    ``DirLockError`` when it cannot. Returns the lock on rank 0, None elsewhere."""
    lock, error = None, None
    if torch.distributed.get_rank() == 0:
        lock = DirLock(directory)
        try:
            lock.acquire()
        except DirLockError as e:
            lock, error = None, str(e)
    message = [error]
    torch.distributed.broadcast_object_list(message, src=0)
    if message[0]:
        raise DirLockError(message[0])
    return lock
