"""The video block in sequences and batches: exact token ids, a video kept whole (or dropped
whole), the host-computed embedding/regression indices, and the loader on real video shards
(layout, blending with image data, exact resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_tools.preprocess import Options, run
from megatron_emu.contracts import image_layout
from megatron_emu.contracts.batch import ce_mask, host_indices
from megatron_emu.data.loader import EmuDataLoader, LoaderSpec
from megatron_emu.data.shard_format import Document
from megatron_emu.data.sequence import build_sequence
from tests.helpers.datasets import IMAGE_SIZE

PAD, BOS, EOS, IMG, END, IMAGE, GIMG, VIDEO = 32000, 1, 2, 32001, 32002, 32003, 32004, 32007
F0, F1, F2, P = b"frame0", b"frame1", b"frame2", b"photo"


def test_video_sequence_has_the_exact_emu2_ids():
    """<s> text [VIDEO] ([IMG] [gIMG] x n_query [/IMG]) x frames text </s>, frames in order."""
    doc = Document("d", "interleaved", [("text", [5, 6]), ("video", [F0, F1]), ("text", [7])])
    seq = build_sequence([(doc, True)], seq_length=16, n_query=2, max_images=8)
    full = [BOS, 5, 6, VIDEO, IMG, GIMG, GIMG, END, IMG, GIMG, GIMG, END, 7, EOS, PAD, PAD, PAD]
    assert seq.tokens.tolist() == full[:-1] and seq.labels.tolist() == full[1:]
    assert seq.images == [F0, F1]
    assert seq.loss_mask.tolist() == [1.0] * 13 + [0.0] * 3
    # a WebVid pair: the video after its caption (image_first False), or before it
    pair = Document("p", "pair", [("video", [F0, F1, F2]), ("text", [9, 10])])
    frame = [IMG, GIMG, END]
    last = build_sequence([(pair, False)], seq_length=15, n_query=1, max_images=8)
    assert last.tokens.tolist() + [last.labels.tolist()[-1]] == [BOS, 9, 10, VIDEO, *frame * 3, EOS, PAD, PAD]
    first = build_sequence([(pair, True)], seq_length=15, n_query=1, max_images=8)
    assert first.tokens.tolist() + [first.labels.tolist()[-1]] == [BOS, VIDEO, *frame * 3, 9, 10, EOS, PAD, PAD]
    assert image_layout.tokens_per_video(3, 1) == 10 == len(image_layout.video_block(3, 1))


def test_a_video_is_dropped_whole_over_the_image_cap_or_the_room():
    doc = Document("d", "interleaved", [("image", P), ("text", [5]), ("video", [F0, F1]), ("text", [7])])
    capped = build_sequence([(doc, True)], seq_length=16, n_query=1, max_images=2)  # 1 image + 2 frames > 2
    assert capped.images == [P]
    assert capped.tokens.tolist()[:7] == [BOS, IMG, IMAGE, END, 5, 7, EOS]
    short = build_sequence([(doc, True)], seq_length=9, n_query=1, max_images=8)  # 7 video tokens, 5 left
    assert short.images == [P] and short.tokens.tolist()[:7] == [BOS, IMG, IMAGE, END, 5, 7, EOS]
    fits = build_sequence([(doc, True)], seq_length=13, n_query=1, max_images=3)
    assert fits.images == [P, F0, F1] and VIDEO in fits.tokens.tolist()


def test_frame_slots_take_visual_embeddings_and_regression_follows_the_switch():
    doc = Document("d", "interleaved", [("image", P), ("video", [F0, F1]), ("text", [7])])
    seq = build_sequence([(doc, True)], seq_length=16, n_query=2, max_images=8)
    tokens = np.stack([seq.tokens, seq.tokens])  # b = 2
    # positions: 0 <s>, 1 [IMG], 2-3 <image>, 4 [/IMG], 5 [VIDEO], 6 [IMG], 7-8 [gIMG], 9 [/IMG],
    # 10 [IMG], 11-12 [gIMG], 13 [/IMG], 14 text, 15 </s>
    slots = [2, 3, 7, 8, 11, 12]
    off = host_indices(tokens, IMAGE, GIMG, regress_video=False)
    assert off["image_rows"].tolist() == [p * 2 + i for i in (0, 1) for p in slots]
    assert off["reg_rows"].tolist() == [1 * 2 + 0, 2 * 2 + 0, 1 * 2 + 1, 2 * 2 + 1]
    assert off["reg_features"].tolist() == [0, 1, 6, 7]
    on = host_indices(tokens, IMAGE, GIMG, regress_video=True)
    assert on["image_rows"].tolist() == off["image_rows"].tolist()
    rows = [1, 2, 6, 7, 10, 11]  # the position before each slot
    assert on["reg_rows"].tolist() == [p * 2 + i for i in (0, 1) for p in rows]
    assert on["reg_features"].tolist() == list(range(12))
    # cross-entropy: the video tokens follow the image tokens' setting
    names = image_layout.ce_ignore_names(["[PAD]", "[IMG]", "[/IMG]", "<image>"])
    assert names == ["[PAD]", "[IMG]", "[/IMG]", "<image>", "[gIMG]", "[VIDEO]"]
    assert image_layout.ce_ignore_names(["[PAD]"]) == ["[PAD]"]
    mask = ce_mask(seq.labels[None], seq.loss_mask[None], [PAD, IMG, END, IMAGE, GIMG, VIDEO])[0]
    assert np.nonzero(mask)[0].tolist() == [13, 14]  # [/IMG] -> text, text -> </s>


N_QUERY, FRAMES = 2, 3


@pytest.fixture(scope="module")
def video_data(samples, tokenizer_dir, datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("webvid3")
    run(Options(format="webvid", tokenizer=str(tokenizer_dir), out=str(out), progress=False,
                inputs=[str(samples / "webvid" / "results.csv")], images=str(samples / "webvid" / "videos"),
                image_size=IMAGE_SIZE, video_frames=FRAMES))
    return {"webvid": out, "mmc4": datasets["mmc4"][0]}


def _spec(data, **kw) -> LoaderSpec:
    base = dict(paths=((1.0, str(data["webvid"])), (1.0, str(data["mmc4"]))), seq_length=48, n_query=N_QUERY,
                image_size=IMAGE_SIZE, micro_batch_size=2, max_images=6, num_workers=0, seed=3, decoder="pil")
    return LoaderSpec(**{**base, **kw})


def test_loader_keeps_videos_whole_beside_images(video_data):
    loader = EmuDataLoader(_spec(video_data))
    videos = 0
    for _ in range(6):
        batch = next(loader)
        n_slots = 0
        for row in batch.tokens.tolist():
            for s in (i for i, t in enumerate(row) if t == VIDEO):
                block = row[s: s + image_layout.tokens_per_video(FRAMES, N_QUERY)]
                assert block == image_layout.video_block(FRAMES, N_QUERY)[: len(block)]
                assert len(block) == image_layout.tokens_per_video(FRAMES, N_QUERY) or s + len(block) == len(row)
                videos += 1
            assert row.count(IMG) <= 6
            n_slots += row.count(IMAGE) + row.count(GIMG)
        assert batch.images.shape[0] == int((batch.tokens == IMG).sum())  # images and frames
        model = batch.to_batch([PAD, IMG, END, IMAGE, GIMG, VIDEO])
        assert model.image_rows.numel() == n_slots == batch.images.shape[0] * N_QUERY
        b = batch.tokens.shape[0]
        following = batch.tokens[model.reg_rows % b, model.reg_rows // b + 1]
        assert (following == IMAGE).all()  # model.regress_video_frames off: frames not regressed
    assert videos >= 4


def test_resume_with_videos_is_exact(video_data):
    spec = _spec(video_data)
    loader = EmuDataLoader(spec)
    [next(loader) for _ in range(3)]
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = EmuDataLoader(spec)
    resumed.load_state_dict(state)
    for a in expected:
        b = next(resumed)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images) and a.keys == b.keys
    assert any(VIDEO in a.tokens.tolist()[0] + a.tokens.tolist()[1] for a in expected)


def test_videos_longer_than_the_image_cap_are_a_clear_error(video_data):
    with pytest.raises(ValueError, match=r"its videos have 3 frames but data.max_images_per_sequence is 2"):
        EmuDataLoader(_spec(video_data, max_images=2))
    EmuDataLoader(_spec({**video_data, "webvid": video_data["mmc4"]}, max_images=0))  # no videos: fine
