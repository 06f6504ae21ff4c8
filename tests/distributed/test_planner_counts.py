"""The dry-run planner's parameter counts equal those of the model megatron-core builds."""

import pytest

from megatron_emu.planner import plan
from megatron_emu.training.build import plan_spec
from tests.helpers import tiny
from tests.helpers.dist import run_ranks

pytestmark = pytest.mark.distributed


def _count(rank, cfg):
    import torch

    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.training import build

    init_distributed()
    pgs = build.process_groups(cfg)
    chunks = build.model_chunks(cfg, pgs)
    return torch.distributed.get_rank(pgs.pp), sum(p.numel() for c in chunks for p in c.parameters())


@pytest.mark.parametrize("tp,pp,extra", [
    (1, 1, ()),
    (2, 2, ()),
    (1, 2, ("parallel.num_layers_in_first_pipeline_stage=1",)),
])
def test_planner_counts_match_built_model(tp, pp, extra):
    cfg = tiny.tiny_config(tp=tp, pp=pp, extra=extra)
    expected = plan(plan_spec(cfg))["params_per_gpu"]
    for stage, n in run_ranks(tp * pp, _count, cfg):
        assert n == expected[stage], f"stage {stage}: built {n}, planned {expected[stage]}"
