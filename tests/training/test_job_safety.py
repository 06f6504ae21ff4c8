"""Jobs that share a checkpoint directory, ranks whose launcher died, collectives that never
complete: each ends in bounded time with a clear message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers.dist import _free_port, run_ranks
from tests.helpers.training import metrics, tiny_args, train


def _wait_for_steps(proc: subprocess.Popen, run_dir, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= steps:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("the job did not start training")


def _single_rank(args: list[str]) -> subprocess.Popen:
    """``megatron-emu-train`` as a one-rank job of its own (as a second user would start it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    return subprocess.Popen([sys.executable, "-m", "megatron_emu.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_second_job_on_the_same_checkpoint_dir_is_refused(train_data, tmp_path):
    data, tok = train_data
    ckpt = tmp_path / "ckpt"
    job_a = _single_rank(tiny_args(data, tok, tmp_path / "run_a", ckpt, "train.train_iters=100000",
                                   "run.log_interval=1", tp=1, pp=1))
    try:
        _wait_for_steps(job_a, tmp_path / "run_a", 1)
        job_b = _single_rank(tiny_args(data, tok, tmp_path / "run_b", ckpt, "train.train_iters=2", tp=1, pp=1))
        out, _ = job_b.communicate(timeout=240)
        assert job_b.returncode == 1, out
        errors = [line for line in out.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "Traceback" not in out, out
        assert "is in use by another job" in errors[0] and f"pid {job_a.pid}" in errors[0], errors
        assert not (tmp_path / "run_b" / "metrics.jsonl").exists()
        assert job_a.poll() is None, "the first job must not be disturbed"
        job_a.send_signal(signal.SIGTERM)  # it saves and ends normally, releasing the lock
        out, _ = job_a.communicate(timeout=120)
        assert job_a.returncode == 0, out
    finally:
        if job_a.poll() is None:
            job_a.kill()
    assert not (ckpt / ".lock").exists()
    assert (ckpt / "latest").is_file()


def test_ranks_exit_when_their_launcher_is_killed(train_data, tmp_path):
    """torchrun alone is SIGKILLed mid-run: both ranks notice within seconds and exit (instead
    of training on, or waiting in a collective); the next job takes over their stale lock."""
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.train_iters=100000",
                     "run.log_interval=1", tp=1, pp=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "megatron_emu.train", *args]
    launcher = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    ranks = []
    try:
        _wait_for_steps(launcher, tmp_path / "run", 1)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "megatron_emu.train" in
                 " ".join(p.cmdline())]
        assert len(ranks) == 2
        launcher.kill()
        launcher.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=20)
        assert not alive, f"orphaned ranks still running: {[p.pid for p in alive]}"
    finally:
        for p in ranks:
            if p.is_running():
                p.kill()
        if launcher.poll() is None:
            launcher.kill()
    assert "its launcher" in launcher.stdout.read()
    # Whatever the killed job left (a stale lock, a partial save), the next job starts.
    again = tiny_args(data, tok, tmp_path / "run2", tmp_path / "ckpt", "train.train_iters=1", tp=1, pp=1)
    assert train(1, again) == [0]


def _stuck_barrier(rank: int, cfg, done) -> float:
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.training import build

    init_distributed(cfg.parallel.collective_timeout_s)
    pgs = build.process_groups(cfg)
    if rank == 1:  # never joins the barrier (until rank 0 is done, 90 s at most)
        deadline = time.monotonic() + 90
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return 0.0
    import torch

    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError):
            torch.distributed.barrier(group=pgs.tp)  # a megatron-core group (its default timeout: 30 min)
        return time.monotonic() - start
    finally:
        done.touch()


def test_collectives_of_megatron_groups_time_out(tmp_path):
    from tests.helpers.tiny import tiny_config

    cfg = tiny_config(tp=2, extra=("parallel.collective_timeout_s=4",))
    waited, _ = run_ranks(2, _stuck_barrier, cfg, tmp_path / "done", timeout=120)
    assert 3.5 < waited < 45, waited  # 4 s, not megatron-core's 30 min (nor rank 1's 90 s)
