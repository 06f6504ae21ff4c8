"""megatron-core's (distributed) Adam(W) with per-module learning rates, and its LR schedule.

Adam(W) with the paper's betas/eps and decoupled weight decay (no decay on biases and norms),
fp32 main parameters and gradient reduction, the distributed optimizer when configured.
Per-module peak learning rates (``train.module_lr``) become megatron-core parameter-group
overrides; the warmup + cosine schedule (megatron-core's ``OptimizerParamScheduler``) applies
to every group relative to its own peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_emu.contracts import params


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """Adam(W) and its schedule: peak ``lr`` decaying to ``min_lr`` (cosine over
    ``train_iters`` after ``warmup_fraction`` of them), per-module peaks (``module_lr``, keys of
    ``contracts.params.LR_GROUPS``; None or absent: ``lr``), decoupled weight decay, clipping."""

    lr: float
    min_lr: float = 0.0
    train_iters: int
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    use_distributed_optimizer: bool = True
    module_lr: dict[str, float | None] = field(default_factory=dict)


def optimizer_config(spec: OptimizerSpec) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam", lr=spec.lr, min_lr=spec.min_lr, weight_decay=spec.weight_decay,
        adam_beta1=spec.adam_beta1, adam_beta2=spec.adam_beta2, adam_eps=spec.adam_eps,
        clip_grad=spec.clip_grad, bf16=spec.bf16, params_dtype=torch.bfloat16 if spec.bf16 else torch.float32,
        use_distributed_optimizer=spec.use_distributed_optimizer,
        main_params_dtype=torch.float32, main_grads_dtype=torch.float32,
    )


def _module_lrs(spec: OptimizerSpec) -> dict[str, float]:
    """The configured per-module peak learning rates, in ``LR_GROUPS`` order."""
    return {m: spec.module_lr[m] for m in params.LR_GROUPS if spec.module_lr.get(m) is not None}


def param_group_overrides(spec: OptimizerSpec, config: OptimizerConfig) -> dict:
    """megatron-core's standard overrides (no weight decay on biases and 1-d params) plus one
    learning-rate override per module with a configured rate."""
    from megatron.core.optimizer import get_standard_config_overrides

    overrides = dict(get_standard_config_overrides(config=config) or {})
    ratio = spec.min_lr / spec.lr
    for module, lr in _module_lrs(spec).items():  # names as seen through the DDP wrapper: "module.<name>"
        overrides[ParamKey(name=params.lr_globs(module))] = {"max_lr": lr, "min_lr": lr * ratio}
    return overrides


def build_optimizer(spec: OptimizerSpec, model: list, pgs: ProcessGroupCollection):
    """``(optimizer, scheduler)`` for the DDP-wrapped chunks."""
    from megatron_emu.compat import distopt

    distopt.apply()
    config = optimizer_config(spec)
    optimizer = get_megatron_optimizer(config, model, config_overrides=param_group_overrides(spec, config),
                                       use_gloo_process_groups=False, pg_collection=pgs)
    iters = spec.train_iters
    warmup = int(round(spec.warmup_fraction * iters))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=spec.lr, min_lr=spec.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=iters, lr_decay_style="cosine",
        start_wd=spec.weight_decay, end_wd=spec.weight_decay, wd_incr_steps=iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True)
    return optimizer, scheduler


def module_lrs(optimizer, spec: OptimizerSpec) -> dict[str, float]:
    """The current learning rate of each module with its own peak (``lr_<module>``, for the logs):
    the LR of the parameter groups megatron-core made for that peak."""
    out = {}
    ratio = spec.min_lr / spec.lr
    for module, peak in _module_lrs(spec).items():
        for group in optimizer.param_groups:
            if not group.get("default_config", True) and group["max_lr"] == peak \
                    and group["min_lr"] == peak * ratio:
                out[f"lr_{module}"] = group["lr"]
                break
    return out
