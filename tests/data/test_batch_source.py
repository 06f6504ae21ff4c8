"""Data read once per tensor-parallel group: the peers' micro-batches are bit-identical to what
their own loader would give, with only the fields their pipeline stage uses."""

from __future__ import annotations

import pytest
import torch

from megatron_emu.contracts.batch import FIRST_STAGE_FIELDS, LAST_STAGE_FIELDS
from tests.data.test_loader import spec_for
from tests.helpers.dist import run_ranks

IGNORE = (32000, 32001, 32002, 32003)


def _batches(rank: int, spec, first: bool, last: bool, n: int) -> list:
    import torch.distributed as dist

    from megatron_emu.data.batch_source import BatchSource, cpu_tp_groups, stage_fields
    from megatron_emu.data.loader import EmuDataLoader
    from megatron_emu.parallel.groups import init_distributed

    init_distributed()
    group = cpu_tp_groups(dist.new_group([0, 1]))
    loader = EmuDataLoader(spec) if rank == 0 else None
    source = BatchSource(loader, IGNORE, stage_fields(first, last), cpu_group=group, src=0)
    return [None if b is None else b.tensors() for b in (next(source) for _ in range(n))]


@pytest.mark.parametrize("first,last", [(True, True), (True, False), (False, True), (False, False)])
def test_peers_receive_exactly_the_stage_fields(datasets, first, last):
    spec = spec_for(datasets, "mmc4", "laion", num_workers=1)
    ranks = run_ranks(2, _batches, spec, first, last, 3)
    from megatron_emu.data.loader import EmuDataLoader

    own = EmuDataLoader(spec)
    wanted = (FIRST_STAGE_FIELDS if first else ()) + (LAST_STAGE_FIELDS if last else ())
    for step in range(3):
        expected = next(own).to_batch(IGNORE).tensors()
        for rank in ranks:
            got = rank[step]
            if not wanted:
                assert got is None
                continue
            assert {k for k, v in got.items() if v is not None} == set(wanted)
            for k in wanted:
                assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    assert any(r[0] is not None and r[0]["images"] is not None and r[0]["images"].shape[0] > 0
               for r in ranks) or not first
