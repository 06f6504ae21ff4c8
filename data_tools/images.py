"""Image checks and re-encoding for the shards: decode, reject bad input, resize, JPEG.

Emu2 preprocessing (emu2_spec.md §6) resizes straight to (448, 448) with bicubic filtering
(aspect ratio not kept, no crop); the shards store that size as JPEG, so the loader only decodes.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a clear reason instead of a bomb error

DEFAULT_MAX_PIXELS = 8192 * 8192
DEFAULT_MAX_BYTES = 64 * 2**20
JPEG_QUALITY = 95


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
            if im.mode != "RGB":
                im = im.convert("RGBA").convert("RGB") if "A" in im.getbands() or im.mode == "P" \
                    else im.convert("RGB")
            im = im.resize((size, size), Image.BICUBIC)
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4 chroma
            return out.getvalue()
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
