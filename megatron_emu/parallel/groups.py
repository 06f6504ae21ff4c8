"""Process groups: initialise torch.distributed and megatron-core's model-parallel groups, and
hand the explicit ``ProcessGroupCollection`` to everything that communicates."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_emu.config.schema import EmuConfig
from megatron_emu.parallel.watchdog import watch_parent
from megatron_emu.utils import device


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


def init_model_parallel(cfg: EmuConfig) -> ProcessGroupCollection:
    """megatron-core groups for the configured layout (rank order tp -> dp -> pp) and the
    model-parallel RNG; returns the explicit process-group collection."""
    par = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=par.collective_timeout_s / 60.0,  # megatron-core's default: 30
    )
    torch.manual_seed(cfg.train.seed)
    model_parallel_cuda_manual_seed(cfg.train.seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
