"""Training checkpoints on megatron-core ``dist_checkpointing``: atomic, reshardable, resumable.

Layout under ``checkpoint.dir``::

    iter_0000020/            dist_checkpointing directory (torch_dist): model chunks, optimizer
                             (``fully_reshardable``: any TP/PP/DP on load), per-rank RNG
    iter_0000020/megatron_emu.json   iteration, consumed samples, scheduler, data-loader position,
                             skip counters, the layout and the resolved config (JSON, no pickle)
    iter_0000020/checksums.json      CRC-32 of every file of the iteration (checkpoint/integrity.py)
    iter_0000020/tokenizer/  a copy of data.tokenizer (stored as an absolute path): the checkpoint
                             converts and generates without --tokenizer (checkpoint/tokenizer_files.py)
    latest                   "iter_0000020": written last, atomically
    .lock                    the job that writes here (training/dir_lock.py)

A save goes to ``iter_NNNNNNN.tmp``; once every rank has written its files, each rank checksums
(and fsyncs) the files it wrote, rank 0 writes the manifest, fsyncs the directory and renames
it into place, then replaces ``latest`` (fsynced too). A job killed during a save leaves
``latest`` on the previous complete checkpoint; stale ``.tmp`` directories are removed at the
next start, by the job holding the directory's lock (so never under a live writer).
Loading goes through ``checkpoint/mcore_load.py``: ``.metadata`` is unpickled by an allow-list
unpickler, every other pickled file by ``torch.load(weights_only=True)``, and every file read is
checked against ``checksums.json`` (``checkpoint.verify``). (Transformer Engine modules unpickle
their own FP8 ``_extra_state`` when loaded: see docs/checkpoints.md.)
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_emu.checkpoint import mcore_load
from megatron_emu.checkpoint.model_state import (  # noqa: F401  (part of this module's API)
    CheckpointError,
    chunks_of,
    load_chunks,
    load_model_state,
    read_meta,
)
from megatron_emu.contracts.checkpoint_format import (  # noqa: F401  (part of this module's API)
    TMP_SUFFIX,
    CheckpointFileError,
    iter_name,
    resolve,
)
from megatron_emu.training import ckpt_publish

log = logging.getLogger("megatron_emu.checkpoint")
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


# Architecture fields that must match for weights to load (shapes), by dotted name.
def _architecture(model_cfg: dict) -> dict:
    out = {}
    for section in ("vision", "adapter", "lm"):
        for key, value in model_cfg[section].items():
            out[f"model.{section}.{key}"] = value
    return out


def _padded_rows(arch: dict) -> Optional[int]:
    vocab, multiple = arch.get("model.lm.vocab_size"), arch.get("model.lm.make_vocab_size_divisible_by")
    if not isinstance(vocab, int) or not isinstance(multiple, int) or multiple <= 0:
        return None
    return -(-vocab // multiple) * multiple


def check_model_matches(meta: dict, cfg, ckpt: Path, weights_only: bool = False) -> None:
    """Refuse a checkpoint of another architecture. ``weights_only`` (``checkpoint.load``, e.g.
    Emu2 -> Emu2-Chat, docs/tuning.md) also accepts another ``model.adapter.n_query`` (the pooling
    has no parameters) and a vocabulary grown within the same padded rows ([USER] / [ASSISTANT]
    take two padding rows)."""
    saved = _architecture(meta["config"]["model"])
    now = _architecture(asdict(cfg.model))
    same = {"model.adapter.n_query"} if weights_only else set()
    if weights_only and _padded_rows(saved) == _padded_rows(now) is not None \
            and saved["model.lm.vocab_size"] <= now["model.lm.vocab_size"]:
        same.add("model.lm.vocab_size")
    diff = [f"{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and k not in same]
    if diff:
        raise CheckpointError(f"{ckpt} holds a different model than the config:\n  " + "\n  ".join(diff))


def _rng_object(pgs) -> ShardedObject:
    """This rank's RNG states, keyed by its (pp, tp, dp) position."""
    from megatron_emu.utils import device

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if device.has_cuda():
        state["device"] = device.rng_state()
    coords = [(torch.distributed.get_rank(g), torch.distributed.get_world_size(g))
              for g in (pgs.pp, pgs.tp, pgs.dp)]
    return ShardedObject("rng_state", state, tuple(s for _, s in coords), tuple(r for r, _ in coords),
                         replica_id=0)


def _set_rng(state: dict) -> None:
    from megatron_emu.utils import device

    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "device" in state and device.has_cuda():
        device.set_rng_state(state["device"])


def _sharded(model: list, optimizer, pgs, *, with_optimizer: bool, with_rng: bool, loading: bool) -> dict:
    chunks = chunks_of(model)
    state = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading, metadata=OPTIMIZER_FORMAT)
    if with_rng:
        state["rng_state"] = _rng_object(pgs)
    return state


# megatron-core >= 0.17 hands async saves to NVRx (nvidia-resiliency-ext) by default; our queue
# and finalisation use megatron-core's own asynchronous writer, which every version has.
_ASYNC_KW = {"async_strategy": "mcore"} if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters else {}


def _barrier() -> None:
    torch.distributed.barrier()


def cleanup_partial(directory: str | Path) -> None:
    """Rank 0: remove ``*.tmp`` leftovers of interrupted saves. Call it only while holding the
    directory's lock (``dir_lock.DirLock``): then no live job is writing them."""
    directory = Path(directory)
    if torch.distributed.get_rank() == 0 and directory.is_dir():
        for tmp in directory.glob(f"iter_*{TMP_SUFFIX}"):
            log.warning("removing %s, left by an interrupted save", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier()


def _check_lock(lock) -> None:
    """All ranks: stop if rank 0's lock on the directory was taken over by another job."""
    from megatron_emu.utils import device

    lost = lock.lost_reason() if lock is not None and torch.distributed.get_rank() == 0 else None
    flag = torch.tensor([1.0 if lost else 0.0], device=device.device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item():
        raise CheckpointError(lost or "rank 0 lost the checkpoint.dir lock (see its log); not saving")


def save(directory: str | Path, model: list, optimizer, pgs, meta: dict, keep_last: int,
         async_queue=None, lock=None) -> Path:
    """Write ``iter_NNNNNNN`` atomically and point ``latest`` at it (all ranks call this).

    With ``async_queue`` (megatron-core's ``AsyncCallsQueue``, GPU only) the tensors are copied
    to host memory now and written in the background; publishing (checksums, fsync, rename,
    ``latest``) runs in the queue's finalisation once every rank has finished writing. With
    ``lock`` (the job's ``DirLock``), a job that lost its lock to another one stops instead.
    """
    directory = Path(directory)
    _check_lock(lock)
    name = iter_name(meta["iteration"])
    tmp = directory / f"{name}{TMP_SUFFIX}"
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = _sharded(model, optimizer, pgs, with_optimizer=True, with_rng=True, loading=False)
    meta, tokenizer = _with_tokenizer(meta)
    publish = functools.partial(ckpt_publish.publish, directory, name, json.dumps(meta, indent=1) + "\n",
                                keep_last, tokenizer=tokenizer)
    if async_queue is not None:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True, **_ASYNC_KW)
        request.finalize_fns.append(publish)
        async_queue.schedule_async_request(request)
        return directory / name
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    _fault_injection(meta["iteration"])
    publish()
    return directory / name


def _with_tokenizer(meta: dict) -> tuple[dict, Optional[str]]:
    """``meta`` with ``data.tokenizer`` made absolute, and that tokenizer directory (copied into
    the checkpoint by ``publish``: ``checkpoint/tokenizer_files.py``)."""
    from megatron_emu.checkpoint.tokenizer_files import absolute

    data = (meta.get("config") or {}).get("data") or {}
    tokenizer = absolute(data.get("tokenizer"))
    if not tokenizer:
        return meta, None
    meta = json.loads(json.dumps(meta))
    meta["config"]["data"]["tokenizer"] = tokenizer
    return meta, tokenizer


def _fault_injection(iteration: int) -> None:
    """Drill for crash consistency: ``MEGATRON_EMU_KILL_DURING_SAVE=N`` SIGKILLs every rank
    after the data of iteration N is written but before it is published (tests use it)."""
    target = os.environ.get("MEGATRON_EMU_KILL_DURING_SAVE")
    if target is not None and int(target) == iteration:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def load_full(ckpt: Path, model: list, optimizer, pgs, layout: dict, verify: bool = True) -> dict:
    """Restore model, optimizer and (same layout only) RNG; returns the checkpoint's meta."""
    meta = read_meta(ckpt, verify)
    same_layout = meta.get("layout") == layout
    request = _sharded(model, optimizer, pgs, with_optimizer=True, with_rng=same_layout, loading=True)
    state = mcore_load.load(request, ckpt, verify=verify)
    load_chunks(model, state)
    optimizer.load_state_dict(state["optimizer"])
    if same_layout:
        _set_rng(state["rng_state"])
    else:
        log.info("checkpoint layout %s differs from this run's %s: model and optimizer are "
                 "resharded, RNG streams start fresh", meta.get("layout"), layout)
    return meta


def load_weights(ckpt: Path, model: list, optimizer, verify: bool = True, vocab_size: Optional[int] = None) -> dict:
    """Model weights only (``checkpoint.load``): no optimizer, scheduler, RNG or data position.
    ``vocab_size`` (the config's) above the checkpoint's: the new rows start at the mean of the
    checkpoint's rows (``init_grown_vocab_rows``)."""
    meta = read_meta(ckpt, verify)
    load_model_state(ckpt, model, verify)
    saved = meta["config"]["model"]["lm"]["vocab_size"]
    if vocab_size is not None and vocab_size > saved:
        init_grown_vocab_rows(model, saved, vocab_size)
    # bf16 models keep fp32 main parameters in the optimizer: refresh them from the loaded weights.
    optimizer.reload_model_params()
    return meta


VOCAB_ROW_MODULES = ("embedding.word_embeddings", "heads.output_layer")


@torch.no_grad()
def init_grown_vocab_rows(model: list, old: int, new: int) -> None:
    """Rows ``old..new-1`` of the embedding and the LM head (vocab-parallel: each TP rank holds
    a contiguous slice of the padded rows) := the mean of rows ``0..old-1``, so a token added by
    a vocabulary grown within the padding ([USER] / [ASSISTANT], docs/tuning.md) starts as an
    average token instead of the zero padding row (embedding zero, logit zero). Every rank of a
    tensor-parallel group calls this (one all-reduce per module)."""
    for chunk in model:
        for name, module in chunk.named_modules():
            if not name.endswith(VOCAB_ROW_MODULES):
                continue
            weight, group = module.weight, module.tp_group
            rows = weight.shape[0]
            start = torch.distributed.get_rank(group) * rows
            mine = weight[: max(0, min(rows, old - start))].float()
            total = torch.cat([mine.sum(0), torch.tensor([float(mine.shape[0])], device=weight.device)])
            torch.distributed.all_reduce(total, group=group)
            lo, hi = max(0, old - start), max(0, min(rows, new - start))
            if hi > lo:
                weight[lo:hi] = (total[:-1] / total[-1]).to(weight.dtype)


def all_finite(model: list) -> bool:
    """True when every parameter on every rank is finite (all ranks call this)."""
    from megatron_emu.utils import device

    flags = [torch.isfinite(p.data).all() for m in model for p in m.parameters()]
    bad = (~torch.stack(flags)).sum().float().reshape(1) if flags else torch.zeros(1, device=device.device())
    torch.distributed.all_reduce(bad)  # one host read for the whole model, not one per tensor
    return bad.item() == 0
