"""Every parallel layout computes the same function as the single-process reference.

The reference is an independent plain-PyTorch Emu2 (``tests/helpers/reference.py``) holding
the same weights. For each layout, the CE loss and the regression loss of every micro-batch and
the gradient of every parameter (reduced over DP, gathered over TP/PP through
``dist_checkpointing``) must match it in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_emu.checkpoint.hf_mapping import Dims, from_hf, to_hf
from tests.helpers import layouts, reference, tiny
from tests.helpers.dist import run_ranks

pytestmark = pytest.mark.distributed

LOSS_TOL = 1e-5  # absolute, on losses of ~10
GRAD_TOL = 1e-5  # relative to the largest reference gradient of the tensor


def _setup(tmp_path_factory, model_extra=()):
    cfg = tiny.tiny_config(extra=model_extra)
    rc = tiny.ref_config(cfg)
    hf = reference.init_params(rc, seed=0)
    microbatches = tiny.make_microbatches(cfg, seed=1)
    params = {k: v.clone().requires_grad_(True) for k, v in hf.items()}
    ref_losses, total = [], 0.0
    for mb in microbatches:
        out = reference.emu2_loss(params, rc, mb.tokens, mb.images,
                                  image_token_id=reference.IMAGE_ID, ce_ignore_ids=reference.CE_IGNORE_IDS,
                                  lm_weight=1.0, reg_weight=1.0)
        ref_losses.append({k: float(v.detach()) for k, v in out.items()})
        total = total + out["loss"] / len(microbatches)
    total.backward()
    ref_grads = {k: p.grad for k, p in params.items()}
    weights = str(tmp_path_factory.mktemp("weights") / "ckpt")
    run_ranks(1, layouts.save_reference_weights, cfg, from_hf(hf, Dims.from_config(cfg)), weights)
    return {"cfg": cfg, "mbs": microbatches, "ref_losses": ref_losses, "ref_grads": ref_grads,
            "weights": weights, "tmp": tmp_path_factory, "model_extra": model_extra}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _setup(tmp_path_factory)


# Grouped-query attention: 4 query heads share 2 key/value heads (1 per rank at TP2).
GQA = ("model.lm.num_query_groups=2",)


@pytest.fixture(scope="module")
def setup_gqa(tmp_path_factory):
    return _setup(tmp_path_factory, GQA)


LAYOUTS = {
    # id: (tp, pp, dp, sp, vpp, extra overrides)
    "tp1pp1dp1": (1, 1, 1, False, None, ()),
    "tp2pp1dp1_sp": (2, 1, 1, True, None, ()),
    "tp1pp2dp1": (1, 2, 1, False, None, ()),
    "tp2pp2dp1_sp": (2, 2, 1, True, None, ()),
    "tp1pp1dp2_distopt": (1, 1, 2, False, None, ()),
    "tp1pp2dp1_vpp2": (1, 2, 1, False, 2, ()),
    "tp2pp2dp1_sp_vpp2": (2, 2, 1, True, 2, ()),
    "tp2pp2dp1_sp_frozen_vit": (2, 2, 1, True, None, ("train.freeze=['vision.*']",)),
    "tp2pp2dp1_sp_full_recompute": (2, 2, 1, True, None, ("train.recompute_granularity=full",)),
    "tp2pp1dp1_sp_selective_recompute": (2, 1, 1, True, None, ("train.recompute_granularity=selective",)),
}


def _compare(setup, name):
    tp, pp, dp, sp, vpp, extra = LAYOUTS[name]
    extra = (*setup["model_extra"], *extra)
    cfg = tiny.tiny_config(tp=tp, pp=pp, vpp=vpp, sp=sp, extra=extra)
    grads_dir = str(setup["tmp"].mktemp(name) / "grads")
    results = run_ranks(tp * pp * dp, layouts.run_layout, cfg, setup["weights"], setup["mbs"], grads_dir)

    # Losses: last-stage ranks report their DP rank's micro-batches (mbs[dp_rank::dp]).
    n = len(setup["mbs"])
    seen = {}
    for r in results:
        for j, mb in enumerate(r["losses"]):
            seen.setdefault(r["dp_rank"] + j * dp, mb)
    assert sorted(seen) == list(range(n)), f"missing micro-batch losses: {sorted(seen)}"
    for i in range(n):
        for key in ("lm_loss", "reg_loss", "loss"):
            assert math.isclose(seen[i][key], setup["ref_losses"][i][key], abs_tol=LOSS_TOL), (
                f"{name} micro-batch {i} {key}: {seen[i][key]} vs reference {setup['ref_losses'][i][key]}")

    # Gradients of every parameter, unsharded through dist_checkpointing.
    unsharded_cfg = tiny.tiny_config(extra=setup["model_extra"])
    canonical = run_ranks(1, layouts.load_unsharded, unsharded_cfg, grads_dir)[0]
    grads = to_hf(canonical, Dims.from_config(cfg))
    frozen = {f for r in results for f in r["frozen"]}
    assert set(grads) == set(setup["ref_grads"])
    for key, ref in setup["ref_grads"].items():
        got = grads[key]
        if key.startswith("model.visual.") and "vision.*" in str(extra):
            assert torch.isnan(got).all(), f"{key} should be frozen"
            continue
        err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        assert err < GRAD_TOL, f"{name}: gradient of {key} differs (relative error {err:.2e})"
    return frozen


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_reference(setup, name):
    frozen = _compare(setup, name)
    if "frozen_vit" in name:
        assert frozen and all(f.startswith("vision.") for f in frozen)
    else:
        assert not frozen


@pytest.mark.parametrize("name", ["tp1pp1dp1", "tp2pp2dp1_sp"])
def test_grouped_query_attention_layout_matches_reference(setup_gqa, name):
    assert setup_gqa["cfg"].model.lm.num_query_groups == 2 < setup_gqa["cfg"].model.lm.num_attention_heads
    assert not _compare(setup_gqa, name)
