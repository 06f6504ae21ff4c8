"""Optional Weights & Biases logging, offline: the run directory holds W&B's offline run with
the training and validation metrics, and a resumed job continues the same W&B run."""

from __future__ import annotations

import json

import pytest

from tests.helpers.training import metrics, tiny_args, train


def test_wandb_offline_run_holds_the_metrics(train_data, datasets, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt",
                     "run.wandb={project: emu-test, name: tiny, mode: offline}",
                     f"data.valid_path=['{datasets['mmc4'][0]}']", "train.eval_iters=1",
                     "train.train_iters=4", "train.exit_interval=2", tp=1, pp=1)
    assert train(1, args) == [0]
    assert train(1, args) == [0]  # resumed: the same W&B run id
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    # An offline run is W&B's protobuf record log (what `wandb sync` uploads); its history items
    # hold the metric names and their values as JSON text.
    records = (runs[-1] / f"run-{run_id}.wandb").read_bytes()
    rows = metrics(tmp_path / "run")
    last = [r for r in rows if "loss" in r][-1]
    valid = [r for r in rows if "valid_loss" in r][-1]
    assert last["step"] == valid["step"] == 4
    assert b"train/loss" in records and json.dumps(last["loss"]).encode() in records
    assert b"valid/ppl" in records and json.dumps(valid["valid_ppl"]).encode() in records
