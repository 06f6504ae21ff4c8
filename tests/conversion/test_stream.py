"""The streaming hf-to-mcore writer: fresh initialisation rules against the model's own, part
merging (complete parts load exactly, an incomplete set is refused), and the work plan's bound."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_emu.checkpoint.fresh_init import fresh_tensor
from megatron_emu.checkpoint.stream_writer import MergeError, merge_parts
from tests.helpers.dist import run_ranks
from tests.helpers.tiny import tiny_config


def _real_init(rank: int, cfg) -> dict:
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.training import build

    init_distributed()
    (model,) = build.model_chunks(cfg, build.process_groups(cfg))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fresh_init_follows_the_models_initialisation():
    cfg = tiny_config(extra=("model.lm.hidden_size=128", "model.lm.ffn_hidden_size=256",
                             "model.vision.width=128", "model.vision.mlp_dim=256"))
    real = run_ranks(1, _real_init, cfg)[0]
    assert len(real) > 20
    for name, r in real.items():
        f = fresh_tensor(name, tuple(r.shape), cfg)
        assert f.shape == r.shape and f.dtype == r.dtype, name
        if torch.all(r == 1) or torch.all(r == 0):
            assert torch.equal(f, r), f"{name}: the model initialises it to a constant"
            continue
        assert not torch.equal(f, r), f"{name}: fresh values must be drawn, not copied"
        ratio = f.std().item() / r.std().item()
        assert 0.85 < ratio < 1.15, f"{name}: std {f.std():.4g} vs the model's {r.std():.4g}"
        assert abs(f.mean().item()) < 4 * r.std().item() / math.sqrt(r.numel()) + 1e-6, name
    # Layout independent: the same name always gives the same values.
    name = "decoder.layers.1.mlp.linear_fc1.weight"
    assert torch.equal(fresh_tensor(name, (8, 4), cfg), fresh_tensor(name, (8, 4), cfg))


def _save_layer_parts(rank: int, root: str, layers: list) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_emu.checkpoint.stream_writer import fill, save_part
    from megatron_emu.parallel.groups import init_distributed

    init_distributed()
    for k, t in enumerate(layers):  # a stacked key: one layer per part, as the converter writes
        sh = ShardedTensor.from_rank_offsets("decoder.layers.w", torch.empty_like(t, device="meta"),
                                             (0, k, len(layers)), replica_id=0, prepend_axis_num=1)
        save_part(Path(root) / "parts" / f"{k:05d}", [fill(sh, (0, 0), t, t.dtype)],
                  {"decoder.layers.": (k, len(layers))})


def _load_stacked(rank: int, ckpt: str, shape: tuple) -> torch.Tensor:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_emu.parallel.groups import init_distributed

    init_distributed()
    n = shape[0]  # requested the way a model asks for a stacked key: one tensor per layer
    request = {f"w{k}": ShardedTensor.from_rank_offsets("decoder.layers.w", torch.zeros(shape[1:]), (0, k, n),
                                                         replica_id=0, prepend_axis_num=1) for k in range(n)}
    state = dist_checkpointing.load(request, ckpt)
    return torch.stack([state[f"w{k}"] for k in range(n)])


def test_merged_parts_load_exactly_and_incomplete_parts_are_refused(tmp_path):
    layers = [torch.randn(6, 5) for _ in range(3)]
    run_ranks(1, _save_layer_parts, str(tmp_path / "a"), layers)
    merge_parts(sorted((tmp_path / "a" / "parts").iterdir()), tmp_path / "a" / "ckpt")
    assert not (tmp_path / "a" / "parts" / "00000").exists()
    files = sorted(p.name for p in (tmp_path / "a" / "ckpt").glob("*.distcp"))
    assert files and all(p.startswith("__0_") for p in files)  # moved in, named by the writing rank
    loaded = run_ranks(1, _load_stacked, str(tmp_path / "a" / "ckpt"), (3, 6, 5))[0]
    assert torch.equal(loaded, torch.stack(layers))

    run_ranks(1, _save_layer_parts, str(tmp_path / "b"), layers)
    parts = sorted((tmp_path / "b" / "parts").iterdir())
    with pytest.raises(MergeError, match="cover"):
        merge_parts(parts[:2], tmp_path / "b" / "ckpt")


def _plan(rank: int, cfg, llama: str) -> tuple:
    from megatron_emu.checkpoint.convert import LM_PREFIXES, _gather_needed
    from megatron_emu.checkpoint.hf_mapping import Dims
    from megatron_emu.checkpoint.hf_source import CanonicalSource
    from megatron_emu.checkpoint.stream_writer import rank_targets
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.training import build

    init_distributed()
    chunks = build.model_chunks(cfg, build.process_groups(cfg), meta=True)
    assert all(p.is_meta for c in chunks for p in c.parameters())
    needed = _gather_needed(rank_targets(chunks))
    return needed, CanonicalSource({"llama": llama}, Dims.from_config(cfg)).plan(needed, LM_PREFIXES)


def test_plan_covers_the_model_once_in_groups_no_larger_than_a_layer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_emu.contracts import vocab as st

    cfg = tiny_config()
    lm = cfg.model.lm
    LlamaForCausalLM(LlamaConfig(vocab_size=st.EMU2_VOCAB_SIZE, hidden_size=lm.hidden_size,
                                 intermediate_size=lm.ffn_hidden_size, num_hidden_layers=lm.num_layers,
                                 num_attention_heads=lm.num_attention_heads, tie_word_embeddings=False)
                     ).save_pretrained(tmp_path / "llama", safe_serialization=True)
    needed, plan = run_ranks(1, _plan, cfg, str(tmp_path / "llama"))[0]
    names = [n for _, group in plan for n in group]
    assert sorted(names) == sorted(needed)  # every model tensor exactly once
    size = {n: math.prod(s) for n, s in needed.items()}
    biggest = max(sum(size[n] for n in needed if n.startswith(p)) for p in
                  [f"decoder.layers.{i}." for i in range(lm.num_layers)] + ["embedding.word_embeddings.weight"])
    assert all(sum(size[n] for n in group) <= biggest for _, group in plan)
    # The LM layers come from the input, read group by group in the input's order.
    read = [g for groups, _ in plan for g in groups]
    assert [g for g in read if ".layers." in g] == [f"model.decoder.lm.model.layers.{i}." for i in range(lm.num_layers)]
