"""Transformer Engine backend (GPU only): same sharded checkpoint keys and the same function as
the local backend for the same weights."""

import pytest
import torch

from tests.helpers import layouts, tiny
from tests.helpers.dist import run_ranks

pytestmark = pytest.mark.gpu


def _keys_and_loss(rank, cfg, weights, microbatches):
    from megatron_emu.parallel.sizes import ParallelSizes
    from megatron_emu.training import build
    from megatron_emu.training.schedule import forward_backward, wrap_ddp

    pgs, chunks = layouts._setup(cfg)
    keys = sorted(k for k, v in layouts._sharded(chunks)["model0"].items()
                  if not k.endswith("_extra_state"))
    layouts._load(chunks, weights)
    dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
    model = wrap_ddp(build.ddp_spec(cfg), chunks, pgs)
    losses = forward_backward(build.step_spec(cfg, ParallelSizes.from_groups(pgs)), model, microbatches,
                              torch.device("cuda"), dtype, forward_only=True)
    return keys, [float(x["loss"]) for x in losses]


@pytest.mark.parametrize("dtype,tolerance", [("float32", {"abs": 1e-3}),  # TF32/cuDNN attention
                                             ("bfloat16", {"rel": 2e-2})])  # bf16 kernels' rounding
def test_te_matches_local(tmp_path, dtype, tolerance):
    pytest.importorskip("transformer_engine")
    from megatron_emu.checkpoint.hf_mapping import Dims, from_hf
    from tests.helpers import reference

    local = tiny.tiny_config(extra=(f"model.params_dtype={dtype}",))
    te = tiny.tiny_config(extra=(f"model.params_dtype={dtype}", "model.transformer_impl=transformer_engine"))
    hf = reference.init_params(tiny.ref_config(local), seed=0)
    weights = str(tmp_path / "w")
    run_ranks(1, layouts.save_reference_weights, local, from_hf(hf, Dims.from_config(local)), weights)
    mbs = tiny.make_microbatches(local, seed=1)
    keys_l, loss_l = run_ranks(1, _keys_and_loss, local, weights, mbs)[0]
    keys_t, loss_t = run_ranks(1, _keys_and_loss, te, weights, mbs)[0]
    assert keys_l == keys_t
    assert loss_l == pytest.approx(loss_t, **tolerance)
