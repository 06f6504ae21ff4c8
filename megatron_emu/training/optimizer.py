"""megatron-core's (distributed) Adam(W) with per-module learning rates, and its LR schedule.

Adam(W) with the paper's betas/eps and decoupled weight decay (no decay on biases and norms),
fp32 main parameters and gradient reduction, the distributed optimizer when configured.
Per-module peak learning rates (``train.module_lr``) become megatron-core parameter-group
overrides; the warmup + cosine schedule (megatron-core's ``OptimizerParamScheduler``) applies
to every group relative to its own peak.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_emu.config.schema import EmuConfig
from megatron_emu.contracts import params


def optimizer_config(cfg: EmuConfig) -> OptimizerConfig:
    tr = cfg.train
    bf16 = cfg.model.params_dtype == "bfloat16"
    return OptimizerConfig(
        optimizer="adam", lr=tr.lr, min_lr=tr.min_lr, weight_decay=tr.weight_decay,
        adam_beta1=tr.adam_beta1, adam_beta2=tr.adam_beta2, adam_eps=tr.adam_eps,
        clip_grad=tr.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        main_params_dtype=torch.float32, main_grads_dtype=torch.float32,
    )


def param_group_overrides(cfg: EmuConfig, config: OptimizerConfig) -> dict:
    """megatron-core's standard overrides (no weight decay on biases and 1-d params) plus one
    learning-rate override per module with a configured rate."""
    from megatron.core.optimizer import get_standard_config_overrides

    overrides = dict(get_standard_config_overrides(config=config) or {})
    ratio = cfg.train.min_lr / cfg.train.lr
    for module in params.LR_GROUPS:
        lr = getattr(cfg.train.module_lr, module)
        if lr is not None:  # names as seen through the DDP wrapper: "module.<name>"
            overrides[ParamKey(name=params.lr_globs(module))] = {"max_lr": lr, "min_lr": lr * ratio}
    return overrides


def build_optimizer(cfg: EmuConfig, model: list, pgs: ProcessGroupCollection):
    """``(optimizer, scheduler)`` for the DDP-wrapped chunks."""
    from megatron_emu.compat import distopt

    distopt.apply()
    config = optimizer_config(cfg)
    optimizer = get_megatron_optimizer(config, model, config_overrides=param_group_overrides(cfg, config),
                                       use_gloo_process_groups=False, pg_collection=pgs)
    iters = cfg.train.train_iters
    warmup = int(round(cfg.train.lr_warmup_fraction * iters))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.train.lr, min_lr=cfg.train.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=iters, lr_decay_style="cosine",
        start_wd=cfg.train.weight_decay, end_wd=cfg.train.weight_decay, wd_incr_steps=iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True)
    return optimizer, scheduler


def current_lrs(optimizer) -> dict[str, float]:
    """Learning rate of the default group and of each module override (for the logs)."""
    out = {}
    for group in optimizer.param_groups:
        name = "lr" if group.get("default_config", True) else f"lr_{group['max_lr']:g}"
        out.setdefault(name, group["lr"])
    return out
