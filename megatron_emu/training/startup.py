"""What a training job says when it starts (rank 0): the resolved config file, the layout, the
model plan (parameters and memory per stage) and which kernels run."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_emu.config.io import dump_config
from megatron_emu.config.schema import EmuConfig
from megatron_emu.model.megatron_config import fusion_plan
from megatron_emu.utils import device

log = logging.getLogger("megatron_emu.train")


def summary(cfg: EmuConfig, layout: dict, num_micro: int, dev: torch.device) -> None:
    """Write ``run.dir/config.yaml`` and log the layout, the plan and the kernels."""
    from megatron_emu.planner import format_plan, plan
    from megatron_emu.training.build import plan_spec

    Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run.dir) / "config.yaml").write_text(dump_config(cfg))
    log.info("layout: world %d = TP %d x PP %d x DP %d%s; %d micro-batches of %d per step; device %s",
             torch.distributed.get_world_size(), layout["tp"], layout["pp"], layout["dp"],
             f" (virtual PP {layout['vpp']})" if layout["vpp"] else "", num_micro,
             cfg.train.micro_batch_size, dev)
    log.info("model plan:\n%s", format_plan(plan(plan_spec(cfg, layout["dp"]))))
    model = cfg.model
    attention = ("Transformer Engine fused attention" if model.transformer_impl == "transformer_engine"
                 else {"auto": "torch SDPA", "sdpa": "torch SDPA",
                       "unfused": "megatron-core unfused DotProductAttention"}[model.attention_backend])
    kernels = fusion_plan(model.transformer_impl, device.has_cuda())
    hows = {f.how for f in kernels.values()}
    fused = next(iter(hows)) if len(hows) == 1 else "; ".join(f"{k}: {f.how}" for k, f in kernels.items())
    log.info("kernels: attention: %s; fusions: %s", attention, fused)
