"""The streaming hf-to-mcore writer: fresh initialisation rules against the model's own, the
direct DCP writer against megatron-core's own save (same metadata, loads there exactly, its
checksums are the files'), coverage checks, and the work plan's bound."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from megatron_emu.checkpoint.fresh_init import fresh_tensor
from megatron_emu.checkpoint.stream_writer import MergeError, check_coverage
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


def _save_both_ways(rank: int, cfg, root: str) -> dict:
    """The model's sharded tensors saved by megatron-core (``ref``) and by the converter's
    direct writer (``ours``, at the layout ``layout.rank_targets`` derives from the config);
    ``ours`` is then loaded back through megatron-core."""
    from megatron.core import dist_checkpointing

    from megatron_emu.checkpoint import layout
    from megatron_emu.checkpoint.stream_writer import DcpWriter, finish
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.training import build
    from tests.helpers.mcore_targets import rank_targets

    init_distributed()
    chunks = build.model_chunks(cfg, build.process_groups(cfg))
    mcore = rank_targets(chunks)
    targets = [(sh, offsets, shape) for lst in mcore.values() for sh, offsets, shape in lst]
    ref, ours = Path(root) / "ref", Path(root) / "ours"
    if rank == 0:
        ref.mkdir(), ours.mkdir()
    torch.distributed.barrier()
    writer = DcpWriter(ours, rank)
    for name, derived in layout.rank_targets(cfg, rank, layout.full_shapes(cfg)).items():
        full = torch.zeros(mcore[name][0][2])  # the canonical tensor, holding this rank's shards
        for sh, offsets, _ in mcore[name]:
            full[tuple(slice(o, o + n) for o, n in zip(offsets, sh.data.shape))] = sh.data
        for t in derived:
            writer.add(t, t.offsets, full, full.dtype)
    written = finish(writer)
    request = {f"t{i}": dataclasses.replace(sh, data=torch.zeros_like(sh.data)) for i, (sh, _, _) in enumerate(targets)}
    expected = [sh.data.clone() for sh, _, _ in targets]
    dist_checkpointing.save({f"t{i}": sh for i, (sh, _, _) in enumerate(targets)}, str(ref))  # (reshapes sh.data)
    loaded = dist_checkpointing.load(request, str(ours))
    assert all(torch.equal(loaded[f"t{i}"], t) for i, t in enumerate(expected))
    return written


def _both_layouts(rank: int, cfg) -> tuple:
    """This rank's layout as megatron-core's ``sharded_state_dict`` gives it and as derived."""
    from megatron_emu.checkpoint import layout
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.training import build
    from tests.helpers.mcore_targets import described, rank_targets

    init_distributed()
    mcore = rank_targets(build.model_chunks(cfg, build.process_groups(cfg), meta=True))
    shapes = layout.full_shapes(cfg)
    ours = {n: sorted((t.key, t.global_shape, t.global_offset, t.shape, t.offsets, t.prepend_axis_num, t.main)
                      for t in lst) for n, lst in layout.rank_targets(cfg, rank, shapes).items()}
    return described(mcore), ours, {n: lst[0][2] for n, lst in mcore.items()}, shapes


CHAT = ("model.model_version=chat", "model.lm.vocab_size=32274", "model.vision.image_size=448",
        "model.adapter.n_query=256")


@pytest.mark.parametrize("tp,pp,extra", [(1, 1, ()), (2, 2, ()), (2, 1, ("model.lm.num_query_groups=2",)),
                                         (1, 2, CHAT)],
                         ids=["tp1pp1", "tp2pp2", "gqa", "chat"])
def test_layout_derived_from_the_config_is_megatron_cores(tp, pp, extra):
    cfg = tiny_config(tp=tp, pp=pp, sp=tp > 1, extra=extra)
    shapes = {}
    for rank, (mcore, ours, full, derived) in enumerate(run_ranks(tp * pp, _both_layouts, cfg)):
        assert ours == mcore, f"rank {rank}: {set(ours) ^ set(mcore) or [n for n in ours if ours[n] != mcore[n]][:3]}"
        shapes.update(full)
    assert derived == shapes and len(shapes) > 20


def _layout(path: Path) -> tuple:
    from megatron_emu.checkpoint.safe_pickle import read_dcp_metadata

    md = read_dcp_metadata(path / ".metadata")
    tensors = {k: (tuple(v.size), v.properties, sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks))
               for k, v in md.state_dict_metadata.items()}
    return tensors, sorted((i.fqn, tuple(i.offset), i.index) for i in md.storage_data), md.version


@pytest.mark.parametrize("tp", [1, 2])
def test_direct_writer_writes_the_metadata_megatron_core_writes_and_loads_there(tmp_path, tp):
    from megatron_emu.checkpoint import integrity

    cfg = tiny_config(tp=tp, sp=tp > 1)
    written = run_ranks(tp, _save_both_ways, cfg, str(tmp_path))[0]
    ref, ours = _layout(tmp_path / "ref"), _layout(tmp_path / "ours")
    assert ours == ref and len(ref[0]) > 20
    for name in ("metadata.json", "common.pt"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "ours").glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(tp)]
    # The checksums taken as the items were written are those of the files.
    integrity.build(tmp_path / "ours", known=written)
    manifest = integrity.Manifest(tmp_path / "ours")
    for name, entry in written.items():
        assert entry == integrity.hash_file(tmp_path / "ours" / name, [(o, n) for o, n, _ in entry["blocks"]])
        assert manifest.files[name] == {"size": entry["size"], "blocks": [tuple(b) for b in entry["blocks"]]}


def test_metadata_pickles_as_dcps_own_objects():
    """``dcp_metadata``'s stand-ins pickle to the bytes DCP's own classes do (as ``finish`` did
    with them), and unpickle to equal objects."""
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties, TensorStorageMetadata)

    from megatron_emu.checkpoint import dcp_metadata

    items = [("__0_0.distcp", "a", (2, 4), torch.float32, (0, 0), (1, 4), 0, 100),
             ("__1_0.distcp", "a", (2, 4), torch.float32, (1, 0), (1, 4), 0, 90),
             ("__0_0.distcp", "decoder.layers.b", (3, 8), torch.bfloat16, (0, 0), (3, 8), 100, 64)]
    tensors, storage = {}, {}
    for name, key, size, dtype, offsets, sizes, start, length in items:
        tmd = tensors.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(size), []))
        tmd.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        storage[MetadataIndex(key, torch.Size(offsets))] = _StorageInfo(name, start, length)
    real = Metadata(tensors, storage_data=storage, version="1.0.0",
                    storage_meta=StorageMeta(checkpoint_id="/x/ckpt", save_id="id"))
    ours = dcp_metadata.dumps(items, "/x/ckpt", "id")
    assert ours == pickle.dumps(real)
    assert pickle.loads(ours) == real


def test_chunks_that_do_not_cover_a_tensor_are_refused():
    def tensor(*chunks):
        return {"w": ((4, 2), list(chunks))}

    check_coverage(tensor(((0, 0), (2, 2)), ((2, 0), (2, 2))))
    with pytest.raises(MergeError, match="cover"):
        check_coverage(tensor(((0, 0), (2, 2))))
    with pytest.raises(MergeError, match="overlaps"):
        check_coverage(tensor(((0, 0), (2, 2)), ((3, 0), (2, 2))))


def _plan(rank: int, cfg, llama: str) -> tuple:
    from megatron_emu.checkpoint import layout
    from megatron_emu.checkpoint.convert import LM_PREFIXES
    from megatron_emu.checkpoint.hf_mapping import Dims
    from megatron_emu.checkpoint.hf_source import CanonicalSource

    needed = layout.full_shapes(cfg)
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
    needed, plan = _plan(0, cfg, str(tmp_path / "llama"))
    names = [n for _, group in plan for n in group]
    assert sorted(names) == sorted(needed)  # every model tensor exactly once
    size = {n: math.prod(s) for n, s in needed.items()}
    biggest = max(sum(size[n] for n in needed if n.startswith(p)) for p in
                  [f"decoder.layers.{i}." for i in range(lm.num_layers)] + ["embedding.word_embeddings.weight"])
    assert all(sum(size[n] for n in group) <= biggest for _, group in plan)
    # The LM layers come from the input, read group by group in the input's order.
    read = [g for groups, _ in plan for g in groups]
    assert [g for g in read if ".layers." in g] == [f"model.decoder.lm.model.layers.{i}." for i in range(lm.num_layers)]
