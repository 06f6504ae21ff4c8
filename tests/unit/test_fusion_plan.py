"""Which fused kernels run where: the CPU keeps the exact unfused path; a GPU fuses, and the
local linears inside a Transformer Engine model never ask for apex's wgrad fusion."""

from __future__ import annotations

import dataclasses

from megatron_emu.model.megatron_config import fusion_plan, lm_transformer_config, local_linear_config
from megatron_emu.parallel.sizes import ParallelSizes
from megatron_emu.training.build import model_spec
from tests.helpers.tiny import tiny_config


def test_cpu_plan_is_unfused_and_gpu_plans_fuse():
    assert not any(f.on for f in fusion_plan("local", has_cuda=False).values())
    local, te = fusion_plan("local", has_cuda=True), fusion_plan("transformer_engine", has_cuda=True)
    assert all(local[k].on for k in ("bias_swiglu", "bias_gelu", "bias_dropout_add", "norms"))
    assert not local["rope"].on and not local["grad_accumulation"].on  # need TE / apex
    assert te["rope"].on and te["grad_accumulation"].on
    assert all(f.how for f in [*local.values(), *te.values()])  # every choice is announced


def test_local_linears_never_ask_for_the_apex_wgrad_fusion():
    spec = model_spec(tiny_config(tp=1, pp=1))
    config = dataclasses.replace(lm_transformer_config(spec, ParallelSizes()), gradient_accumulation_fusion=True)
    assert local_linear_config(config).gradient_accumulation_fusion is False
    assert config.gradient_accumulation_fusion is True  # the TE layers keep it
