"""Tensor-parallel paths on two gloo ranks against one rank: fused_linear_mse with a
column-parallel head (with and without sequence parallelism), an empty index, and the model's
head implementations (plain / fused / chunked CE, fused / naive regression)."""

from __future__ import annotations

import torch

from tests.helpers.dist import run_ranks
from tests.helpers.tiny import make_microbatches, tiny_config

T, H, D, M = 24, 16, 12, 10


def _data():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(D, H, generator=g, dtype=torch.float64) / H ** 0.5
    target = torch.randn(M, D, generator=g, dtype=torch.float64)
    index = torch.randperm(T, generator=g)[:M]
    return hidden, weight, target, index


def _reference() -> dict:
    import torch.nn.functional as F

    hidden, weight, target, index = _data()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = F.mse_loss(F.linear(h[index], w), target)
    loss.backward()
    return {"loss": loss.item(), "grad_h": h.grad, "grad_w": w.grad}


def _tp_rank(rank: int, sequence_parallel: bool, empty: bool) -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                               gather_from_sequence_parallel_region)

    import megatron_emu.compat  # noqa: F401
    from megatron_emu.ops import fused_linear_mse
    from megatron_emu.parallel.groups import init_distributed

    init_distributed()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    group = parallel_state.get_tensor_model_parallel_group()
    hidden, weight, target, index = _data()
    if empty:
        target, index = target[:0], index[:0]
    shard = weight[rank * D // 2:(rank + 1) * D // 2].clone().requires_grad_()
    if sequence_parallel:  # each rank holds half of the rows; the head all-gathers them
        local = hidden[rank * T // 2:(rank + 1) * T // 2].clone().requires_grad_()
        full = gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True, group=group)
    else:
        local = hidden.clone().requires_grad_()
        full = copy_to_tensor_model_parallel_region(local, group=group)
    loss = fused_linear_mse(full, shard, target, index=index, tp_group=group, chunk_size=3)
    loss.backward()
    return {"loss": loss.item(), "grad_local": local.grad, "grad_w": shard.grad}


def _check(results, ref, sequence_parallel):
    for rank, r in enumerate(results):
        assert abs(r["loss"] - ref["loss"]) < 1e-12
        torch.testing.assert_close(r["grad_w"], ref["grad_w"][rank * D // 2:(rank + 1) * D // 2])
        rows = slice(rank * T // 2, (rank + 1) * T // 2) if sequence_parallel else slice(None)
        torch.testing.assert_close(r["grad_local"], ref["grad_h"][rows])


def test_column_parallel_matches_single_rank():
    _check(run_ranks(2, _tp_rank, False, False), _reference(), False)


def test_column_parallel_with_sequence_parallel_matches_single_rank():
    _check(run_ranks(2, _tp_rank, True, False), _reference(), True)


def test_empty_index_under_tp_returns_zero_without_deadlock():
    results = run_ranks(2, _tp_rank, True, True, timeout=60)
    for r in results:
        assert r["loss"] == 0.0 and not r["grad_local"].any() and not r["grad_w"].any()


def _model_losses(rank: int, tp: int, impls: list[tuple[str, str]]) -> list[dict]:
    """Same weights, same micro-batch, each (lm_ce_impl, regression_impl): losses and grads."""
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.training import build

    init_distributed()
    out = []
    for ce, reg in impls:
        cfg = tiny_config(tp=tp, sp=tp > 1, extra=(f"model.loss.lm_ce_impl={ce}",
                                                   f"model.loss.regression_impl={reg}"))
        if not out:
            pgs = build.process_groups(cfg)
        torch.manual_seed(0)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(0)
        (chunk,) = build.model_chunks(cfg, pgs)
        batch = make_microbatches(cfg)[1]
        losses = chunk(batch)
        losses["loss"].backward()
        out.append({"losses": {k: v.item() for k, v in losses.items()},
                    "grads": {n: p.grad.clone() for n, p in chunk.named_parameters() if p.grad is not None}})
    return out


def _same(runs):
    base = runs[0]
    for other in runs[1:]:
        for k, v in base["losses"].items():
            assert abs(other["losses"][k] - v) < 1e-5, (k, other["losses"][k], v)
        assert base["grads"].keys() == other["grads"].keys()
        for n, g in base["grads"].items():
            err = (other["grads"][n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
            assert err < 1e-5, f"gradient of {n} differs (relative error {err:.2e})"


def test_head_implementations_agree_tp1():
    impls = [("plain", "naive"), ("fused", "fused"), ("plain", "fused")]
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):  # torch >= 2.13 (the CI's torch has it)
        impls.append(("linear_chunked", "fused"))
    (runs,) = run_ranks(1, _model_losses, 1, impls)
    _same(runs)


def test_head_implementations_agree_tp2_sp():
    impls = [("plain", "naive"), ("fused", "fused")]
    for runs in run_ranks(2, _model_losses, 2, impls):
        _same(runs)
