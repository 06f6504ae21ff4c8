"""One optimizer step's forward/backward over micro-batches on megatron-core's schedules
(no pipelining, 1F1B or interleaved, chosen by megatron-core from the layout), with
megatron-core's DDP (and distributed-optimizer grad buffers)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_emu.contracts.batch import Emu2Batch
from megatron_emu.data.batch_source import stage_fields
from megatron_emu.data.decode import normalize
from megatron_emu.model.emu2 import Emu2Model


@dataclass(frozen=True, kw_only=True)
class DDPSpec:
    """megatron-core DDP: gradients reduced in fp32, optionally overlapped with the backward
    (and the parameter all-gather with the forward), sharded for the distributed optimizer."""

    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    use_distributed_optimizer: bool = True


@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """The schedule's shapes: ``seq_length`` of the activation exchanged between stages (the
    model's ``p2p_seq_length``: tokens plus the visual payload rows) and the micro-batch size."""

    seq_length: int
    micro_batch_size: int


def wrap_ddp(spec: DDPSpec, chunks: list[Emu2Model], pgs: ProcessGroupCollection) -> list[DistributedDataParallel]:
    """megatron-core DDP around each chunk; wires the schedule hooks into the first chunk's config."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=spec.overlap_grad_reduce,
        overlap_param_gather=spec.overlap_param_gather,
        use_distributed_optimizer=spec.use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0, pg_collection=pgs)
        for i, chunk in enumerate(chunks)
    ]
    config = chunks[0].config
    no_sync = [m.no_sync for m in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def _loss_func(output: dict[str, torch.Tensor], poison: bool = False):
    """megatron-core loss contract: ``(loss, reporting dict)``; the schedule averages over
    micro-batches (and DDP over data-parallel ranks). ``poison`` makes the loss NaN (fault
    injection, ``train.inject_nan_iterations``)."""
    loss = output["loss"] * float("nan") if poison else output["loss"]
    report = {k: v.detach().clone() for k, v in output.items()}
    report["loss"] = loss.detach().clone()
    return loss, report


def forward_step(data_iterator, model, dev: torch.device, dtype: torch.dtype, poison: bool = False):
    """megatron-core forward-step contract: ``(output, loss_func)``. The host micro-batch is
    copied to the device here, just before its forward (``non_blocking`` from pinned memory),
    and its pixels normalised there."""
    batch: Optional[Emu2Batch] = next(data_iterator)
    if batch is not None:  # only what this chunk reads (virtual pipeline: one of several chunks)
        chunk = model.module if hasattr(model, "module") else model
        fields = stage_fields(chunk.pre_process, chunk.post_process)
        batch = batch.only(fields).to(dev, dtype, normalize=normalize) if fields else None
    return model(batch), functools.partial(_loss_func, poison=poison)


def forward_backward(spec: StepSpec, model: list[torch.nn.Module], microbatches: list[Optional[Emu2Batch]],
                     dev: torch.device, dtype: torch.dtype, forward_only: bool = False,
                     poison: bool = False) -> list[dict[str, torch.Tensor]]:
    """Run the schedule over this rank's micro-batches (host ``Emu2Batch``es, ``None`` on
    stages that need no data); returns the per-micro-batch loss reports on the last pipeline
    stage (an empty list elsewhere)."""
    iterators: list[Iterable] | Iterable = [iter(microbatches) for _ in model]
    fwd_bwd = get_forward_backward_func()
    return fwd_bwd(
        forward_step_func=functools.partial(forward_step, dev=dev, dtype=dtype, poison=poison),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model,
        num_microbatches=len(microbatches),
        seq_length=spec.seq_length,
        micro_batch_size=spec.micro_batch_size,
        forward_only=forward_only,
    )


def zero_grads(model: list[DistributedDataParallel]) -> None:
    for chunk in model:
        chunk.zero_grad_buffer()

