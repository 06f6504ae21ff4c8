"""Per-module learning rates are logged: ``lr_<module>`` in metrics.jsonl and on the step line,
for every module with its own peak that trains (the frozen ViT has none), following the same
warmup + cosine schedule as ``lr``."""

from __future__ import annotations

import math

from megatron_emu.training.metrics import format_line
from tests.helpers.training import metrics, tiny_args, train


def test_module_learning_rates_are_logged(train_data, tmp_path):
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.train_iters=2", "run.log_interval=1",
                     "train.lr=1e-3", "train.min_lr=1e-4", "train.lr_warmup_fraction=0.0",
                     "train.module_lr.adapter=1e-2", "train.module_lr.vision=5e-3",  # the preset freezes the ViT
                     "checkpoint.save_at_end=false", tp=1, pp=1)
    assert train(1, args) == [0]
    records = metrics(tmp_path / "run")
    for r in records:
        assert "lr_vision" not in r and set(k for k in r if k.startswith("lr")) == {"lr", "lr_adapter"}
        assert math.isclose(r["lr_adapter"] / r["lr"], 10.0, rel_tol=1e-9), r  # the same schedule, scaled
    line = format_line(records[0])  # the step line of the log
    assert f"| lr {records[0]['lr']:.2e} | lr_adapter {records[0]['lr_adapter']:.2e} | gnorm" in line, line
