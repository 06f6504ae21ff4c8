"""The dry-run planner's optimizer-state memory: Adam's fp32 master weights and two moments
(12 bytes per trainable parameter) are sharded over data parallelism by the distributed
optimizer, and only by it. Pure arithmetic on the config: no process group."""

from __future__ import annotations

import pytest

from megatron_emu.planner import GIB, plan
from megatron_emu.training.build import plan_spec
from tests.helpers.tiny import tiny_config

# Trainable parameters per GPU of the tiny preset (counts checked against the built model by
# tests/distributed/test_planner_counts.py). TP1 PP1, nothing frozen: vision 105,792 + adapter
# 4,096 + embedding 32,384 x 64 + final norm 64 + LM head 32,384 x 64 + regression head 4,096
# + 4 LM layers x 41,088 = 4,423,552.
TP1_ALL = [4_423_552]
# TP2 PP2 with the ViT frozen: stage 0 holds 1,152,256 parameters per GPU of which the ViT's
# 72,704 (its TP-sharded part halved) carry no optimizer state; stage 1 holds 1,079,616.
TP2PP2_FROZEN_VIT = [1_152_256 - 72_704, 1_079_616]


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("distopt", [True, False], ids=["distopt", "plain"])
def test_optimizer_memory_is_divided_by_dp_only_with_the_distributed_optimizer(dp, distopt):
    cases = [
        (tiny_config(tp=1, pp=1, distopt=distopt), TP1_ALL),
        (tiny_config(tp=2, pp=2, distopt=distopt, extra=("train.freeze=['vision.*']",)), TP2PP2_FROZEN_VIT),
    ]
    for cfg, trainable in cases:
        report = plan(plan_spec(cfg, data_parallel_size=dp))
        assert report["layout"]["dp"] == dp
        for stage, n in enumerate(trainable):
            expected = 12 * n / (dp if distopt else 1)  # bytes on one GPU of the stage
            got = report["memory_per_stage"][stage]["optimizer"] * GIB
            assert got == expected, (f"stage {stage}, DP {dp}, distributed optimizer {distopt}: "
                                     f"planned {got:,.0f} optimizer bytes, expected {expected:,.0f}")


def test_dp_from_the_config_counts_like_the_world_size():
    """``parallel.data_parallel_size`` in the config is used when the world size is not given."""
    cfg = tiny_config(tp=1, pp=1, extra=("parallel.data_parallel_size=4",))
    assert plan(plan_spec(cfg))["memory_per_stage"][0]["optimizer"] * GIB == 12 * TP1_ALL[0] / 4
