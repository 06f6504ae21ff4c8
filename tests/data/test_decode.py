"""Decoder paths agree: PIL (workers) and DALI (CPU here, nvJPEG on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_emu.data import decode
from megatron_emu.data.loader import EmuDataLoader
from tests.data.test_loader import spec_for, take

dali = pytest.mark.skipif(not decode.dali_available(), reason="NVIDIA DALI is not installed")


@dali
def test_dali_cpu_matches_pil_in_the_loader(datasets):
    pil = EmuDataLoader(spec_for(datasets, "mmc4", "img2dataset", decoder="pil", num_workers=1))
    dal = EmuDataLoader(spec_for(datasets, "mmc4", "img2dataset", decoder="dali_cpu", num_workers=1))
    for a, b in zip(take(pil, 6), take(dal, 6)):
        assert torch.equal(a.tokens, b.tokens)
        diff = (a.images.int() - b.images.int()).abs()
        assert a.images.shape == b.images.shape and b.images.dtype == torch.uint8
        assert diff.max() <= 8 and diff.float().mean() < 0.5  # JPEG decoder tolerance


@pytest.mark.gpu
@dali
def test_dali_gpu_matches_pil(datasets):
    pil = EmuDataLoader(spec_for(datasets, "mmc4", decoder="pil"))
    gpu = EmuDataLoader(spec_for(datasets, "mmc4", decoder="dali"))
    for a, b in zip(take(pil, 4), take(gpu, 4)):
        assert b.images.is_cuda
        diff = (a.images.int() - b.images.cpu().int()).abs()
        assert diff.max() <= 8 and diff.float().mean() < 1.0


def test_decoder_choice_is_checked():
    with pytest.raises(ValueError, match="data.decoder"):
        decode.resolve_decoder("turbo")
    if not torch.cuda.is_available():
        assert decode.resolve_decoder("auto") == "pil"
        if decode.dali_available():
            with pytest.raises(ValueError, match="GPU"):
                decode.resolve_decoder("dali")


def test_pil_decode_resizes_only_when_needed(datasets):
    import io

    from PIL import Image

    img = Image.fromarray(np.arange(56 * 56 * 3, dtype=np.uint8).reshape(56, 56, 3) % 251)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    assert decode.decode_pil(buf.getvalue(), 56).shape == (3, 56, 56)
    assert decode.decode_pil(buf.getvalue(), 28).shape == (3, 28, 28)
