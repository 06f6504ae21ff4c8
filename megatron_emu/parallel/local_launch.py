"""Run a function on N local CPU ranks (forked processes, gloo): for tools that need a
process group on one machine (checkpoint conversion, generation), not for training."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, cpu_only: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    if cpu_only:  # CPU + gloo even on a GPU node (before anything asks for a device)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        from megatron_emu.compat import setup_process

        setup_process()  # the CPU layer when this rank has no GPU, before megatron-core is imported
        queue.put((rank, True, fn(rank, *args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        try:  # the exception itself when it pickles (clean messages for expected errors)
            queue.put((rank, False, (e, traceback.format_exc())))
        except Exception:  # noqa: BLE001
            queue.put((rank, False, (None, traceback.format_exc())))
    finally:
        from megatron_emu.parallel.groups import destroy
        destroy()


def run_local(world: int, fn: Callable, *args: Any, cpu_only: bool = False) -> list[Any]:
    """``fn(rank, *args)`` on ``world`` forked ranks with ``torch.distributed`` env set; returns
    the results by rank or raises with the first failing rank's traceback. Always forks (also
    for one rank), so the calling process never holds a process group or its threads; it is the
    launcher, so it prepares itself for megatron-core (``compat.setup_process``) first.
    ``cpu_only``: the ranks hide any GPU (CPU tensors, gloo), as the converter wants."""
    from megatron_emu.compat import setup_process

    # Once here, before forking: megatron-core is imported (and on a CPU its CPU layer enabled)
    # once, and every rank inherits it (each rank checks again after hiding a GPU).
    setup_process(cpu=True if cpu_only else None)
    ctx = mp.get_context("fork")
    queue, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, queue, cpu_only))
             for r in range(world)]
    for p in procs:
        p.start()
    results, error = {}, None
    for _ in range(world):
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = payload
        else:
            error = error or (rank, payload)
            break
    for p in procs:
        p.join(timeout=5 if error else None)
        if p.is_alive():
            p.kill()
    if error:
        rank, (exc, tb) = error
        if isinstance(exc, (ValueError, KeyError, FileNotFoundError)):
            raise exc
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    return [results[r] for r in range(world)]
