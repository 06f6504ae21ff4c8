"""GPU training checks (``-m gpu``; skipped without CUDA): bf16 + async checkpointing resume
(FP8 and the backends: ``test_fast_path_gpu.py``)."""

from __future__ import annotations

import pytest

from tests.helpers.training import metrics, tiny_args, train

pytestmark = pytest.mark.gpu


def test_bf16_async_save_and_resume(train_data, tmp_path):
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "model.params_dtype=bfloat16",
                     "checkpoint.async_save=true", "train.exit_interval=3", tp=1, pp=1)
    assert train(1, args) == [0]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000003"
    assert train(1, args) == [0]
    m = metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    assert m[-1]["mfu"] is not None and m[-1]["memory_gib"] > 0
