"""Training on real video shards (WebVid pairs with 2 frames, blended 1:1 with MMC4 documents) at
TP2 PP2: the run learns, frame regression follows model.regress_video_frames, and an interrupted
run resumes to the same numbers."""

from __future__ import annotations

import shutil

import pytest

from data_tools.preprocess import Options, run
from tests.helpers.datasets import IMAGE_SIZE
from tests.helpers.training import metrics, tiny_args, train

KEYS = ("loss", "lm_loss", "reg_loss", "grad_norm", "lr", "consumed_samples")


@pytest.fixture(scope="module")
def video_data(samples, tokenizer_dir, datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("webvid2")
    run(Options(format="webvid", tokenizer=str(tokenizer_dir), out=str(out), progress=False,
                inputs=[str(samples / "webvid" / "results.csv")], images=str(samples / "webvid" / "videos"),
                image_size=IMAGE_SIZE, video_frames=2))
    return [f"1:{out}", f"1:{datasets['mmc4'][0]}"], tokenizer_dir


def _args(video_data, root, *sets):
    data, tok = video_data
    return tiny_args(data, tok, root / "run", root / "ckpt", "train.train_iters=4", "data.video_frames=2", *sets)


def test_video_training_learns_and_resumes_exactly(video_data, tmp_path):
    straight = tmp_path / "straight"
    assert train(4, _args(video_data, straight)) == [0] * 4
    full = metrics(straight / "run")
    assert [m["step"] for m in full] == [1, 2, 3, 4] and full[-1]["loss"] < full[0]["loss"]
    halves = tmp_path / "halves"
    args = _args(video_data, halves, "train.exit_interval=2")
    assert train(4, args) == [0] * 4
    assert train(4, args) == [0] * 4
    resumed = metrics(halves / "run")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, (a["step"], a, b)
    shutil.rmtree(halves)
    # regressing the frames too changes the regression loss (more targets), not the data
    regressed = tmp_path / "regressed"
    assert train(4, _args(video_data, regressed, "model.regress_video_frames=true",
                          "train.train_iters=1")) == [0] * 4
    first = metrics(regressed / "run")[0]
    assert first["lm_loss"] == full[0]["lm_loss"] and first["reg_loss"] != full[0]["reg_loss"]
