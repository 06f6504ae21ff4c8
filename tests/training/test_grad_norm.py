"""The device-side gradient norm and clipping equal megatron-core's (which syncs with the host
once per parameter tensor without apex / Transformer Engine), at layouts where the norm is
reduced over TP, PP and DP (distributed optimizer) or over the model-parallel group."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_ranks
from tests.helpers.tiny import make_microbatches, tiny_config


def _norms(rank: int, tp: int, pp: int, distopt: bool) -> dict:
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.parallel.sizes import ParallelSizes
    from megatron_emu.training import build
    from megatron_emu.training.grad_norm import clip_grads_, global_grad_norm
    from megatron_emu.training.optimizer import build_optimizer
    from megatron_emu.training.schedule import forward_backward, wrap_ddp

    cfg = tiny_config(tp=tp, pp=pp, sp=tp > 1, distopt=distopt)
    init_distributed()
    pgs = build.process_groups(cfg)
    model = wrap_ddp(build.ddp_spec(cfg), build.model_chunks(cfg, pgs), pgs)
    optimizer, _ = build_optimizer(build.optimizer_spec(cfg), model, pgs)
    dp = torch.distributed.get_world_size(pgs.dp)
    dp_rank = torch.distributed.get_rank(pgs.dp)
    step = build.step_spec(cfg, ParallelSizes.from_groups(pgs))
    forward_backward(step, model, make_microbatches(cfg)[dp_rank::dp], torch.device("cpu"), torch.float32)
    optimizer.prepare_grads()
    ours = global_grad_norm(optimizer, torch.device("cpu"))
    theirs = float(optimizer.get_grad_norm())
    grads = [p.grad for p in optimizer.get_parameters() if p.grad is not None]
    before = [g.clone() for g in grads]
    max_norm = 0.25 * theirs
    clip_grads_(optimizer, max_norm, ours)
    clipped_ours = [g.clone() for g in grads]
    for g, b in zip(grads, before):
        g.copy_(b)
    optimizer.clip_grad_norm(max_norm)  # megatron-core's: recomputes the norm, then scales
    err = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
              for a, b in zip(clipped_ours, grads))
    for g, b in zip(grads, before):  # no clipping when under the limit: bit-identical
        g.copy_(b)
    clip_grads_(optimizer, 10 * theirs, ours)
    unchanged = all(torch.equal(g, b) for g, b in zip(grads, before))
    return {"ours": float(ours), "theirs": theirs, "clip_err": err, "unchanged": unchanged,
            "scaled": any(not torch.equal(a, b) for a, b in zip(clipped_ours, before))}


@pytest.mark.parametrize("tp,pp,world,distopt", [(1, 1, 1, True), (2, 2, 4, True), (1, 1, 2, True),
                                                 (2, 1, 2, False)])
def test_grad_norm_and_clipping_match_megatron_core(tp, pp, world, distopt):
    for r in run_ranks(world, _norms, tp, pp, distopt):
        assert r["ours"] == pytest.approx(r["theirs"], rel=1e-6)
        assert r["scaled"] and r["clip_err"] < 1e-6
        assert r["unchanged"]
