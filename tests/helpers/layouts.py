"""Rank functions for the layout-equivalence tests (run in forked CPU/gloo ranks).

Weights travel through megatron-core ``dist_checkpointing`` (one TP1/PP1 checkpoint made from
the reference weights, resharded on load into every layout). Gradients come back the same
way: each layout writes its gradients *as a checkpoint* (parameter data := its reduced
gradient), which a single rank loads unsharded and compares with the reference gradients.
"""

from __future__ import annotations

import os

import torch

from megatron_emu.parallel.sizes import ParallelSizes
from megatron_emu.training import build


def _setup(cfg):
    from megatron_emu.parallel.groups import init_distributed

    init_distributed()
    pgs = build.process_groups(cfg)
    return pgs, build.model_chunks(cfg, pgs)


def _sharded(chunks):
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _save(chunks, path: str) -> None:
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded(chunks), path)


def _load(chunks, path: str) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded(chunks), path)
    for i, c in enumerate(chunks):
        c.load_state_dict(state[f"model{i}"], strict=True)


def save_reference_weights(rank: int, cfg, canonical: dict, path: str) -> None:
    """World size 1: load the canonical (TP1/PP1) weights and write them as a sharded checkpoint."""
    _, chunks = _setup(cfg)
    chunks[0].load_state_dict(canonical, strict=True)
    _save(chunks, path)


def load_unsharded(rank: int, cfg, path: str) -> dict:
    """World size 1: read a checkpoint of any layout back as the canonical full state dict."""
    _, chunks = _setup(cfg)
    _load(chunks, path)
    return {k: v.detach().clone() for k, v in chunks[0].state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _gather_distopt_grads(ddp_chunks) -> None:
    """After a distributed-optimizer reduce-scatter each DP rank holds one shard of every grad
    bucket; all-gather them so every ``main_grad`` is whole again (test-side only)."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for chunk in ddp_chunks:
        for group in chunk.bucket_groups:
            pg = group.intra_distributed_optimizer_instance_group
            size, rank = torch.distributed.get_world_size(pg), torch.distributed.get_rank(pg)
            for bucket in group.buckets:
                local = shard_buffer(bucket.grad_data, size)[rank].clone()
                torch.distributed.all_gather_into_tensor(bucket.grad_data, local, group=pg)


def run_layout(rank: int, cfg, weights: str, microbatches: list, grads_out: str) -> dict:
    """One forward/backward step of the global batch on this layout.

    Returns this rank's per-micro-batch losses (last pipeline stage only) and which
    parameters had no gradient (frozen); writes the reduced gradients to ``grads_out``.
    """
    from megatron.core import parallel_state

    from megatron_emu.training.schedule import forward_backward, wrap_ddp

    pgs, chunks = _setup(cfg)
    _load(chunks, weights)
    model = wrap_ddp(build.ddp_spec(cfg), chunks, pgs)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    step = build.step_spec(cfg, ParallelSizes.from_groups(pgs))
    losses = forward_backward(step, model, microbatches[dp_rank::dp], torch.device("cpu"), torch.float32)
    if cfg.parallel.use_distributed_optimizer and dp > 1:
        _gather_distopt_grads(model)
    frozen = []
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                if p.requires_grad:
                    p.copy_(p.main_grad)
                else:
                    frozen.append(name)
                    p.fill_(float("nan"))  # a frozen parameter must not be compared as a grad
    _save(chunks, grads_out)
    return {
        "losses": [{k: float(v) for k, v in mb.items()} for mb in losses],
        "dp_rank": dp_rank,
        "frozen": frozen,
    }


def run_clipped_step(rank: int, cfg, weights: str, microbatches: list, params_out: str) -> dict:
    """One optimizer update made as ``Trainer.step`` makes it (training/loop.py): the schedule's
    forward/backward over this DP rank's micro-batches, then ``training.update.apply_update``
    (gradient norm, LR schedule step, clipping, optimizer step). Writes the updated parameters
    to ``params_out``; returns this rank's gradient norm and learning rate."""
    from megatron.core import parallel_state

    from megatron_emu.training.optimizer import build_optimizer
    from megatron_emu.training.schedule import forward_backward, wrap_ddp, zero_grads
    from megatron_emu.training.update import apply_update

    pgs, chunks = _setup(cfg)
    _load(chunks, weights)
    model = wrap_ddp(build.ddp_spec(cfg), chunks, pgs)
    optimizer, scheduler = build_optimizer(build.optimizer_spec(cfg), model, pgs)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    zero_grads(model)
    optimizer.zero_grad()
    dev = torch.device("cpu")
    forward_backward(build.step_spec(cfg, ParallelSizes.from_groups(pgs)), model, microbatches[dp_rank::dp], dev,
                     torch.float32)
    ok, values = apply_update(optimizer, scheduler, cfg.train.clip_grad, torch.zeros(3), dev)
    assert ok
    _save(chunks, params_out)
    return {"grad_norm": values[3], "lr": optimizer.param_groups[0]["lr"]}
