"""The ViT's fused bias + exact GELU against its CPU reference ``gelu(x + bias)``, and the ViT
MLP with the fusion on against megatron-core's unfused MLP on the same weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_emu.model.fused_gelu import bias_gelu_exact


def test_bias_gelu_exact_matches_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(5, 3, 16, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    bias = torch.randn(16, generator=g, dtype=torch.float64).requires_grad_(True)
    out = bias_gelu_exact(y, bias)
    ref_y, ref_b = y.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    ref = F.gelu(ref_y + ref_b)  # exact (erf) GELU, not the tanh approximation
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    assert torch.allclose(y.grad, ref_y.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(bias.grad, ref_b.grad, rtol=1e-10, atol=1e-12)
    tanh = F.gelu(ref_y + ref_b, approximate="tanh")
    assert not torch.allclose(out, tanh, atol=1e-6)  # the approximation would be caught


def _mlp_outputs(rank: int) -> tuple:
    import dataclasses

    from megatron_emu.model.megatron_config import vision_transformer_config
    from megatron_emu.model.specs import VisionMLP, _local_modules
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.parallel.sizes import ParallelSizes
    from megatron_emu.training import build
    from megatron.core.transformer.mlp import MLPSubmodules
    from tests.helpers.tiny import tiny_config

    cfg = tiny_config()
    init_distributed()
    pgs = build.process_groups(cfg)
    column, row, _, _ = _local_modules()
    sub = MLPSubmodules(linear_fc1=column, linear_fc2=row)
    base = vision_transformer_config(build.model_spec(cfg), ParallelSizes.from_groups(pgs))
    outs = []
    for fused in (False, True):
        torch.manual_seed(0)
        mlp = VisionMLP(dataclasses.replace(base, bias_activation_fusion=fused), sub,
                        pg_collection=pgs)
        assert mlp.fuse_exact_gelu == fused
        with torch.no_grad():
            for p in mlp.parameters():
                p.normal_(0, 0.5)
        x = torch.randn(7, 2, base.hidden_size, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        out, bias = mlp(x)
        (out + bias).square().sum().backward()
        outs.append((out.detach(), bias.detach(), x.grad.clone(),
                     [p.grad.clone() for p in mlp.parameters()]))
    return outs


def test_vision_mlp_fused_equals_unfused():
    from tests.helpers.dist import run_ranks

    (outs,) = run_ranks(1, _mlp_outputs)
    (a, ab, ax, ag), (b, bb, bx, bg) = outs

    def err(x, y):  # fp32 rounding relative to the tensor's scale
        return ((x - y).abs().max() / y.abs().max()).item()

    assert err(a, b) < 1e-6 and torch.equal(ab, bb)
    assert err(ax, bx) < 1e-6
    assert all(err(ga, gb) < 1e-6 for ga, gb in zip(ag, bg))
