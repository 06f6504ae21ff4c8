"""The loader on real preprocessed shards: layout, packing, DP sharding, exact resume, blending."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_emu.contracts import vocab as st
from megatron_emu.data.decode import CLIP_MEAN, CLIP_STD, decode_pil
from megatron_emu.data.loader import EmuDataLoader, LoaderSpec
from megatron_emu.data.plan import BlendedPlan, PackingSpec
from megatron_emu.data.shard_format import Document, load_index
from megatron_emu.data.sequence import build_sequence
from tests.helpers.datasets import IMAGE_SIZE

N_QUERY = 4


def spec_for(datasets, *names, weights=None, **kw) -> LoaderSpec:
    weights = weights or [1.0] * len(names)
    base = dict(seq_length=64, n_query=N_QUERY, image_size=IMAGE_SIZE, micro_batch_size=2,
                max_images=4, num_workers=0, seed=7, decoder="pil")
    base.update(kw)
    return LoaderSpec(paths=tuple((w, str(datasets[n][0])) for w, n in zip(weights, names)), **base)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def check_layout(batch, spec):
    tokens, labels, mask = batch.tokens, batch.labels, batch.loss_mask
    assert tokens.shape == labels.shape == mask.shape == (spec.micro_batch_size, spec.seq_length)
    assert (tokens[:, 0] == st.BOS_ID).all()
    assert (labels[:, :-1] == tokens[:, 1:]).all()
    assert (mask[labels == st.PAD_ID] == 0).all()
    assert (mask[(tokens == st.EOS_ID) & (labels == st.BOS_ID)] == 0).all()  # no cross-document target
    for row in tokens.tolist():
        full = row
        starts = [i for i, t in enumerate(full) if t == st.IMG_ID]
        assert len(starts) <= spec.max_images
        for s in starts:  # never split: [IMG] + n_query x <image> + [/IMG] (the last may be the label)
            block = full[s + 1: s + 1 + N_QUERY]
            assert block == [st.IMAGE_ID] * N_QUERY
        assert full.count(st.IMAGE_ID) == N_QUERY * len(starts)
    assert batch.images.shape == (int((tokens == st.IMG_ID).sum()), 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.images.dtype == torch.uint8
    from megatron_emu.contracts.batch import host_indices
    b = tokens.shape[0]
    sample, pos = np.nonzero(batch.reg_mask.numpy())
    rows = host_indices(tokens.numpy(), st.IMAGE_ID)["reg_rows"]
    assert sorted(rows.tolist()) == sorted((pos * b + sample).tolist())


@pytest.mark.parametrize("names", [("img2dataset",), ("mmc4",), ("laion", "obelics", "jsonl")])
def test_sequences_follow_the_emu2_layout(datasets, names):
    spec = spec_for(datasets, *names)
    loader = EmuDataLoader(spec)
    for batch in take(loader, 12):
        check_layout(batch, spec)


def test_images_come_from_the_documents(datasets):
    """Decoded pixels are the stored JPEGs, in [IMG] order."""
    import json

    from megatron_emu.data import shard_format as sf

    spec = spec_for(datasets, "mmc4", seq_length=128, micro_batch_size=1)
    batch = next(EmuDataLoader(spec))
    directory = datasets["mmc4"][0]
    meta, index = load_index(directory)
    ds, doc = map(int, batch.keys[0][0].split(":"))
    row = index[doc]
    members = sf.read_span(directory / meta["shards"][row[0]], int(row[1]), int(row[2]))
    order = [s["image"] for s in json.loads(members["json"])["segments"] if "image" in s]
    expected = [decode_pil(members[f"{i}.jpg"], IMAGE_SIZE) for i in order][: batch.images.shape[0]]
    assert batch.images.shape[0] >= 1
    assert np.array_equal(batch.images.numpy(), np.stack(expected))


def test_packing_keeps_images_whole_and_text_exact():
    """Pure packing rules on hand-made documents."""
    img = b"jpeg"
    a = Document("a", "interleaved", [("text", [10, 11]), ("image", img), ("text", [12])])
    b = Document("b", "pair", [("image", img), ("text", [20, 21, 22])])
    seq = build_sequence([(a, True), (b, False)], seq_length=24, n_query=2, max_images=8)
    I, M, E = st.IMG_ID, st.IMAGE_ID, st.IMG_END_ID
    full = [1, 10, 11, I, M, M, E, 12, 2, 1, 20, 21, 22, I, M, M, E, 2]
    assert seq.tokens.tolist()[:len(full)] == full
    assert seq.loss_mask.tolist()[8] == 0.0  # </s> of a -> <s> of b
    assert len(seq.images) == 2
    # No room for b's image (4 tokens) after its caption: dropped whole, text kept.
    seq = build_sequence([(a, True), (b, False)], seq_length=14, n_query=2, max_images=8)
    assert seq.tokens.tolist() == full[:13] + [st.EOS_ID] and len(seq.images) == 1
    # The per-sequence image cap.
    seq = build_sequence([(a, True), (b, True)], seq_length=24, n_query=2, max_images=1)
    assert (seq.tokens == I).sum() == 1 and len(seq.images) == 1


def test_pair_image_placement_is_a_fair_coin(datasets):
    def image_first_fraction(prob):
        loader = EmuDataLoader(spec_for(datasets, "img2dataset", image_first_prob=prob, seq_length=32,
                                        micro_batch_size=4))
        first = total = 0
        for batch in take(loader, 30):
            for row in batch.tokens.tolist():
                total += 1
                first += row[1] == st.IMG_ID
        return first / total
    assert 0.35 < image_first_fraction(0.5) < 0.65
    assert image_first_fraction(1.0) == 1.0
    assert image_first_fraction(0.0) == 0.0


def test_an_epoch_visits_every_document_once(datasets):
    _, index = load_index(datasets["img2dataset"][0])
    plan = BlendedPlan([index], [1.0], PackingSpec(seq_length=64, tokens_per_image=6, max_images=4,
                                                   seed=3, block=8), {})
    seen = []
    while not any(e == 1 for e, _ in seen):
        seen += plan.next()[1]
    epoch0 = sorted(d for e, d in seen if e == 0)
    assert epoch0 == list(range(len(index)))


def test_data_parallel_ranks_see_disjoint_documents(datasets):
    one = EmuDataLoader(spec_for(datasets, "img2dataset", micro_batch_size=4))
    ranks = [EmuDataLoader(spec_for(datasets, "img2dataset", micro_batch_size=2, dp_rank=r, dp_size=2))
             for r in range(2)]
    for _ in range(3):
        parts = [next(r) for r in ranks]
        whole = next(one)
        keys = [set(k for row in p.keys for k in row) for p in parts]
        assert not keys[0] & keys[1]
        assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
        assert torch.equal(torch.cat([p.images for p in parts]), whole.images)


@pytest.mark.parametrize("workers", [0, 2])
def test_save_and_restore_continue_exactly(datasets, workers):
    spec = spec_for(datasets, "img2dataset", "mmc4", num_workers=workers)
    loader = EmuDataLoader(spec)
    take(loader, 5)
    state = loader.state_dict()
    expected = take(loader, 4)
    resumed = EmuDataLoader(spec)
    resumed.load_state_dict(state)
    for a, b in zip(expected, take(resumed, 4)):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images) and a.keys == b.keys


def test_resume_under_another_data_parallel_size(datasets):
    ranks = [EmuDataLoader(spec_for(datasets, "mmc4", "img2dataset", dp_rank=r, dp_size=2)) for r in range(2)]
    for r in ranks:
        take(r, 3)
    assert ranks[0].state_dict() == ranks[1].state_dict() and ranks[0].consumed_sequences == 12
    single = EmuDataLoader(spec_for(datasets, "mmc4", "img2dataset", micro_batch_size=4))
    single.load_state_dict(ranks[0].state_dict())
    for _ in range(2):
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p.tokens for p in parts]), next(single).tokens)


def test_blend_follows_the_weights(datasets):
    loader = EmuDataLoader(spec_for(datasets, "img2dataset", "mmc4", weights=[3.0, 1.0], micro_batch_size=4))
    counts = [0, 0]
    for batch in take(loader, 50):
        for row in batch.keys:
            counts[int(row[0].split(":")[0])] += 1
    assert counts == [150, 50]


def test_restore_refuses_another_data_setup(datasets):
    loader = EmuDataLoader(spec_for(datasets, "mmc4"))
    take(loader, 2)
    other = EmuDataLoader(spec_for(datasets, "mmc4", seq_length=96))
    with pytest.raises(ValueError, match="seq_length"):
        other.load_state_dict(loader.state_dict())


def test_image_size_mismatch_is_a_clear_error(datasets):
    with pytest.raises(ValueError, match="preprocessed at 56 px"):
        EmuDataLoader(spec_for(datasets, "mmc4", image_size=448))


def test_model_batch_is_normalised_on_the_device(datasets):
    from megatron_emu.data.decode import normalize

    batch = next(EmuDataLoader(spec_for(datasets, "img2dataset")))
    model_batch = batch.to_batch([st.PAD_ID]).to(torch.device("cpu"), torch.float32, normalize=normalize)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(model_batch.images, (batch.images.float() / 255 - mean) / std)
    assert torch.equal(model_batch.tokens, batch.tokens)
