"""Validation: held-out losses that do not depend on the layout or on a resume, and that leave
training exactly as it is without them; a held-out fraction splits documents for good."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from megatron_emu.data.plan import BlendedPlan, PackingSpec
from tests.helpers.training import metrics, tiny_args, train

VALID_KEYS = ("valid_loss", "valid_lm_loss", "valid_reg_loss", "valid_ppl")


def _run(data, tok, root, *sets, world=4, tp=2, pp=2):
    args = tiny_args(data, tok, root / "run", root / "ckpt", *sets, tp=tp, pp=pp)
    assert train(world, args) == [0] * world
    rows = metrics(root / "run")
    return [r for r in rows if "loss" in r], [r for r in rows if "valid_loss" in r]


@pytest.fixture(scope="module")
def runs(train_data, datasets, tmp_path_factory):
    data, tok = train_data
    valid = (f"data.valid_path=['{datasets['mmc4'][0]}']", "train.eval_interval=3", "train.eval_iters=2")
    root = tmp_path_factory.mktemp("valid")
    out = {"plain": _run(data, tok, root / "plain"), "valid": _run(data, tok, root / "valid", *valid)}
    halves = root / "halves"
    _run(data, tok, halves, *valid, "train.exit_interval=3")
    # The same weights on another layout: the TP2 PP2 checkpoint of step 3, resumed at TP1 PP1.
    shutil.copytree(halves / "ckpt", root / "tp1" / "ckpt")
    out["tp1"] = _run(data, tok, root / "tp1", *valid, world=1, tp=1, pp=1)
    out["resumed"] = _run(data, tok, halves, *valid, "train.exit_interval=3")
    return out


def test_validation_does_not_change_training(runs):
    plain, _ = runs["plain"]
    train_rows, valid_rows = runs["valid"]
    keys = ("loss", "lm_loss", "reg_loss", "grad_norm")
    assert [[r[k] for k in keys] for r in train_rows] == [[r[k] for k in keys] for r in plain]
    assert [r["step"] for r in valid_rows] == [3, 6]
    for r in valid_rows:
        assert all(math.isfinite(r[k]) for k in VALID_KEYS)
        assert r["valid_ppl"] == pytest.approx(math.exp(r["valid_lm_loss"]))
        assert r["valid_loss"] == pytest.approx(r["valid_lm_loss"] + r["valid_reg_loss"])


def test_validation_losses_agree_across_layouts(runs):
    """Step 6 after the same steps 1-3 (one checkpoint) and steps 4-6 at TP2 PP2 or TP1 PP1."""
    _, tp2pp2 = runs["valid"]
    _, tp1 = runs["tp1"]
    assert [r["step"] for r in tp1] == [6]
    for k in VALID_KEYS[:3]:
        assert tp1[0][k] == pytest.approx(tp2pp2[1][k], rel=1e-5), k


def test_validation_is_unchanged_by_a_resume(runs):
    _, straight = runs["valid"]
    train_rows, resumed = runs["resumed"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [[r[k] for k in VALID_KEYS] for r in resumed] == [[r[k] for k in VALID_KEYS] for r in straight]


def _docs(split: str, fraction: float, seed: int, n: int = 500) -> set[int]:
    index = np.zeros((n, 6), dtype=np.int64)
    index[:, :] = 1  # every document: one short text segment, no image
    spec = PackingSpec(seq_length=8, tokens_per_image=6, max_images=4, lookahead=1, seed=seed,
                       split=split, valid_fraction=fraction)
    plan = BlendedPlan([index], [1.0], spec, {}, salts=[12345])
    seen: set[int] = set()
    while plan.streams[0].epoch == 0:
        _, items = plan.next()
        seen.update(doc for epoch, doc in items if epoch == 0)
    return seen


def test_held_out_fraction_splits_documents_for_good():
    train_docs, valid_docs = _docs("train", 0.2, seed=1), _docs("valid", 0.2, seed=1)
    assert not train_docs & valid_docs and train_docs | valid_docs == set(range(500))
    assert 0.1 < len(valid_docs) / 500 < 0.3
    assert _docs("valid", 0.2, seed=99) == valid_docs  # the split does not follow the seed
    with pytest.raises(ValueError, match="no document falls in the 'valid' side"):
        _docs("valid", 1e-9, seed=1, n=5)
