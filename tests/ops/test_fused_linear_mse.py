"""fused_linear_mse and the l2_loss_grad_ operator against the naive torch expression."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_emu.ops import fused_linear_mse, has_extension, l2_loss_grad_torch

BACKENDS = ["torch", pytest.param("ext", marks=pytest.mark.skipif(not has_extension("cpu"),
                                                                   reason="C++ extension not built"))]


def naive(hidden, weight, target, bias=None, index=None, reduction="mean"):
    rows = hidden if index is None else hidden[index]
    return F.mse_loss(F.linear(rows, weight, bias).float(), target.float(), reduction=reduction)


def make(t=40, h=24, d=56, m=30, dtype=torch.float32, bias=False, index=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t if index else m, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(d, h, generator=g, dtype=torch.float64) / h ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(d, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    target = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.randperm(t, generator=g)[:m] if index else None
    return hidden, weight, b, target, idx


def grads(loss, *tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("index", [False, True])
def test_gradcheck_fp64(backend, bias, index):
    hidden, weight, b, target, idx = make(t=9, h=5, d=7, m=6, dtype=torch.float64, bias=bias, index=index)

    def fn(h, w, *maybe_b):
        return fused_linear_mse(h, w, target, bias=maybe_b[0] if maybe_b else None, index=idx,
                                chunk_size=4, allow_retain_graph=True, backend=backend)
    inputs = (hidden, weight) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("index", [False, True])
def test_fp32_matches_naive(backend, chunk, bias, index):
    hidden, weight, b, target, idx = make(bias=bias, index=index)
    ref = naive(hidden, weight, target, b, idx)
    ref_g = grads(ref * 2.5, hidden, weight, b)
    out = fused_linear_mse(hidden, weight, target, bias=b, index=idx, chunk_size=chunk, backend=backend)
    out_g = grads(out * 2.5, hidden, weight, b)  # upstream gradient 2.5 (in-place scaling)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, e in zip(out_g, ref_g):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 8])
def test_bf16_matches_naive(backend, chunk):
    hidden, weight, b, target, idx = make(dtype=torch.bfloat16, bias=True, index=True)
    ref = naive(hidden, weight, target, b, idx)
    ref_g = grads(ref, hidden, weight, b)
    out = fused_linear_mse(hidden, weight, target, bias=b, index=idx, chunk_size=chunk, backend=backend)
    out_g = grads(out, hidden, weight, b)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-3)
    for a, e in zip(out_g, ref_g):
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-3)


def test_sum_reduction_and_duplicate_rows():
    hidden, weight, _, target, _ = make(t=10, m=12, index=True)
    idx = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 9])
    ref = naive(hidden, weight, target, index=idx, reduction="sum")
    out = fused_linear_mse(hidden, weight, target, index=idx, reduction="sum", chunk_size=5)
    torch.testing.assert_close(out, ref)
    for a, e in zip(grads(out, hidden, weight), grads(ref, hidden, weight)):
        torch.testing.assert_close(a, e)


def test_empty_index_gives_zero_loss_and_zero_grads():
    hidden, weight, _, _, _ = make(t=10, m=0, index=True)
    out = fused_linear_mse(hidden, weight, torch.empty(0, weight.shape[0]), index=torch.empty(0, dtype=torch.long))
    assert out.item() == 0.0
    gh, gw = grads(out, hidden, weight)
    assert not gh.any() and not gw.any()


def test_second_backward_raises_unless_allowed():
    hidden, weight, _, target, _ = make()
    out = fused_linear_mse(hidden, weight, target)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="allow_retain_graph"):
        out.backward()
    hidden.grad = weight.grad = None
    out = fused_linear_mse(hidden, weight, target, allow_retain_graph=True)
    out.backward(retain_graph=True)
    first = weight.grad.clone()
    out.backward()
    torch.testing.assert_close(weight.grad, 2 * first)


def test_bad_shapes_are_clear_errors():
    hidden, weight, _, target, _ = make()
    with pytest.raises(ValueError, match="exactly"):
        fused_linear_mse(hidden[:-1], weight, target)
    with pytest.raises(ValueError, match="target width"):
        fused_linear_mse(hidden, weight, target[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_mse(hidden, weight, target, reduction="max")


def test_torch_kernel_contract():
    pred = torch.randn(6, 9, dtype=torch.float64)
    target = torch.randn(6, 9, dtype=torch.float64)
    expected_loss = ((pred - target) ** 2).sum(1)
    expected_grad = 2 * 0.25 * (pred - target)
    loss = l2_loss_grad_torch(pred, target, 0.25)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(pred, expected_grad)


@pytest.mark.skipif(not has_extension("cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_operator_matches_torch_kernel_and_passes_opcheck(dtype):
    pred = torch.randn(33, 70).to(dtype)
    target = torch.randn(33, 70).to(dtype)
    a, b = pred.clone(), pred.clone()
    loss_ext = torch.ops.megatron_emu.l2_loss_grad_(a, target, 0.5)
    loss_ref = l2_loss_grad_torch(b, target, 0.5)
    assert loss_ext.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype in (torch.bfloat16, torch.float16) else {}
    torch.testing.assert_close(loss_ext, loss_ref, **tol)
    torch.testing.assert_close(a, b, **tol)
    torch.library.opcheck(torch.ops.megatron_emu.l2_loss_grad_.default, (pred.clone(), target, 0.5))


@pytest.mark.skipif(not has_extension("cpu"), reason="C++ extension not built")
def test_operator_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.megatron_emu.l2_loss_grad_(torch.randn(3, 4), torch.randn(3, 5), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.megatron_emu.l2_loss_grad_(torch.randn(4, 3).t(), torch.randn(3, 4), 1.0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_wrapper_checks_inputs_before_any_kernel(backend):
    from megatron_emu.ops._ext import l2_loss_grad_

    with pytest.raises(ValueError, match="one dtype"):
        l2_loss_grad_(torch.randn(3, 4), torch.randn(3, 5), 1.0, backend)
    with pytest.raises(ValueError, match="one dtype"):
        l2_loss_grad_(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64), 1.0, backend)
    with pytest.raises(ValueError, match="contiguous"):
        l2_loss_grad_(torch.randn(4, 3).t(), torch.randn(3, 4), 1.0, backend)
