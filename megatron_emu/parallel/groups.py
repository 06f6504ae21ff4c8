"""Process groups: initialise torch.distributed and megatron-core's model-parallel groups, and
hand the explicit ``ProcessGroupCollection`` to everything that communicates."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_emu.parallel.watchdog import watch_parent
from megatron_emu.utils import device


@dataclass(frozen=True, kw_only=True)
class GroupsSpec:
    """The layout asked for (rank order tp -> dp -> pp; DP is what the world size leaves)."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    timeout_s: float = 600.0  # every collective of megatron-core's groups
    seed: int = 1234  # torch's and the model-parallel RNG


def init_distributed(timeout_s: float = 600.0) -> None:
    """``torch.distributed`` from the launcher's environment (torchrun / srun / our tests);
    every collective of the world group fails after ``timeout_s``. With more than one rank (or
    under torchrun), the rank exits when its launcher dies (``watchdog.watch_parent``)."""
    if dist.is_initialized():
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        watch_parent()
    device.set_local_device()
    dist.init_process_group(
        backend=device.backend(),
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def init_groups(spec: GroupsSpec) -> ProcessGroupCollection:
    """megatron-core groups for the layout and the model-parallel RNG; returns the explicit
    process-group collection (``parallel.sizes.ParallelSizes.from_groups`` reads the sizes)."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=spec.tp,
        pipeline_model_parallel_size=spec.pp,
        virtual_pipeline_model_parallel_size=spec.vpp,
        distributed_timeout_minutes=spec.timeout_s / 60.0,  # megatron-core's default: 30
    )
    torch.manual_seed(spec.seed)
    model_parallel_cuda_manual_seed(spec.seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def init_model_parallel(cfg) -> ProcessGroupCollection:
    """``init_groups`` for a root config. Transitional: only the converter
    (``checkpoint/convert.py``) and generation (``inference/generate.py``) call it, until they
    build through the composition root's specs (``training/build.py``)."""
    par = cfg.parallel
    return init_groups(GroupsSpec(tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                                  vpp=par.virtual_pipeline_model_parallel_size,
                                  timeout_s=par.collective_timeout_s, seed=cfg.train.seed))


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
