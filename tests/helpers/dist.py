"""Run a function on N forked ranks inside pytest (one import of torch/megatron per pytest
process; ~2 s per 4-rank run instead of ~10 s per torchrun)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import torch

    from megatron_emu.compat import setup_process

    torch.set_num_threads(1)
    try:
        setup_process()  # the CPU layer on a machine without CUDA (a no-op when the parent enabled it)
        result = fn(rank, *args)
        # Plain pickle (tensors by value): the worker may exit before the parent reads.
        out.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_emu.parallel.groups import destroy

            destroy()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = 300) -> list[Any]:
    """Fork ``world`` ranks running ``fn(rank, *args)``; returns results by rank, raising the
    first rank's traceback on failure. ``fn`` must not rely on state initialised in the parent
    beyond imports (no process group or threaded torch work before forking). A parent that has
    already initialised CUDA (a GPU test ran in it) spawns instead: CUDA cannot be re-initialised
    in a forked child."""
    import torch

    ctx = mp.get_context("spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork")
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world:
        if time.monotonic() > deadline:
            break
        if out.empty():
            if all(not p.is_alive() for p in procs) and out.empty():
                break
            time.sleep(0.01)
            continue
        rank, status, payload = out.get()
        if status == "ok":
            results[rank] = pickle.loads(payload)  # our own child's results
        else:
            errors.append((rank, payload))
        if errors:
            break
    for p in procs:
        p.join(timeout=1 if errors else 30)
        if p.is_alive():
            p.kill()
    if errors:
        rank, tb = errors[0]
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    if len(results) < world:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"ranks did not all finish (exit codes {codes})")
    return [results[r] for r in range(world)]
