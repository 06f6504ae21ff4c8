"""Per-module learning rates, weight-decay groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

from tests.helpers.dist import run_ranks
from tests.helpers.tiny import tiny_config


def _groups(rank: int, sets: tuple) -> dict:
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.training import build
    from megatron_emu.training.optimizer import build_optimizer
    from megatron_emu.training.schedule import wrap_ddp

    cfg = tiny_config(extra=sets)
    init_distributed()
    pgs = build.process_groups(cfg)
    model = wrap_ddp(build.ddp_spec(cfg), build.model_chunks(cfg, pgs), pgs)
    optimizer, scheduler = build_optimizer(build.optimizer_spec(cfg), model, pgs)
    names = {p: n for m in model for n, p in m.named_parameters()}
    # fp32 without the distributed optimizer: the groups hold the model parameters themselves.
    out = {names[p]: (g["max_lr"], g["min_lr"], g["wd_mult"])
           for g in optimizer.param_groups for p in g["params"] if p in names}
    lrs = []
    for _ in range(cfg.train.train_iters):
        scheduler.step(1)
        lrs.append(optimizer.param_groups[0]["lr"])
    return {"groups": out, "lrs": lrs, "iters": cfg.train.train_iters}


def test_module_learning_rates_and_schedule():
    sets = ("train.module_lr.vision=5e-5", "train.module_lr.adapter=1e-4", "train.module_lr.lm=3e-5",
            "train.lr=3e-5", "train.min_lr=3e-6", "train.train_iters=10", "train.lr_warmup_fraction=0.2",
            "parallel.use_distributed_optimizer=false")
    (res,) = run_ranks(1, _groups, sets)
    groups = res["groups"]
    assert groups, "no parameter mapped to a group"
    for name, (max_lr, min_lr, wd_mult) in groups.items():
        if ".vision." in f".{name}":
            assert max_lr == 5e-5 and math.isclose(min_lr, 5e-6)
        elif ".adapter." in f".{name}":
            assert max_lr == 1e-4 and math.isclose(min_lr, 1e-5)
        elif "project_down" in name:
            assert max_lr == 3e-5  # not configured: train.lr
        else:
            assert max_lr == 3e-5, name
        assert wd_mult == (0.0 if name.endswith("bias") or "norm" in name else 1.0), name
    lrs = res["lrs"]
    assert lrs[0] == 3e-5 / 2 and lrs[1] == 3e-5  # 2 warmup updates, starting above zero
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and math.isclose(lrs[-1], 3e-6)
