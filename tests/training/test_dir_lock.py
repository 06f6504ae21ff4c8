"""The checkpoint.dir lock: live holders are refused, stale ones (dead pid, reused pid, silent
remote host, an earlier run of the same SLURM job) are taken over; real processes and files."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from megatron_emu.training.dir_lock import LOCK_FILE, DirLock, DirLockError


def _plant(directory, age_s: float = 0.0, **identity) -> None:
    """A lock as another job would have left it."""
    directory.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": 1, "pid_start": None, "slurm_job_id": None,
              "started": time.time() - age_s, "token": "other", **identity}
    path = directory / LOCK_FILE
    path.write_text(json.dumps(holder))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_a_second_holder_is_refused_while_the_first_lives(tmp_path):
    first = DirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(DirLockError, match=f"in use by another job .*pid {os.getpid()}") as info:
            DirLock(tmp_path).acquire()
        assert "\n" not in str(info.value) and str(tmp_path / LOCK_FILE) in str(info.value)
        assert first.lost_reason() is None
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second = DirLock(tmp_path)
    second.acquire()  # free again
    second.release()


def test_a_live_process_on_this_host_keeps_its_lock(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        _plant(tmp_path, pid=sleeper.pid, pid_start=psutil.Process(sleeper.pid).create_time())
        with pytest.raises(DirLockError, match=f"pid {sleeper.pid}"):
            DirLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("case", ["dead_pid", "reused_pid", "silent_remote_host", "same_slurm_job"])
def test_stale_locks_are_taken_over(tmp_path, monkeypatch, caplog, case):
    if case == "dead_pid":
        _plant(tmp_path, pid=_dead_pid())
    elif case == "reused_pid":  # the recorded pid now belongs to another process (this one)
        _plant(tmp_path, pid=os.getpid(), pid_start=1.0)
    elif case == "silent_remote_host":
        _plant(tmp_path, host="elsewhere", pid=123, age_s=3600)
    else:  # a requeued job: same SLURM job id, its previous run on another node, fresh heartbeat
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        _plant(tmp_path, host="elsewhere", pid=123, slurm_job_id="4242")
    lock = DirLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="megatron_emu"):
        lock.acquire()
    try:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.identity["token"]
        assert any("taking over the lock" in r.getMessage() for r in caplog.records)
    finally:
        lock.release()


@pytest.mark.parametrize("slurm", [None, "4243"])
def test_a_recent_lock_from_another_host_is_respected(tmp_path, monkeypatch, slurm):
    if slurm:  # another SLURM job's lock is not ours to take
        monkeypatch.setenv("SLURM_JOB_ID", slurm)
    _plant(tmp_path, host="elsewhere", pid=123, age_s=60)
    with pytest.raises(DirLockError, match="host elsewhere, pid 123"):
        DirLock(tmp_path).acquire()


@pytest.mark.skipif(shutil.which("squeue") is None, reason="needs SLURM's squeue")
def test_the_lock_of_a_finished_slurm_job_on_another_host_is_taken_over(tmp_path, monkeypatch, caplog):
    """A chained job starting right after its predecessor died on another node."""
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    _plant(tmp_path, host="elsewhere", pid=123, slurm_job_id="987654321", age_s=5)  # no such job
    lock = DirLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="megatron_emu"):
        lock.acquire()
    lock.release()
    assert any("SLURM job 987654321 is no longer running" in r.getMessage() for r in caplog.records)


def test_the_holder_heartbeats_and_notices_a_takeover(tmp_path):
    lock = DirLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / LOCK_FILE
    os.utime(path, (1, 1))
    deadline = time.monotonic() + 10
    while path.stat().st_mtime < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > time.time() - 60, "no heartbeat"
    _plant(tmp_path, host="elsewhere", pid=5)  # another job took it over meanwhile
    assert "taken over by another job (host elsewhere, pid 5" in lock.lost_reason()
    lock.release()
    assert path.exists(), "release must not remove another job's lock"
