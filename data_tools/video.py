"""Video frames for the shards: decode with PyAV, sample uniformly, resize and JPEG like images.

Emu2 (emu2_spec.md §1.7, §6) feeds a video as ``n`` frames sampled uniformly (8 in
pretraining), each preprocessed like an image. The sampling (``megatron_emu/data/video.py``) is
shared with ``megatron-emu-generate --video``.
"""

from __future__ import annotations

import io

from PIL import Image

from data_tools.images import DEFAULT_MAX_PIXELS, SkipSample, encode_rgb
from megatron_emu.data.video import VideoTooLarge, decode_frames, open_video

DEFAULT_FRAMES = 8
DEFAULT_MAX_VIDEO_BYTES = 1024 * 2**20
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


def process_video(data: bytes, n: int, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_bytes: int = DEFAULT_MAX_VIDEO_BYTES) -> list[bytes]:
    """Encoded video (mp4, webm, ...) -> ``n`` JPEG frames of ``size x size`` (``encode_rgb``).

    Raises ``SkipSample('video_too_large' | 'corrupt_video')``.
    """
    if len(data) > max_bytes:
        raise SkipSample("video_too_large", f"{len(data)} bytes")
    try:
        container, stream = open_video(data)
        with container:
            w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise SkipSample("video_too_large", f"{w}x{h} pixels")
        return [encode_rgb(im, size) for im in decode_frames(data, n)]
    except SkipSample:
        raise
    except (VideoTooLarge, MemoryError) as e:
        raise SkipSample("video_too_large", f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - demuxers/decoders of crafted bytes raise all kinds of errors
        raise SkipSample("corrupt_video", f"{type(e).__name__}: {e}") from None


def encode_video(frames: list[Image.Image], fps: int = 8) -> bytes:
    """RGB frames (equal sizes, even sides) -> H.264 mp4 bytes (for sample data and tests)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "threads": "1"}
        for im in frames:
            for packet in stream.encode(av.VideoFrame.from_image(im)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
