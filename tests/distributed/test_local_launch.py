"""The local launcher (conversion, generation) forks its ranks from a clean launcher process:
they run even when the caller has already run parallel tensor operations (a child forked from
a process with a started OpenMP pool can hang in its first parallel region), and they see the
caller's working directory, environment and torch random state as a forked child would."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import os, torch
from megatron_emu.parallel.local_launch import run_local
from tests.distributed.test_local_launch import probe
a = torch.randn(1024, 1024); (a @ a).sum()  # the caller's OpenMP pool is running now
os.environ["LAUNCH_PROBE"] = "seen"; os.chdir(os.environ["PROBE_DIR"]); torch.manual_seed(5)
print(run_local(2, probe, 256, cpu_only=True))
print(run_local(1, probe, 128))  # the same launcher again
"""


def probe(rank: int, n: int) -> tuple:
    a = torch.ones(n, n)
    return rank, float((a @ a)[0, 0]), os.getcwd(), os.environ.get("LAUNCH_PROBE"), torch.randn(1).item()


def test_ranks_run_after_the_caller_ran_parallel_ops_and_inherit_its_state(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PROBE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = (ast.literal_eval(line) for line in out.stdout.strip().splitlines()[-2:])
    drawn = torch.randn(1, generator=torch.Generator().manual_seed(5)).item()
    assert first == [(r, 256.0, str(tmp_path), "seen", drawn) for r in range(2)]
    assert second == [(0, 128.0, str(tmp_path), "seen", drawn)]
