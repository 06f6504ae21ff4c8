"""Image checks and re-encoding for the shards: decode, reject bad input, resize, JPEG.

Emu2 preprocessing (emu2_spec.md §6) resizes straight to (448, 448) with bicubic filtering
(aspect ratio not kept, no crop); the shards store that size as JPEG, so the loader only decodes.

Colour: 16-bit greyscale (PIL modes ``I;16``, ``I;16B``, ``I;16L``, and ``I``, read as 0..65535)
is scaled to 8 bit (``round(v * 255 / 65535)``), not clipped; transparent pixels (an alpha
channel, or a palette/``tRNS`` transparency) are composited on a white ``BACKGROUND``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a clear reason instead of a bomb error

DEFAULT_MAX_PIXELS = 8192 * 8192
DEFAULT_MAX_BYTES = 64 * 2**20
JPEG_QUALITY = 95
BACKGROUND = (255, 255, 255)  # what transparent pixels become (web pages show them on white)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class SkipSample(Exception):
    """Raised for an input that is skipped; ``reason`` is the key in ``summary.json['skipped']``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def process_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Encoded image (JPEG/PNG/WebP/...) -> RGB ``size x size`` bicubic JPEG bytes.

    Raises ``SkipSample('image_too_large' | 'corrupt_image')``.
    """
    if len(data) > max_bytes:
        raise SkipSample("image_too_large", f"{len(data)} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise SkipSample("image_too_large", f"{w}x{h} pixels")
            im.load()
            return encode_rgb(to_rgb(im), size)
    except SkipSample:
        raise
    except MemoryError as e:
        raise SkipSample("image_too_large", f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - decoders of crafted bytes raise all kinds of errors
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None


def encode_rgb(im: Image.Image, size: int) -> bytes:
    """An RGB image -> ``size x size`` bicubic JPEG bytes (quality ``JPEG_QUALITY``, 4:4:4
    chroma): what the shards store for images and video frames alike."""
    out = io.BytesIO()
    im.resize((size, size), Image.BICUBIC).save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: 16-bit greyscale scaled to 8 bit, transparency composited on
    ``BACKGROUND``."""
    if im.mode in SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        grey = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
        key = im.info.get("transparency")
        if isinstance(key, int):  # tRNS of a 16-bit greyscale PNG: one transparent value
            grey.putalpha(Image.fromarray(np.where(wide == key, 0, 255).astype(np.uint8)))
        im = grey
    if im.mode == "RGB":
        return im
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
