"""DataLoader workers and stop signals: SLURM, Kubernetes and torchrun signal every process of
a job; the workers must not die of SIGTERM / SIGUSR1 / SIGINT meant for their rank (which
then crashed before it could save), yet still leave when the DataLoader itself stops them."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import torch

from megatron_emu.data.loader import EmuDataLoader, LoaderSpec
from tests.helpers.datasets import IMAGE_SIZE


def test_workers_ignore_stop_signals_from_outside_but_leave_when_their_parent_asks(datasets):
    spec = LoaderSpec(paths=((1.0, str(datasets["img2dataset"][0])),), seq_length=64, n_query=4,
                      image_size=IMAGE_SIZE, micro_batch_size=2, num_workers=1, seed=7, decoder="pil")
    before = {p.pid for p in psutil.Process().children()}
    loader = EmuDataLoader(spec)
    next(loader)  # starts the worker
    (worker,) = [p for p in psutil.Process().children() if p.pid not in before]
    for sig in ("TERM", "USR1", "INT"):  # sent by another process, as a scheduler does
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    batches = [next(loader) for _ in range(3)]  # the same worker keeps serving
    assert all(isinstance(b.tokens, torch.Tensor) and b.tokens.shape == (2, 64) for b in batches)
    os.kill(worker.pid, signal.SIGTERM)  # from its parent: what DataLoader shutdown sends a stuck worker
    worker.wait(timeout=10)
    loader.close()
