"""Video frames for the shards: decode with PyAV, sample uniformly, resize and JPEG like images.

Emu2 (emu2_spec.md §1.7, §6) feeds a video as ``n`` frames sampled uniformly (8 in
pretraining), each preprocessed like an image. Frame ``i`` of ``n`` is the decoded frame at
index ``floor((2 i + 1) * total / (2 n))``: the centre of the ``i``-th of ``n`` equal segments of
the clip (a clip with fewer than ``n`` frames repeats frames, so every video has ``n``).

Decoding takes two passes over the container: the first counts the video packets (demuxing
only, no decoding), the second decodes and keeps the sampled frames, so memory holds ``n``
frames, not the whole clip. Rotation metadata is not applied (frames are stored as coded).
"""

from __future__ import annotations

import io

from PIL import Image

from data_tools.images import DEFAULT_MAX_PIXELS, SkipSample, encode_rgb

DEFAULT_FRAMES = 8
DEFAULT_MAX_VIDEO_BYTES = 1024 * 2**20
MAX_PACKETS = 30 * 3600  # an hour at 30 fps: a longer stream is not a clip
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


def sample_indices(total: int, n: int) -> list[int]:
    """The frame indices taken from a clip of ``total`` frames: segment centres, in order."""
    return [(2 * i + 1) * total // (2 * n) for i in range(n)]


def _open(data: bytes):
    import av

    container = av.open(io.BytesIO(data), mode="r")
    if not container.streams.video:
        container.close()
        raise ValueError("no video stream")
    return container, container.streams.video[0]


def decode_frames(data: bytes, n: int) -> list[Image.Image]:
    """Encoded video -> the ``n`` sampled frames as RGB PIL images, in order (no resizing).

    Raises the decoder's errors; ``process_video`` turns them into ``SkipSample``.
    """
    container, stream = _open(data)
    with container:
        total = sum(1 for p in container.demux(stream) if p.size)
    if total == 0:
        raise ValueError("the video stream has no frames")
    if total > MAX_PACKETS:
        raise SkipSample("video_too_large", f"{total} frames")
    wanted = sample_indices(total, n)
    container, stream = _open(data)
    picked: dict[int, Image.Image] = {}
    with container:
        for i, frame in enumerate(container.decode(stream)):
            if i > wanted[-1]:
                break
            if i in wanted:
                picked[i] = frame.to_image()  # RGB
    missing = [i for i in wanted if i not in picked]
    if missing:
        raise ValueError(f"frame {missing[0]} of {total} does not decode")
    return [picked[i] for i in wanted]


def process_video(data: bytes, n: int, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_bytes: int = DEFAULT_MAX_VIDEO_BYTES) -> list[bytes]:
    """Encoded video (mp4, webm, ...) -> ``n`` JPEG frames of ``size x size`` (``encode_rgb``).

    Raises ``SkipSample('video_too_large' | 'corrupt_video')``.
    """
    if len(data) > max_bytes:
        raise SkipSample("video_too_large", f"{len(data)} bytes")
    try:
        container, stream = _open(data)
        with container:
            w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise SkipSample("video_too_large", f"{w}x{h} pixels")
        return [encode_rgb(im, size) for im in decode_frames(data, n)]
    except SkipSample:
        raise
    except MemoryError as e:
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
