"""Image conversion for the shards: 16-bit greyscale is scaled (not clipped to white) and
transparency is composited on the documented white background. Real photos shipped in
scikit-image, re-encoded as the files web crawls contain."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_tools.images import BACKGROUND, process_image
from data_tools.samples import load_photo

SIZE = 64


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return np.asarray(load_photo("camera").convert("L"))  # 8-bit greyscale photo


def sixteen_bit(camera: np.ndarray, mode: str) -> bytes:
    """The photo at 16 bit (v * 257: 0..255 -> 0..65535), as the file type that loads in ``mode``:
    PNG (``I;16``), big-endian TIFF (``I;16B``), 16-bit PGM (``I``)."""
    wide = camera.astype(np.uint16) * 257
    if mode == "I;16":
        data = encode(Image.fromarray(wide), "PNG")
    elif mode == "I;16B":
        data = encode(Image.frombytes("I;16B", wide.shape[::-1], wide.astype(">u2").tobytes()), "TIFF")
    else:
        data = encode(Image.fromarray(wide), "PPM")
    assert Image.open(io.BytesIO(data)).mode == mode
    return data


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_greyscale_is_scaled_to_eight_bit(camera, mode):
    out = pixels(process_image(sixteen_bit(camera, mode), SIZE))
    reference = pixels(process_image(encode(Image.fromarray(camera), "PNG"), SIZE))
    assert out.mean() < 200  # clipping made it white (mean ~254)
    np.testing.assert_array_equal(out, reference)


def test_sixteen_bit_png_with_a_transparent_value(camera):
    wide = camera.astype(np.uint16) * 257
    wide[:, : wide.shape[1] // 2] = 1234  # the left half is the transparent key
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG", transparency=1234)
    out = pixels(process_image(buf.getvalue(), SIZE))
    assert np.abs(out[:, : SIZE // 2 - 4] - 255).mean() < 1
    reference = pixels(process_image(encode(Image.fromarray(camera), "PNG"), SIZE))
    assert np.abs(out[:, SIZE // 2 + 4:] - reference[:, SIZE // 2 + 4:]).mean() < 2


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode):
    photo = load_photo("astronaut").convert("RGB")
    w, h = photo.size
    alpha = np.full((h, w), 255, dtype=np.uint8)
    alpha[:, : w // 2] = 0  # left half fully transparent
    if mode == "P":
        im = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
        idx = np.asarray(im).copy()
        idx[:, : w // 2] = 255  # an unused palette entry marked transparent
        palette = (im.getpalette() + [0] * 768)[:768]  # 256 entries: 255 is black, transparent
        im = Image.fromarray(idx)
        im.putpalette(palette)  # L -> P with the photo's palette
        im.info["transparency"] = 255
        data = encode(im, "PNG")
        assert "transparency" in Image.open(io.BytesIO(data)).info
    else:
        base = photo if mode == "RGBA" else photo.convert("L")
        im = base.copy()
        im.putalpha(Image.fromarray(alpha))
        data = encode(im, "PNG")
    out = pixels(process_image(data, SIZE))
    left, right = out[:, : SIZE // 2 - 4], out[:, SIZE // 2 + 4:]
    assert np.abs(left - np.asarray(BACKGROUND, dtype=np.float32)).mean() < 1  # JPEG ringing only
    expected = pixels(process_image(encode(photo if mode != "LA" else photo.convert("L"), "PNG"), SIZE))
    assert np.abs(right - expected[:, SIZE // 2 + 4:]).mean() < 6  # the opaque half is the photo

