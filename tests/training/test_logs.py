"""What a user reads: a resumed TP2 x PP2 run under torchrun prints our lines, library notices
once in our words; ``--verbose`` shows them as the libraries print them."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.training import ROOT, tiny_args


def _torchrun(argv: list[str], *extra: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "megatron_emu.train", *argv, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_resumed_run_prints_notices_once_and_verbose_shows_them(train_data, tmp_path):
    data, tok = train_data
    argv = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.exit_interval=2", "run.log_interval=1",
                     "train.train_iters=6")
    _torchrun(argv)
    quiet = _torchrun(argv)  # resumes at 2: megatron-core's loader raises torch DCP notices
    assert "resumed from" in quiet and "FutureWarning" not in quiet
    assert quiet.count("torch DCP deprecation notices") == 1
    steps = [line for line in quiet.splitlines() if "INFO step" in line]
    assert steps and all("ETA" in line or "step      6/6" in line for line in steps[:-1])
    verbose = _torchrun(argv, "--verbose")
    assert "FutureWarning" in verbose
