"""The Hugging Face name mapping is one table (``hf_mapping.REGISTRY``) and both directions are
derived from it: every tensor of a tiny model is declared exactly once and round-trips byte for
byte (HF and BAAI's native layout), the declared tensor-parallel dimension is the one
megatron-core splits, every key of an independently named Emu2 state dict is accounted for, and
a mapping added once is visible to ``to_hf`` and ``from_hf`` alike."""

from __future__ import annotations

import pytest
import torch

from megatron_emu.checkpoint import hf_mapping, native_layout
from megatron_emu.checkpoint.hf_mapping import REGISTRY, Dims, Mapping, find_hf, find_ours, from_hf, to_hf
from tests.helpers import reference as ref
from tests.helpers.dist import run_ranks
from tests.helpers.emu2_hf import native_state_dict
from tests.helpers.tiny import ref_config, tiny_config

GQA = ("model.lm.num_query_groups=2",)  # grouped-query attention: the LM QKV rule at its most general


def _shapes(rank: int, cfg) -> dict:
    """Canonical name -> (full shape, this rank's local shapes), from the meta-device model."""
    from tests.helpers.mcore_targets import rank_targets
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.training import build

    init_distributed()
    targets = rank_targets(build.model_chunks(cfg, build.process_groups(cfg), meta=True))
    return {n: (lst[0][2], [tuple(sh.local_shape) for sh, _, _ in lst]) for n, lst in targets.items()}


@pytest.fixture(scope="module")
def tp2():
    cfg = tiny_config(tp=2, sp=True, extra=GQA)
    return cfg, run_ranks(2, _shapes, cfg)[0]


def _canonical(cfg, shapes: dict) -> dict:
    """Random values for every model tensor (padded vocabulary rows zero, as an import makes them)."""
    gen = torch.Generator().manual_seed(3)
    out = {n: torch.randn(full, generator=gen) for n, (full, _) in shapes.items()}
    for m in REGISTRY:
        if m.rule is hf_mapping.VOCAB:
            out[m.ours][cfg.model.lm.vocab_size:] = 0
    return out


def _same(a: dict, b: dict) -> None:
    assert list(sorted(a)) == list(sorted(b)), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_every_model_tensor_is_declared_once_and_round_trips(tp2):
    cfg, shapes = tp2
    dims, ours = Dims.from_config(cfg), _canonical(cfg, shapes)
    used = {id(find_ours(n)[0]) for n in ours}
    assert used == {id(m) for m in REGISTRY}, "a REGISTRY entry matches no tensor of the model"
    for pattern in [m.ours for m in REGISTRY] + [h for m in REGISTRY for h in m.hf]:  # declared once
        assert sum(p == pattern for p in [m.ours for m in REGISTRY] + [h for m in REGISTRY for h in m.hf]) == 1
    hf = to_hf(ours, dims)
    assert all(find_hf(n) is not None for n in hf)
    _same(from_hf(hf, dims), ours)
    # BAAI's native layout: the ViT bias travels as its variant (q_bias, v_bias: no k bias).
    native = native_layout.to_native(hf, dims.lm_head_dim, dims.rope_theta)
    assert not any(n.endswith("attn.qkv.bias") for n in native) and any(n.endswith("attn.q_bias") for n in native)
    fused = {n: torch.cat([t[: len(t) // 3], torch.zeros_like(t[: len(t) // 3]), t[2 * len(t) // 3:]])
             if n.endswith("attn.qkv.bias") else t for n, t in hf.items()}
    _same(from_hf({native_layout.hf_name(n): t for n, t in native.items()}, dims), from_hf(fused, dims))


def test_declared_tp_dimension_is_the_one_megatron_core_splits(tp2):
    _, shapes = tp2
    wrong = []
    for name, (full, locals_) in shapes.items():
        split = {d for local in locals_ for d, (a, b) in enumerate(zip(local, full)) if a != b}
        declared = find_ours(name)[0].tp
        if split != ({declared} if declared is not None else set()):
            wrong.append(f"{name}: megatron-core splits dims {sorted(split)}, REGISTRY declares tp={declared}")
    assert not wrong, "\n".join(wrong)


def test_no_key_of_an_emu2_state_dict_is_unaccounted():
    cfg = tiny_config(extra=GQA)
    dims = Dims.from_config(cfg)
    params = ref.init_params(ref_config(cfg), seed=4)  # HF names written without our mapping code
    assert [n for n in params if find_hf(n) is None] == []
    _same(to_hf(from_hf(params, dims), dims), params)
    native = native_state_dict(params, head_dim=cfg.model.lm.hidden_size // cfg.model.lm.num_attention_heads)
    names = [native_layout.hf_name(n) for n in native]
    assert [n for n in names if find_hf(n) is None and not n.endswith(hf_mapping.IGNORED_HF_SUFFIX)] == []


def test_a_mapping_declared_once_is_visible_in_both_directions(monkeypatch):
    dims, t = Dims(1, 1, 1, 4, 8), torch.arange(6.0).reshape(3, 2)
    extra = Mapping("heads.extra.{i}.weight", ("model.extra.{i}.weight",), tp=0)
    with pytest.raises(KeyError, match="unmapped parameter"):
        to_hf({"heads.extra.0.weight": t}, dims)
    with pytest.raises(KeyError, match="unknown HF key"):
        from_hf({"model.extra.0.weight": t}, dims)
    monkeypatch.setattr(hf_mapping, "REGISTRY", REGISTRY + (extra,))
    assert list(to_hf({"heads.extra.0.weight": t}, dims)) == ["model.extra.0.weight"]
    assert torch.equal(from_hf({"model.extra.0.weight": t}, dims)["heads.extra.0.weight"], t)
