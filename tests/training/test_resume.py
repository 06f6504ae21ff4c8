"""Resume is exact (same layout) and continues under another layout; checkpoints are atomic."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers.training import metrics, tiny_args, train

KEYS = ("loss", "lm_loss", "reg_loss", "grad_norm", "lr", "consumed_samples")


@pytest.fixture(scope="module")
def straight(train_data, tmp_path_factory):
    """6 steps at TP2 PP2 without interruption."""
    data, tok = train_data
    root = tmp_path_factory.mktemp("straight")
    assert train(4, tiny_args(data, tok, root / "run", root / "ckpt")) == [0] * 4
    return metrics(root / "run")


@pytest.fixture(scope="module")
def halves(train_data, tmp_path_factory):
    """3 steps, save and exit (train.exit_interval), then the same command again."""
    data, tok = train_data
    root = tmp_path_factory.mktemp("halves")
    args = tiny_args(data, tok, root / "run", root / "ckpt", "train.exit_interval=3")
    assert train(4, args) == [0] * 4
    assert (root / "ckpt" / "latest").read_text().strip() == "iter_0000003"
    snapshot = root / "ckpt_at_3"
    shutil.copytree(root / "ckpt", snapshot)
    assert train(4, args) == [0] * 4
    return root, metrics(root / "run"), snapshot


def test_straight_run_learns_and_writes_metrics(straight):
    assert [m["step"] for m in straight] == [1, 2, 3, 4, 5, 6]
    assert straight[-1]["loss"] < straight[0]["loss"]
    for m in straight:
        for key in ("loss", "lm_loss", "reg_loss", "grad_norm", "lr", "consumed_samples", "tokens_per_s",
                    "images_per_s", "tflops_per_gpu", "mfu", "skipped"):
            assert key in m
        assert m["mfu"] is None and m["skipped"] is False and m["images_per_s"] > 0
    assert straight[-1]["consumed_samples"] == 6 * 8


def test_resume_is_exact(straight, halves):
    _, resumed, _ = halves
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, (a["step"], a, b)


def test_resume_under_another_layout(straight, halves, train_data, tmp_path):
    """The TP2 PP2 checkpoint of step 3 continues at TP1 PP1 DP2 (model, optimizer, schedule
    and data position resharded); losses match the uninterrupted TP2 PP2 run."""
    _, _, snapshot = halves
    data, tok = train_data
    ckpt = tmp_path / "ckpt"
    shutil.copytree(snapshot, ckpt)
    assert train(2, tiny_args(data, tok, tmp_path / "run", ckpt, tp=1, pp=1)) == [0] * 2
    after = metrics(tmp_path / "run")
    assert [m["step"] for m in after] == [4, 5, 6]
    for a, b in zip(straight[3:], after):
        assert a["consumed_samples"] == b["consumed_samples"] and a["lr"] == pytest.approx(b["lr"])
        for k in ("loss", "lm_loss", "reg_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a["step"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_kill_during_save_keeps_the_previous_checkpoint(straight, train_data, tmp_path):
    """SIGKILL while iteration 4 is being written: `latest` stays on 2; the rerun cleans up,
    resumes from 2 and ends where the uninterrupted run ends."""
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "checkpoint.save_interval=2")
    os.environ["MEGATRON_EMU_KILL_DURING_SAVE"] = "4"
    try:
        with pytest.raises(RuntimeError, match="did not all finish"):
            train(4, args, timeout=120)
    finally:
        del os.environ["MEGATRON_EMU_KILL_DURING_SAVE"]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    assert (ckpt / "iter_0000004.tmp").is_dir() and not (ckpt / "iter_0000004").exists()
    assert train(4, args) == [0] * 4
    assert not (ckpt / "iter_0000004.tmp").exists()
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    final = [m for m in metrics(tmp_path / "run") if m["step"] == 6][-1]
    assert final["loss"] == straight[-1]["loss"]


def test_keep_last_prunes_old_checkpoints(halves, train_data, tmp_path):
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "checkpoint.save_interval=1",
                     "checkpoint.keep_last=2", "train.train_iters=4")
    assert train(4, args) == [0] * 4
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["iter_0000003", "iter_0000004", "latest"]
