"""Uniform frame sampling from an encoded video with PyAV: shared by preprocessing
(``data_tools/video.py``, which stores the frames as JPEG) and generation (``--video``).

Frame ``i`` of ``n`` is the decoded frame at index ``floor((2 i + 1) * total / (2 n))``: the
centre of the ``i``-th of ``n`` equal segments of the clip (a clip with fewer than ``n`` frames
repeats frames, so every video has ``n``). Decoding takes two passes over the container: the
first counts the video packets (demuxing only, no decoding), the second decodes and keeps the
sampled frames, so memory holds ``n`` frames, not the whole clip. Rotation metadata is not
applied (frames are kept as coded).
"""

from __future__ import annotations

import io

from PIL import Image

MAX_PACKETS = 30 * 3600  # an hour at 30 fps: a longer stream is not a clip


class VideoTooLarge(ValueError):
    """A stream with more than ``MAX_PACKETS`` frames."""


def sample_indices(total: int, n: int) -> list[int]:
    """The frame indices taken from a clip of ``total`` frames: segment centres, in order."""
    return [(2 * i + 1) * total // (2 * n) for i in range(n)]


def open_video(data: bytes):
    import av

    container = av.open(io.BytesIO(data), mode="r")
    if not container.streams.video:
        container.close()
        raise ValueError("no video stream")
    return container, container.streams.video[0]


def decode_frames(data: bytes, n: int) -> list[Image.Image]:
    """Encoded video -> the ``n`` sampled frames as RGB PIL images, in order (no resizing).

    Raises ``VideoTooLarge`` and the demuxer's / decoder's errors (crafted files raise anything).
    """
    container, stream = open_video(data)
    with container:
        total = sum(1 for p in container.demux(stream) if p.size)
    if total == 0:
        raise ValueError("the video stream has no frames")
    if total > MAX_PACKETS:
        raise VideoTooLarge(f"{total} frames")
    wanted = sample_indices(total, n)
    container, stream = open_video(data)
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
