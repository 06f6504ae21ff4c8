"""Run a function on N local CPU ranks (forked processes, gloo): for tools that need a
process group on one machine (checkpoint conversion, generation), not for training.

The ranks are not forked from the caller, which may already have started an OpenMP (or CUDA)
runtime by running tensor operations: a child forked from such a process can hang in its first
parallel region. One launcher process per calling process (and per ``cpu_only``) is spawned on
first use, clean: it prepares itself for megatron-core (``compat.setup_process``), runs no
tensor operation, and forks the ranks of every later ``run_local`` call. Each call hands the
launcher what a rank forked from the caller would have inherited: the working directory, the
environment, ``sys.path``, stdout / stderr, the root logger's stream handlers and the loggers' levels, the warning filters
and the torch and numpy generators' states (Python's ``random`` is reseeded
in every forked child, as before). ``megatron=False`` (a function that uses torch only, e.g. the
converter's rank): nothing is prepared for megatron-core, and a single rank runs in the calling
process itself (no launcher, no fork)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import sys
import traceback
import warnings
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any, Callable

_LAUNCHERS: dict = {}  # (hides a GPU, prepared for megatron-core) -> (process, connection): started on first use


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _caller_state() -> dict:
    """What a rank of this process must see (picklable)."""
    root = logging.getLogger()
    handlers = [("stdout" if h.stream is sys.stdout else "stderr", h.level, h.formatter._fmt if h.formatter else None,
                 h.formatter.datefmt if h.formatter else None)
                for h in root.handlers if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)]
    torch, numpy = sys.modules.get("torch"), sys.modules.get("numpy")
    return {"cwd": os.getcwd(), "env": dict(os.environ), "path": list(sys.path), "log_level": root.level,
            "log_handlers": handlers, "warnings": list(warnings.filters),
            "log_levels": {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
                           if isinstance(lg, logging.Logger) and lg.level},
            "numpy": numpy.random.get_state() if numpy is not None else None,
            "torch": (torch.get_num_threads(), torch.get_rng_state()) if torch is not None else None}


def _adopt(state: dict, out_fd: int, err_fd: int) -> None:
    """In a rank: become like a child forked from the caller."""
    os.chdir(state["cwd"])
    os.environ.clear()
    os.environ.update(state["env"])
    sys.path[:] = state["path"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    root = logging.getLogger()
    root.setLevel(state["log_level"])
    for name, level in state["log_levels"].items():
        logging.getLogger(name).setLevel(level)
    for stream, level, fmt, datefmt in state["log_handlers"]:
        handler = logging.StreamHandler(sys.stdout if stream == "stdout" else sys.stderr)
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(fmt, datefmt))
        root.addHandler(handler)
    warnings.filters[:] = state["warnings"]
    if state["numpy"] is not None:
        import numpy
        numpy.random.set_state(state["numpy"])
    if state["torch"] is not None:
        import torch
        torch.set_num_threads(state["torch"][0])
        torch.set_rng_state(state["torch"][1])


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, cpu_only: bool,
               megatron: bool, state: dict, fds: tuple) -> None:
    _adopt(state, *fds)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    if cpu_only:  # CPU + gloo even on a GPU node (before anything asks for a device)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        if megatron:
            from megatron_emu.compat import setup_process

            setup_process()  # the CPU layer when this rank has no GPU, before megatron-core is imported
        queue.put((rank, True, fn(rank, *args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        try:  # the exception itself when it pickles (clean messages for expected errors)
            queue.put((rank, False, (e, traceback.format_exc())))
        except Exception:  # noqa: BLE001
            queue.put((rank, False, (None, traceback.format_exc())))
    finally:
        if megatron:
            from megatron_emu.parallel.groups import destroy
            destroy()
        elif "torch" in sys.modules and sys.modules["torch"].distributed.is_initialized():
            sys.modules["torch"].distributed.destroy_process_group()


def _fork_ranks(ctx, world: int, fn: Callable, args: tuple, cpu_only: bool, megatron: bool, state: dict,
                fds: tuple) -> tuple:
    """In the launcher: fork the ranks, wait for them; ``(results by rank, first error or None)``."""
    queue, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, queue, cpu_only, megatron, state, fds))
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
    return results, error


def _launcher_main(conn, cpu_only: bool, megatron: bool) -> None:
    """The launcher: prepared once, then one job per message until the caller goes away."""
    mp.current_process().daemon = False  # its children are ranks, which it always joins
    if cpu_only:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if megatron:
        from megatron_emu.compat import setup_process

        setup_process(cpu=True if cpu_only else None)
    ctx = mp.get_context("fork")
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        fds = (recv_handle(conn), recv_handle(conn))
        try:
            try:
                reply = _fork_ranks(ctx, *job, fds)
            except BaseException:  # noqa: BLE001 - e.g. an argument that does not unpickle in a rank
                reply = ({}, (-1, (None, traceback.format_exc())))
            conn.send(reply)
        finally:
            for fd in fds:
                os.close(fd)


def _launcher(cpu_only: bool, megatron: bool):
    """This process's launcher (``cpu_only``: one that hides any GPU; ``megatron``: prepared for
    megatron-core), started if needed."""
    proc, conn = _LAUNCHERS.get((cpu_only, megatron), (None, None))
    if proc is None or not proc.is_alive():
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_launcher_main, args=(child, cpu_only, megatron), daemon=True,
                           name="megatron-emu-launcher")
        proc.start()
        child.close()
        _LAUNCHERS[(cpu_only, megatron)] = (proc, conn)
    return proc, conn


def run_local(world: int, fn: Callable, *args: Any, cpu_only: bool = False, megatron: bool = True) -> list[Any]:
    """``fn(rank, *args)`` on ``world`` ranks forked by this process's clean launcher, with
    ``torch.distributed`` env set; returns the results by rank or raises with the first failing
    rank's traceback. ``fn`` and ``args`` must pickle (``fn`` a module-level function). The
    calling process never holds a process group or its threads; it prepares itself for
    megatron-core (``compat.setup_process``) as an entry point does. ``cpu_only``: the ranks hide
    any GPU (CPU tensors, gloo), as the converter wants. ``megatron=False``: ``fn`` uses torch
    only (no megatron-core, no CUDA; it sets up its own process group): nothing prepares for
    megatron-core, and one rank (``world`` 1) runs here, in this process, as ``fn(0, *args)``
    (no launcher, no fork, so nothing can hang: ``fn`` must then need no process group)."""
    if not megatron and world == 1:
        return [fn(0, *args)]
    if megatron:
        from megatron_emu.compat import setup_process

        setup_process(cpu=True if cpu_only else None)
    sys.stdout.flush()
    sys.stderr.flush()
    from megatron_emu.utils import device

    hide = cpu_only or not device.has_cuda()  # without a GPU one launcher serves both
    proc, conn = _launcher(hide, megatron)
    conn.send((world, fn, args, cpu_only, megatron, _caller_state()))
    for fd in (1, 2):
        send_handle(conn, fd, proc.pid)
    try:
        results, error = conn.recv()
    except EOFError:
        raise RuntimeError(f"the rank launcher (pid {proc.pid}) stopped; see its output above") from None
    if error:
        rank, (exc, tb) = error
        if isinstance(exc, (ValueError, KeyError, FileNotFoundError)):
            raise exc
        raise RuntimeError(f"rank {rank} failed:\n{tb}" if rank >= 0 else f"the launcher failed:\n{tb}")
    return [results[r] for r in range(world)]
