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


def _host_masks(mb) -> tuple:
    """The data layer's (CE, regression) positions of a micro-batch, as the reference takes them."""
    b, s = mb.tokens.shape
    reg = torch.zeros(s, b, dtype=torch.bool)
    reg.view(-1)[mb.reg_rows] = True  # row t * b + i
    assert not mb.ce_mask[:, -1].any() and not reg[-1].any()
    return mb.ce_mask[:, :-1] > 0, reg.t()[:, :-1]


def _setup(tmp_path_factory, model_extra=(), video_frames=0, regress_video=False, tuning=None):
    cfg = tiny.tiny_config(extra=model_extra)
    rc = tiny.ref_config(cfg)
    hf = reference.init_params(rc, seed=0)
    microbatches = tiny.make_microbatches(cfg, seed=1, video_frames=video_frames, regress_video=regress_video) \
        if tuning is None else tiny.make_tuning_microbatches(cfg, tuning, seed=1)
    params = {k: v.clone().requires_grad_(True) for k, v in hf.items()}
    ref_losses, total = [], 0.0
    # Video (emu2_spec.md §1.7): frames fill the [gIMG] slots (32004); [gIMG] and [VIDEO] (32007)
    # labels are not CE targets; frame embeddings are regressed only when asked.
    video = {"slot_ids": (32004,), "reg_ids": (32004,) if regress_video else (),
             "ce_ignore_ids": (*reference.CE_IGNORE_IDS, 32004, 32007)} if video_frames else \
        {"ce_ignore_ids": reference.CE_IGNORE_IDS}
    for mb in microbatches:
        masks = None if tuning is None else _host_masks(mb)
        out = reference.emu2_loss(params, rc, mb.tokens, mb.images, image_token_id=reference.IMAGE_ID,
                                  lm_weight=1.0, reg_weight=1.0, masks=masks, **video)
        ref_losses.append({k: float(v.detach()) for k, v in out.items()})
        total = total + out["loss"] / len(microbatches)
    total.backward()
    ref_grads = {k: p.grad for k, p in params.items()}
    weights = str(tmp_path_factory.mktemp("weights") / "ckpt")
    run_ranks(1, layouts.save_reference_weights, cfg, from_hf(hf, Dims.from_config(cfg)), weights)
    return {"cfg": cfg, "mbs": microbatches, "ref_losses": ref_losses, "ref_grads": ref_grads,
            "weights": weights, "tmp": tmp_path_factory, "model_extra": model_extra, "hf": hf}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _setup(tmp_path_factory)


@pytest.fixture(scope="module", params=[False, True], ids=["frames_not_regressed", "frames_regressed"])
def setup_video(request, tmp_path_factory):
    """Every micro-batch's first sample starts with a 2-frame video, beside images."""
    return _setup(tmp_path_factory, video_frames=2, regress_video=request.param)


@pytest.fixture(scope="module", params=["none", "last_image"], ids=["chat_no_regression", "gen_last_image"])
def setup_tuning(request, tmp_path_factory):
    """Chat conversations (answers only; [USER] / [ASSISTANT], vocabulary 32274) packed with
    editing samples, regressing nothing (Emu2-Chat) or each sample's last image (Emu2-Gen)."""
    return _setup(tmp_path_factory, ("model.lm.vocab_size=32274", "model.model_version=chat"), tuning=request.param)


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
    # megatron-core's unfused attention against the same reference as the default (torch SDPA)
    "tp1pp1dp1_unfused_attention": (1, 1, 1, False, None, ("model.attention_backend=unfused",)),
    "tp2pp2dp1_sp_unfused_attention": (2, 2, 1, True, None, ("model.attention_backend=unfused",)),
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


@pytest.mark.parametrize("name", ["tp1pp1dp1", "tp2pp2dp1_sp"])
def test_video_layout_matches_reference(setup_video, name):
    """Frames through the ViT into the [gIMG] slots, and their regression targets carried
    through the pipeline, give the reference's losses and gradients on every layout."""
    assert any((mb.tokens == 32007).any() for mb in setup_video["mbs"])
    assert not _compare(setup_video, name)


@pytest.mark.parametrize("name", ["tp1pp1dp1", "tp2pp2dp1_sp"])
def test_tuning_layout_matches_reference(setup_tuning, name):
    """Answer-only cross-entropy and last-image (or no) regression, built on the host, give the
    reference's losses and gradients on every layout."""
    mbs = setup_tuning["mbs"]
    assert all(((mb.tokens == 32272).any() and (mb.tokens == 32273).any()) for mb in mbs)
    images = sum(int((mb.tokens == 32001).sum()) for mb in mbs)
    n_query = setup_tuning["cfg"].model.adapter.n_query
    regressed = sum(mb.reg_rows.numel() for mb in mbs)
    # last_image: each conversation's image and each edit's target, not the edit's source
    assert regressed == (0 if setup_tuning["ref_losses"][0]["reg_loss"] == 0 else images // 3 * 2 * n_query)
    assert sum(float(mb.ce_mask.sum()) for mb in mbs) < sum(float((mb.tokens != 32000).sum()) for mb in mbs) / 2
    assert not _compare(setup_tuning, name)


# One clipped update. clip_grad 0.1 is far below the tiny model's gradient norm (~5.8), so every
# update is scaled by 0.1 / norm. Adam's first update is lr * g / (|g| + eps) per element: with
# eps (1.0) far above every clipped |g| (< 1e-2) it is ~ lr * g / eps, linear in the clipping
# coefficient, so a norm taken over the wrong ranks changes every parameter's update. lr 100
# lifts the smallest updates well above the fp32 rounding of the parameters.
CLIP = ("train.clip_grad=0.1", "train.adam_eps=1.0", "train.lr=100.0", "train.min_lr=0.0",
        "train.lr_warmup_fraction=0.0", "train.weight_decay=0.0")
CLIP_LAYOUTS = {
    # id: (tp, pp, dp, sp, distributed optimizer)
    "tp1pp1dp1": (1, 1, 1, False, False),
    "tp2pp2dp1_sp": (2, 2, 1, True, False),
    "tp2pp2dp1_sp_distopt": (2, 2, 1, True, True),
    "tp1pp1dp2": (1, 1, 2, False, False),
    "tp1pp1dp2_distopt": (1, 1, 2, False, True),
}
UPDATE_TOL = 1e-3  # relative to the tensor's largest reference update (observed <= 7e-5)


@pytest.mark.parametrize("name", list(CLIP_LAYOUTS))
def test_clipped_update_matches_reference(setup, name):
    """Gradient norm (reduced over TP, PP and DP, or the distributed optimizer's shards),
    clipping and the Adam step give the single-process reference's update."""
    tp, pp, dp, sp, distopt = CLIP_LAYOUTS[name]
    cfg = tiny.tiny_config(tp=tp, pp=pp, sp=sp, distopt=distopt, extra=CLIP)
    out = str(setup["tmp"].mktemp(f"clip_{name}") / "params")
    results = run_ranks(tp * pp * dp, layouts.run_clipped_step, cfg, setup["weights"], setup["mbs"], out)

    # Reference: torch's clip_grad_norm_ over all gradients, then torch's Adam.
    before = setup["hf"]
    params = {k: v.clone().requires_grad_(True) for k, v in before.items()}
    for k, p in params.items():
        p.grad = setup["ref_grads"][k].clone()
    norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.train.clip_grad))
    assert norm > 10 * cfg.train.clip_grad, "the test must clip"
    tr = cfg.train
    lr = results[0]["lr"]  # update 1 of the cosine schedule without warmup
    assert math.isclose(lr, tr.lr * 0.5 * (1 + math.cos(math.pi / tr.train_iters)), rel_tol=1e-12)
    torch.optim.Adam(list(params.values()), lr=lr, betas=(tr.adam_beta1, tr.adam_beta2),
                     eps=tr.adam_eps).step()
    for r in results:
        assert r["lr"] == lr
        assert math.isclose(r["grad_norm"], norm, rel_tol=1e-5), f"{name}: grad norm {r['grad_norm']} vs {norm}"

    canonical = run_ranks(1, layouts.load_unsharded, tiny.tiny_config(), out)[0]
    after = to_hf(canonical, Dims.from_config(cfg))
    for key, p in params.items():
        want, got = p.detach() - before[key], after[key] - before[key]
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
        assert err < UPDATE_TOL, f"{name}: update of {key} differs (relative error {err:.2e})"
