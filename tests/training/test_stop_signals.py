"""SIGTERM / SIGUSR1 from any launcher end in a checkpoint and exit 0: to ``megatron-emu-launch``
itself (what scancel, a node drain or Kubernetes send to torchrun's role), to every process
of the job during start-up (SLURM's pre-timeout signal), with DataLoader workers as the presets
use them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.helpers.training import ROOT, metrics, tiny_args

LAUNCH = [sys.executable, "-m", "megatron_emu.launch"]


def _launch(tmp_path, argv: list[str], *launch_args: str, nproc: int = 4) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [*LAUNCH, *launch_args, "--standalone", "--nproc-per-node", str(nproc), *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path)


def _wait(proc, predicate, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _finish(proc, timeout=180) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


def _train_args(train_data, tmp_path, *sets) -> list[str]:
    data, tok = train_data
    # data.num_workers as the presets use (tiny_args turns them off for speed).
    return ["-m", "megatron_emu.train",
            *tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "data.num_workers=1",
                       "train.train_iters=500", "run.log_interval=1", *sets)]


def _assert_stopped_with_checkpoint(tmp_path, out: str) -> int:
    done = metrics(tmp_path / "run")[-1]["step"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"iter_{done:07d}", out[-3000:]
    assert (tmp_path / "ckpt" / f"iter_{done:07d}" / "megatron_emu.json").is_file()
    status = json.loads((tmp_path / "run" / "exit_status.json").read_text())
    assert status["status"] == "stopped" and status["iteration"] == done, status
    return done


def test_sigterm_to_the_launcher_saves_the_current_step_and_exits_0(train_data, tmp_path):
    """4 ranks (TP2 PP2) with DataLoader workers (on the ranks that load); SIGTERM to the launcher
    only: it forwards it to the ranks' process groups as torchrun does (workers included), the
    ranks finish the step, save and exit 0, and so does the launcher."""
    proc = _launch(tmp_path, _train_args(train_data, tmp_path))
    _wait(proc, lambda: (tmp_path / "run" / "metrics.jsonl").exists() and len(metrics(tmp_path / "run")) >= 2)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.ppid() != proc.pid]
    assert workers, "expected DataLoader workers (the presets use them)"
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    done = _assert_stopped_with_checkpoint(tmp_path, out)
    assert 2 <= done < 500
    assert "the ranks stopped cleanly after SIGTERM" in out and "Traceback" not in out


def test_a_stop_signal_during_start_up_is_not_lost(train_data, tmp_path):
    """SIGUSR1 to the launcher and to every rank while the ranks are still starting (importing
    torch, before any handler exists), as SLURM's pre-timeout signal reaches every process of
    the step: no rank dies of it, the first step is trained, saved, and every process exits 0."""
    proc = _launch(tmp_path, _train_args(train_data, tmp_path))
    _wait(proc, lambda: len(psutil.Process(proc.pid).children()) == 4, timeout=60)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children()]:
        p.send_signal(signal.SIGUSR1)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert _assert_stopped_with_checkpoint(tmp_path, out) == 1
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1]


def test_ranks_that_do_not_stop_are_killed_after_the_grace_period(tmp_path):
    """A rank that never handles the stop signal (a plain sleeper) is killed --stop-grace
    seconds after it; the launcher exits with the rank's fate (128 + SIGKILL), one line each."""
    proc = _launch(tmp_path, ["-m", "tests.helpers.sleeper"], "--stop-grace", "2", nproc=1)
    _wait(proc, lambda: len(psutil.Process(proc.pid).children()) == 1, timeout=60)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc, timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL, out
    assert 2 <= time.monotonic() - t0 < 30
    assert "still running 2 s after SIGTERM; killing them" in out and "Traceback" not in out


def test_the_launcher_exits_with_the_code_of_the_failed_rank(tmp_path):
    proc = _launch(tmp_path, ["-m", "tests.helpers.sleeper", "--exit", "3"], nproc=2)
    out = _finish(proc, timeout=60)
    assert proc.returncode == 3, out
    assert "rank 0 (local rank 0) failed with exit code 3" in out and "Traceback" not in out
