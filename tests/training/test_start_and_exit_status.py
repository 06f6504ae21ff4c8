"""How a run starts and how it ends: alone (one process, no launcher), under a launcher with a
world size that does not fit, and with an unexpected error (still recorded in exit_status.json);
metrics.jsonl after a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_emu.cli.train import main as train_main
from tests.helpers.training import ROOT, TINY, metrics, tiny_args, train

LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                "SLURM_STEP_NUM_TASKS")


def _alone_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_started_alone_a_one_process_layout_trains(train_data, tmp_path):
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.train_iters=2", tp=1, pp=1)
    proc = subprocess.run([sys.executable, "-m", "megatron_emu.train", *args], env=_alone_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 1 = TP 1 x PP 1 x DP 1" in proc.stderr
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2]


def test_started_alone_a_larger_layout_says_how_to_launch(train_data, capsys, monkeypatch):
    import torch.distributed as dist

    for k in LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    data, tok = train_data
    assert train_main(["--config", str(TINY), "--set", f"data.tokenizer={tok}",
                       "--set", f"data.path={json.dumps(data)}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this layout needs 4 processes (TP 2 x PP 2 x DP 1)" in err[0]
    assert "python -m megatron_emu.launch --standalone --nproc-per-node 4 -m megatron_emu.train --config" in err[0]
    assert not dist.is_initialized() and "WORLD_SIZE" not in os.environ


def test_a_world_size_that_does_not_fit_is_reported_once_without_traceback(train_data, tmp_path):
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-m", "megatron_emu.launch", "--standalone", "--nproc-per-node", "2",
                           "-m", "megatron_emu.train", *args], env=_alone_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert out.count("world size 2 is not divisible by") == 1 and "Traceback" not in out, out


def test_an_unexpected_error_is_recorded_in_exit_status(train_data, tmp_path):
    """run.dir/tensorboard is a file: the metrics writer fails with an OSError nobody expected;
    the error still propagates (with its traceback), and exit_status.json says why."""
    data, tok = train_data
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("not a directory")
    with pytest.raises(RuntimeError, match="tensorboard"):
        train(1, tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", tp=1, pp=1))
    status = json.loads((tmp_path / "run" / "exit_status.json").read_text())
    assert status["status"] == "failed" and status["rank"] == 0, status
    assert "Error" in status["reason"] and "tensorboard" in status["reason"], status


def test_metrics_keep_each_step_once_after_a_resume(train_data, tmp_path):
    """A run killed after step 3 whose last checkpoint is step 2 (and whose last line was cut
    off): the resumed run trains step 3 again; metrics.jsonl holds every step once, the redone
    step 3 with the same loss."""
    data, tok = train_data
    run = tmp_path / "run"

    def args(*sets):
        return tiny_args(data, tok, run, tmp_path / "ckpt", "checkpoint.save_interval=2",
                         "checkpoint.save_at_end=false", *sets, tp=1, pp=1)

    assert train(1, args("train.train_iters=3")) == [0]
    first = metrics(run)
    assert [m["step"] for m in first] == [1, 2, 3]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1')  # the process was killed while writing
    assert train(1, args("train.train_iters=5")) == [0]
    again = metrics(run)
    assert [m["step"] for m in again] == [1, 2, 3, 4, 5]
    assert again[2]["loss"] == first[2]["loss"] and again[:2] == first[:2]
