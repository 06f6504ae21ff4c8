"""The parameter namespace (``contracts/params.py``) is the model's: every parameter of every
stage belongs to exactly one family, each family's example names exist, and the per-module
learning-rate globs select exactly their family's parameters through the DDP wrapper."""

import fnmatch

import pytest

from megatron_emu.contracts import params
from tests.helpers import tiny
from tests.helpers.dist import run_ranks

pytestmark = pytest.mark.distributed


def _names(rank, cfg):
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.training import build

    init_distributed()
    pgs = build.process_groups(cfg)
    return [n for c in build.model_chunks(cfg, pgs, meta=True) for n, _ in c.named_parameters()]


def test_every_parameter_has_one_family_and_lr_globs_select_it():
    names = [n for rank in run_ranks(4, _names, tiny.tiny_config(tp=2, pp=2, sp=True)) for n in rank]
    assert names
    for name in names:
        owners = [f for f in params.FAMILIES if name.startswith(f.prefix)]
        assert len(owners) == 1, f"{name}: families {[f.name for f in owners]}"
        family = owners[0]
        for group in params.LR_GROUPS:
            selected = any(fnmatch.fnmatchcase(f"module.{name}", g) for g in params.lr_globs(group))
            assert selected == (family.lr_group == group), (name, group)
    for example in params.EXAMPLE_NAMES:
        assert example in names, f"{example} is no parameter of the model"
