"""The CUDA kernel of l2_loss_grad_ and the fused head on a GPU (``-m gpu``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_emu.ops import fused_linear_mse, has_extension

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_cpu(dtype):
    if not has_extension("cuda"):
        pytest.skip("the CUDA extension is not built (MEGATRON_EMU_BUILD_CUDA=1 pip install ...)")
    pred = torch.randn(257, 1792).to(dtype)
    target = torch.randn(257, 1792).to(dtype)
    cpu_pred = pred.clone()
    cpu_loss = torch.ops.megatron_emu.l2_loss_grad_(cpu_pred, target, 0.25)
    gpu_pred = pred.cuda()
    gpu_loss = torch.ops.megatron_emu.l2_loss_grad_(gpu_pred, target.cuda(), 0.25)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype in (torch.bfloat16, torch.float16) else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, **tol)
    torch.testing.assert_close(gpu_pred.cpu(), cpu_pred, **tol)


def test_fused_head_bf16_parity_and_memory():
    torch.manual_seed(0)
    m, h, d = 8192, 6656, 1792
    hidden = torch.randn(m, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(d, h, device="cuda") / h ** 0.5).to(torch.bfloat16).requires_grad_()
    target = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), torch.cuda.max_memory_allocated() - base
    ref, naive_peak = peak(lambda: F.mse_loss(F.linear(hidden, weight).float(), target.float()))
    g_ref = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    out, fused_peak = peak(lambda: fused_linear_mse(hidden, weight, target))
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(hidden.grad.float(), g_ref[0].float(), rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(weight.grad.float(), g_ref[1].float(), rtol=5e-2, atol=5e-3)
    assert fused_peak < naive_peak
