"""Sequence layout, masks, placeholder scatter and pooling (pure functions, no process group)."""

import numpy as np
import pytest
import torch

from megatron_emu.contracts import batch
from megatron_emu.contracts import vocab as st
from megatron_emu.model import multimodal
from megatron_emu.model.adapter import pool_patches

IMG, IMAGE, END, PAD = st.IMG_ID, st.IMAGE_ID, st.IMG_END_ID, st.PAD_ID


def test_special_token_ids_match_emu2():
    assert st.EMU2_VOCAB_SIZE == 32272
    expected = {"[PAD]": 32000, "[IMG]": 32001, "[/IMG]": 32002, "<image>": 32003, "[gIMG]": 32004,
                "[/gIMG]": 32005, "[EOC]": 32006, "[VIDEO]": 32007, "<grounding>": 32008,
                "<phrase>": 32009, "</phrase>": 32010, "<object>": 32011, "</object>": 32012,
                "</delimiter_of_multi_objects/>": 32013, "<REC>": 32014,
                "<patch_index_0000>": 32015, "<patch_index_0256>": 32271}
    assert {k: st.TOKEN_IDS[k] for k in expected} == expected
    with pytest.raises(KeyError, match="unknown special token"):
        st.token_id("[NOPE]")


def _rows(sample_pos, b):  # (sample, position) pairs -> rows of the [s * b, h] view
    return [t * b + i for i, t in sample_pos]


def test_regression_positions_are_img_and_first_n_minus_1_images():
    # <s> [IMG] <image>x4 [/IMG] 5 6 </s> ; n_query = 4
    tokens = np.array([[1, IMG, IMAGE, IMAGE, IMAGE, IMAGE, END, 5, 6, 2]])
    idx = batch.host_indices(tokens, IMAGE)
    assert idx["reg_rows"].tolist() == [1, 2, 3, 4]
    assert idx["reg_features"].tolist() == [0, 1, 2, 3]  # position t predicts the embedding at t + 1
    assert idx["image_rows"].tolist() == [2, 3, 4, 5]


def test_feature_order_is_row_major_across_the_batch():
    tokens = np.array([[1, IMG, IMAGE, IMAGE, END, 7],
                       [IMG, IMAGE, IMAGE, END, IMG, IMAGE]])
    idx = batch.host_indices(tokens, IMAGE)
    # embeddings 0, 1 in sample 0 (positions 2, 3), 2, 3, 4 in sample 1 (positions 1, 2, 5)
    assert idx["image_rows"].tolist() == _rows([(0, 2), (0, 3), (1, 1), (1, 2), (1, 5)], b=2)
    assert idx["reg_rows"].tolist() == _rows([(0, 1), (0, 2), (1, 0), (1, 1), (1, 4)], b=2)
    assert idx["reg_features"].tolist() == [0, 1, 2, 3, 4]
    assert all(a.dtype == np.int64 for a in idx.values())


def test_ce_mask_drops_padding_and_ignored_labels():
    labels = np.array([[IMG, IMAGE, END, 5, PAD, 2]])
    loss_mask = np.array([[1, 1, 1, 1, 1, 0]], dtype=np.float32)
    assert batch.ce_mask(labels, loss_mask, [PAD, IMG, END, IMAGE]).tolist() == [[0, 0, 0, 1, 0, 0]]


def test_make_batch_holds_host_tensors_and_moves_them():
    tokens = torch.tensor([[1, IMG, IMAGE, IMAGE, END, 7]])
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    b = batch.make_batch(tokens, torch.roll(tokens, -1, 1), torch.ones(1, 6), images,
                         image_id=IMAGE, ce_ignore_ids=[IMAGE])
    assert b.ce_mask.tolist() == [[1, 0, 0, 1, 1, 1]] and b.num_images == 1
    moved = b.to(torch.device("cpu"), torch.float32, normalize=lambda x, dt: x.to(dt) / 255)
    assert moved.images.dtype == torch.float32 and moved.images.max() == 1.0
    only = b.only(batch.LAST_STAGE_FIELDS)
    assert only.tokens is None and only.images is None and torch.equal(only.labels, b.labels)


def test_pinning_keeps_images_already_on_a_device():
    """DALI decodes on the GPU: pinning the host fields must keep those images (a meta tensor
    stands in for a GPU one here)."""
    on_device = torch.empty(2, 3, 4, 4, dtype=torch.uint8, device="meta")
    b = batch.Emu2Batch(tokens=None, labels=None, ce_mask=None, images=on_device, image_rows=None,
                        reg_rows=None, reg_features=None)
    assert b.pin_memory().images is on_device and b.pin_memory().num_images == 2


def test_scatter_places_visual_embeddings_in_row_major_order():
    tokens = np.array([[5, IMAGE, IMAGE], [IMAGE, 6, 7]])
    rows = torch.from_numpy(batch.host_indices(tokens, IMAGE)["image_rows"])
    emb = torch.zeros(3, 2, 4)  # [s, b, h]
    visual = torch.arange(12, dtype=torch.float).view(3, 4) + 1
    out = multimodal.scatter_image_embeddings(emb, rows, visual)
    assert torch.equal(out[1, 0], visual[0]) and torch.equal(out[2, 0], visual[1])
    assert torch.equal(out[0, 1], visual[2])
    assert out[0, 0].abs().sum() == 0 and out[1, 1].abs().sum() == 0
    with pytest.raises(ValueError, match="3 <image> tokens but 2 visual embeddings"):
        multimodal.scatter_image_embeddings(emb, rows, visual[:2])


def test_pooling_averages_blocks_in_raster_order():
    grid = torch.arange(16, dtype=torch.float).view(1, 16, 1)  # 4x4 patches, width 1
    pooled = pool_patches(grid, n_query=4)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    # Emu2 numbers: 32x32 patches -> 8x8 = 64 tokens (kernel 4).
    feats = torch.randn(2, 1024, 8)
    out = pool_patches(feats, 64)
    assert out.shape == (2, 64, 8)
    block = feats[0].view(32, 32, 8)[:4, 4:8].mean(dim=(0, 1))
    assert torch.allclose(out[0, 1], block, atol=1e-6)
    with pytest.raises(ValueError):
        pool_patches(torch.randn(1, 16, 1), n_query=9)
