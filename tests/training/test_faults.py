"""Preemption signals, non-finite steps and bad configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_emu.cli.train import main as train_main
from tests.helpers.training import TINY, metrics, tiny_args, train


def test_sigusr1_saves_and_exits_cleanly(train_data, tmp_path):
    """torchrun with 4 CPU ranks; SIGUSR1 to the ranks mid-run (as SLURM's pre-timeout
    signal): the step finishes, a complete checkpoint is written, every rank exits 0."""
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.train_iters=500",
                     "run.log_interval=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
           str(29500 + os.getpid() % 1000), "-m", "megatron_emu.train", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if (tmp_path / "run" / "metrics.jsonl").exists() and len(metrics(tmp_path / "run")) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert len(ranks) >= 4
        for child in ranks:
            child.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    done = metrics(tmp_path / "run")[-1]["step"]
    assert 2 <= done < 500
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"iter_{done:07d}"
    assert (tmp_path / "ckpt" / f"iter_{done:07d}" / "megatron_emu.json").is_file()
    assert "stopping at iteration" in out and "signal" in out


def test_a_nan_step_is_skipped_and_training_continues(train_data, tmp_path):
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.inject_nan_iterations=[3]")
    assert train(4, args) == [0] * 4
    m = metrics(tmp_path / "run")
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6]
    assert [x["skipped"] for x in m] == [False, False, True, False, False, False]
    assert m[2]["loss"] == "nan" and m[-1]["skipped_total"] == 1
    # The skipped step did not advance the schedule (it reports the rate it did not apply).
    assert m[2]["lr"] == m[1]["lr"] and m[3]["lr"] < m[1]["lr"]
    assert all(isinstance(x["loss"], float) for x in m if not x["skipped"])
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000006"


def test_too_many_nan_steps_stop_the_job(train_data, tmp_path, caplog):
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.inject_nan_iterations=[2,3,4]",
                     "train.max_consecutive_skips=3", "checkpoint.save_interval=1")
    assert train(4, args) == [1] * 4
    m = metrics(tmp_path / "run")
    assert [x["skipped"] for x in m] == [False, True, True, True]
    # Skipped steps leave the weights finite (and the data position past the bad batches), so
    # they may be saved; the step that hit the limit is not.
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000003"
    assert not (tmp_path / "ckpt" / "iter_0000004").exists()


@pytest.mark.parametrize("sets, key", [
    (["train.lr=-1"], "train.lr"),
    (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size"),
    (["data.path=/nonexistent/dataset"], "data.path[0]"),
    (["no.such.key=1"], "no"),
])
def test_config_errors_are_reported_before_any_process_group(sets, key, capsys, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "4")
    argv = ["--config", str(TINY)]
    for s in sets:
        argv += ["--set", s]
    assert train_main(argv) == 2
    assert key in capsys.readouterr().err
    assert not dist.is_initialized()


def test_world_size_must_match_the_layout(capsys, monkeypatch, train_data):
    monkeypatch.setenv("WORLD_SIZE", "2")
    data, tok = train_data
    assert train_main(["--config", str(TINY), "--set", f"data.path={data[0].split(':', 1)[1]}"]) == 2
    assert "world size 2" in capsys.readouterr().err


def test_resume_refuses_a_different_model(train_data, tmp_path):
    data, tok = train_data
    assert train(4, tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.train_iters=1")) == [0] * 4
    other = tiny_args(data, tok, tmp_path / "run2", tmp_path / "ckpt", "model.lm.ffn_hidden_size=96")
    assert train(4, other) == [1] * 4
    status = json.loads((tmp_path / "run2" / "exit_status.json").read_text())
    assert status["status"] == "failed" and "different model" in status["reason"]


def test_wall_clock_budget_saves_and_stops(train_data, tmp_path):
    """train.exit_duration_mins: the job saves and exits 0 once its budget is used up."""
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.exit_duration_mins=0.0001")
    assert train(4, args) == [0] * 4
    status = json.loads((tmp_path / "run" / "exit_status.json").read_text())
    assert status == {"status": "stopped", "reason": "train.exit_duration_mins reached", "iteration": 1,
                      "train_iters": 6}
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000001"
