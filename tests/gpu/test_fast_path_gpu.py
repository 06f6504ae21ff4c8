"""The GPU fast path (``-m gpu``; skipped without CUDA): a training step with no host sync,
every attention backend trains, and FP8 (both recipes) lowers the loss. (The Transformer Engine
spec against the local one, fp32 and bf16: ``test_te_backend.py``.)"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import tiny
from tests.helpers.dist import run_ranks
from tests.helpers.training import metrics, tiny_args, train

pytestmark = pytest.mark.gpu


def _step_without_sync(rank: int) -> str:
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.parallel.sizes import ParallelSizes
    from megatron_emu.training import build
    from megatron_emu.training.grad_norm import clip_grads_, global_grad_norm
    from megatron_emu.training.optimizer import build_optimizer
    from megatron_emu.training.schedule import forward_backward, wrap_ddp

    cfg = tiny.tiny_config(tp=1, pp=1, extra=("model.params_dtype=bfloat16",))
    init_distributed()
    pgs = build.process_groups(cfg)
    model = wrap_ddp(build.ddp_spec(cfg), build.model_chunks(cfg, pgs), pgs)
    optimizer, _ = build_optimizer(build.optimizer_spec(cfg), model, pgs)
    spec = build.step_spec(cfg, ParallelSizes.from_groups(pgs))
    dev = torch.device("cuda", torch.cuda.current_device())

    def step(debug: bool):
        batches = [b.pin_memory() for b in tiny.make_microbatches(cfg)]
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        torch.cuda.set_sync_debug_mode("error" if debug else 0)
        try:  # from the first forward to the optimizer step
            forward_backward(spec, model, batches, dev, torch.bfloat16)
            optimizer.prepare_grads()
            norm = global_grad_norm(optimizer, dev)
            clip_grads_(optimizer, cfg.train.clip_grad, norm)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        optimizer.step_with_ready_grads()
        return norm

    warm = float(step(debug=False))  # warm-up: allocator, cuBLAS handles, NCCL communicators
    norm = float(step(debug=True))  # a host sync in here raises in the rank: the test fails
    return warm, norm


def test_training_step_without_host_sync():
    (warm, norm) = run_ranks(1, _step_without_sync)[0]
    # Both steps computed a real gradient norm, and the first update changed the weights the
    # second step ran on (the optimizer step happened between them).
    assert math.isfinite(warm) and math.isfinite(norm) and warm > 0 and norm > 0
    assert norm != warm


@pytest.mark.parametrize("backend", ["unfused", "sdpa"])
def test_each_attention_backend_trains(train_data, tmp_path, backend):
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "model.params_dtype=bfloat16",
                     f"model.attention_backend={backend}", "train.train_iters=2", tp=1, pp=1)
    assert train(1, args) == [0]
    m = metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [1, 2] and all(not r["skipped"] for r in m)


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_training_lowers_the_loss(train_data, tmp_path, recipe):
    pytest.importorskip("transformer_engine")
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "model.params_dtype=bfloat16",
                     "model.transformer_impl=transformer_engine", "train.fp8=hybrid",
                     f"train.fp8_recipe={recipe}", "train.train_iters=16", "train.lr=3e-3",
                     "train.lr_warmup_fraction=0.0", tp=1, pp=1)
    assert train(1, args) == [0]
    m = metrics(tmp_path / "run")
    assert all(not r["skipped"] for r in m)
    first, last = [r["loss"] for r in m[:3]], [r["loss"] for r in m[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, (first, last)
