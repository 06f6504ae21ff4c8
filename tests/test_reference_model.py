"""Sanity tests for the plain-PyTorch Emu2 reference (tests/helpers/reference.py)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import reference as ref  # noqa: E402

# special ids mapped into a tiny vocab of 64
PAD, BOI, EOI, IMG = 60, 61, 62, 63
IGNORE = [PAD, BOI, EOI, IMG]


def tiny_cfg(**kw):
    c = dict(image_size=28, patch_size=14, vision_width=32, vision_layers=2, vision_heads=4,
             vision_mlp_dim=64, vision_eps=1e-6, n_query=4, hidden_size=32, num_layers=2,
             num_heads=4, ffn_hidden_size=64, vocab_size=64, rms_eps=1e-6, rope_theta=10000.0)
    c.update(kw)
    return ref.RefConfig(**c)


def sample_tokens():
    # <s> [IMG] <image>x4 [/IMG] 5 6 </s>   (mirrors 1, 32001, 32003x4, 32002, 5, 6, 2)
    return torch.tensor([[1, BOI, IMG, IMG, IMG, IMG, EOI, 5, 6, 2]])


def test_param_names_and_shapes():
    cfg = tiny_cfg()
    p = ref.init_params(cfg, seed=0)
    assert p["model.visual.pos_embed"].shape == (1, 5, 32)
    assert p["model.visual.patch_embed.proj.weight"].shape == (32, 3, 14, 14)
    qkv_b = p["model.visual.blocks.1.attn.qkv.bias"]
    assert qkv_b.shape == (96,) and torch.all(qkv_b[32:64] == 0) and qkv_b[:32].abs().sum() > 0
    assert p["model.decoder.lm.model.layers.1.mlp.gate_proj.weight"].shape == (64, 32)
    assert p["model.decoder.lm.lm_head.weight"].shape == (64, 32)
    assert p["project_up.weight"].shape == (32, 32) and p["project_down.weight"].shape == (32, 32)
    assert not any("inv_freq" in k for k in p)
    # deterministic
    p2 = ref.init_params(cfg, seed=0)
    assert all(torch.equal(p[k], p2[k]) for k in p)


def test_forward_shapes():
    cfg = tiny_cfg()
    p = ref.init_params(cfg, seed=0)
    imgs = torch.randn(2, 3, 28, 28)
    toks = torch.tensor([[1, BOI, IMG, IMG, IMG, IMG, EOI, 5],
                         [1, 7, BOI, IMG, IMG, IMG, IMG, EOI]])
    logits, h, vis = ref.forward(p, cfg, toks, imgs, image_token_id=IMG)
    assert logits.shape == (2, 8, 64) and h.shape == (2, 8, 32) and vis.shape == (2, 4, 32)
    assert torch.isfinite(logits).all()
    # text only
    logits, h, vis = ref.forward(p, cfg, torch.tensor([[1, 5, 6]]), None, image_token_id=IMG)
    assert logits.shape == (1, 3, 64) and vis.shape == (0, 4, 32)
    # count mismatch is an error
    with pytest.raises(AssertionError):
        ref.forward(p, cfg, toks[:, :5], imgs, image_token_id=IMG)


def test_image_embedding_placement_row_major():
    cfg = tiny_cfg(num_layers=0)  # decoder = final norm only -> h is norm(embeddings)
    p = ref.init_params(cfg, seed=1)
    imgs = torch.randn(2, 3, 28, 28)
    toks = torch.tensor([[IMG, IMG, IMG, 5], [IMG, 6, IMG, IMG], [IMG, 9, 7, IMG]])
    _, h, vis = ref.forward(p, cfg, toks, imgs, image_token_id=IMG)
    up = vis.reshape(-1, 32) @ p["project_up.weight"].T
    expected = ref.rms_norm(up, p["model.decoder.lm.model.norm.weight"], cfg.rms_eps)
    torch.testing.assert_close(h[toks == IMG], expected)


def test_rope_matches_complex_rotation():
    s, hd, theta = 7, 16, 10000.0
    x = torch.randn(2, 3, s, hd, dtype=torch.float64)
    cos, sin = ref.rope_cos_sin(s, hd, theta)
    got = ref.apply_rope(x, cos.double(), sin.double())
    # independent: in HF rotate-half layout, dim j pairs with dim j + hd/2 as (real, imag)
    half = hd // 2
    freq = torch.tensor([theta ** (-2.0 * j / hd) for j in range(half)], dtype=torch.float64)
    angle = torch.arange(s, dtype=torch.float64)[:, None] * freq[None, :]
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    want = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # tables are fp32


def test_rope_relative_position_property():
    # <R_m q, R_n k> depends only on m - n
    hd = 8
    cos, sin = ref.rope_cos_sin(20, hd, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)
    rq = ref.apply_rope(q.expand(20, hd), cos, sin)
    rk = ref.apply_rope(k.expand(20, hd), cos, sin)
    torch.testing.assert_close(rq[5] @ rk[2], rq[15] @ rk[12], rtol=1e-5, atol=1e-5)


def test_pooling_block_means():
    grid = 4
    feats = torch.arange(grid * grid, dtype=torch.float32).reshape(1, grid * grid, 1)
    feats = torch.cat([feats, 100 * feats], dim=-1)  # 2 channels
    out = ref.pool_visual(feats, n_query=4)
    assert out.shape == (1, 4, 2)
    # patches row-major: rows [0..3], [4..7], [8..11], [12..15]; 2x2 blocks in raster order
    want = torch.tensor([2.5, 4.5, 10.5, 12.5])
    torch.testing.assert_close(out[0, :, 0], want)
    torch.testing.assert_close(out[0, :, 1], 100 * want)
    torch.testing.assert_close(ref.pool_visual(feats, n_query=16), feats)
    torch.testing.assert_close(ref.pool_visual(feats, n_query=1)[0, 0, 0], torch.tensor(7.5))


def test_loss_masks_and_values():
    cfg = tiny_cfg()
    p = ref.init_params(cfg, seed=2)
    toks = sample_tokens()
    img = torch.randn(1, 3, 28, 28)
    ce_mask, reg_mask = ref.loss_masks(toks, IMG, IGNORE)
    # regression at [IMG] (t=1) and the first three <image> (t=2,3,4)
    assert reg_mask[0].nonzero().flatten().tolist() == [1, 2, 3, 4]
    # CE labels kept: 5, 6, </s> -> positions t=6,7,8
    assert ce_mask[0].nonzero().flatten().tolist() == [6, 7, 8]

    out = ref.emu2_loss(p, cfg, toks, img, image_token_id=IMG, ce_ignore_ids=IGNORE,
                        lm_weight=0.7, reg_weight=3.0)
    logits, h, vis = ref.forward(p, cfg, toks, img, image_token_id=IMG)
    lm = F.cross_entropy(logits[0, [6, 7, 8]], toks[0, [7, 8, 9]])
    pred = h[0, [1, 2, 3, 4]] @ p["project_down.weight"].T
    reg = ((pred - vis[0]) ** 2).mean()
    torch.testing.assert_close(out["lm_loss"], lm)
    torch.testing.assert_close(out["reg_loss"], reg)
    torch.testing.assert_close(out["loss"], 0.7 * lm + 3.0 * reg)


def test_empty_sets_give_zero():
    cfg = tiny_cfg()
    p = {k: v.requires_grad_() for k, v in ref.init_params(cfg, seed=3).items()}
    toks = torch.tensor([[1, PAD, PAD, PAD]])
    out = ref.emu2_loss(p, cfg, toks, None, image_token_id=IMG, ce_ignore_ids=IGNORE,
                        lm_weight=1.0, reg_weight=1.0)
    assert out["lm_loss"].item() == 0.0 and out["reg_loss"].item() == 0.0
    out["loss"].backward()  # still differentiable


def test_causality():
    cfg = tiny_cfg()
    p = ref.init_params(cfg, seed=4)
    a = torch.tensor([[1, 5, 6, 7, 8, 9]])
    b = a.clone()
    b[0, 4] = 11
    la, _, _ = ref.forward(p, cfg, a, None, IMG)
    lb, _, _ = ref.forward(p, cfg, b, None, IMG)
    torch.testing.assert_close(la[:, :4], lb[:, :4])
    assert not torch.allclose(la[:, 4:], lb[:, 4:])


def test_gradients_flow():
    cfg = tiny_cfg()
    p = {k: v.requires_grad_() for k, v in ref.init_params(cfg, seed=5).items()}
    toks = torch.cat([sample_tokens(), sample_tokens()])
    imgs = torch.randn(2, 3, 28, 28)
    out = ref.emu2_loss(p, cfg, toks, imgs, image_token_id=IMG, ce_ignore_ids=IGNORE,
                        lm_weight=1.0, reg_weight=1.0)
    assert out["reg_loss"] > 0 and out["lm_loss"] > 0
    out["loss"].backward()
    for k, v in p.items():
        assert v.grad is not None and torch.isfinite(v.grad).all(), k
    for k in ("project_down.weight", "project_up.weight", "model.visual.patch_embed.proj.weight",
              "model.visual.blocks.0.attn.qkv.weight", "model.decoder.lm.lm_head.weight",
              "model.decoder.lm.model.layers.0.self_attn.q_proj.weight"):
        assert p[k].grad.abs().sum() > 0, k


def test_bf16_runs():
    cfg = tiny_cfg()
    p = ref.init_params(cfg, seed=6, dtype=torch.bfloat16)
    out = ref.emu2_loss(p, cfg, sample_tokens(), torch.randn(1, 3, 28, 28), image_token_id=IMG,
                        ce_ignore_ids=IGNORE, lm_weight=1.0, reg_weight=1.0)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_grouped_query_attention_is_mha_with_shared_kv_heads():
    """kv_heads < num_heads: query head j uses key/value head j // (num_heads / kv_heads) (LLaMA's
    ``repeat_kv``); the same as multi-head attention whose heads of a group have equal k/v rows."""
    gqa_cfg, mha_cfg = tiny_cfg(num_heads=4, num_kv_heads=2), tiny_cfg(num_heads=4)
    p = ref.init_params(gqa_cfg, seed=7)
    hd = 32 // 4
    assert p["model.decoder.lm.model.layers.0.self_attn.k_proj.weight"].shape == (2 * hd, 32)
    mha = dict(p)
    for i in range(mha_cfg.num_layers):
        for n in ("k", "v"):
            key = f"model.decoder.lm.model.layers.{i}.self_attn.{n}_proj.weight"
            heads = p[key].view(2, hd, 32)
            mha[key] = torch.cat([heads[0], heads[0], heads[1], heads[1]])  # heads 0,1 -> kv 0; 2,3 -> kv 1
    toks = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    got, _, _ = ref.forward(p, gqa_cfg, toks, None, IMG)
    want, _, _ = ref.forward(mha, mha_cfg, toks, None, IMG)
    torch.testing.assert_close(got, want)
