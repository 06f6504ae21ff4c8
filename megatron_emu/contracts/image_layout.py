"""The image block contract: how an image sits in a token sequence.

An image is ``[IMG]`` + ``<image>`` x n_query + ``[/IMG]`` (Emu2): the data layer writes these
tokens, the model replaces the ``<image>`` embeddings by the image's ``n_query`` visual
embeddings (in order) and regresses the next visual embedding at every position followed by
``<image>``; a text prompt marks each image with one ``<image>`` placeholder, expanded to the
block.

A video is ``[VIDEO]`` once, then per frame ``[IMG]`` + ``[gIMG]`` x n_query + ``[/IMG]``
(emu2_spec.md §1.7): its frames are encoded like images and their visual embeddings replace the
``[gIMG]`` slots. Images and frames share one embedding order (the order of their slots).
Whether frame embeddings are regressed is ``model.regress_video_frames``. For cross-entropy the
video tokens follow the image tokens (``ce_ignore_names``). A text prompt marks a video with one
``<video>`` placeholder.
"""

from __future__ import annotations

from megatron_emu.contracts import vocab

# The token a visual embedding replaces, and the placeholder of an image in a text prompt.
PLACEHOLDER = vocab.IMAGE
PLACEHOLDER_ID = vocab.IMAGE_ID
# The token a video frame's visual embedding replaces, and the placeholder of a video in a prompt.
VIDEO_SLOT_ID = vocab.GIMG_ID
VIDEO_PLACEHOLDER = "<video>"


def tokens_per_image(n_query: int) -> int:
    """``[IMG]`` + ``<image>`` x n_query + ``[/IMG]``."""
    return n_query + 2


def image_block(n_query: int) -> list[int]:
    """The token ids of one image: ``[IMG_ID, IMAGE_ID x n_query, IMG_END_ID]``."""
    return [vocab.IMG_ID] + [vocab.IMAGE_ID] * n_query + [vocab.IMG_END_ID]


def tokens_per_video(n_frames: int, n_query: int) -> int:
    """``[VIDEO]`` + n_frames x (``[IMG]`` + ``[gIMG]`` x n_query + ``[/IMG]``)."""
    return 1 + n_frames * tokens_per_image(n_query)


def video_block(n_frames: int, n_query: int) -> list[int]:
    """The token ids of one video of ``n_frames`` frames."""
    frame = [vocab.IMG_ID] + [vocab.GIMG_ID] * n_query + [vocab.IMG_END_ID]
    return [vocab.VIDEO_ID] + frame * n_frames


def ce_ignore_names(names: list[str]) -> list[str]:
    """``model.loss.ce_ignore_tokens`` extended to the video block: ``[gIMG]`` is ignored with
    ``<image>`` (both are visual slots), ``[VIDEO]`` with ``[IMG]`` (both announce visual input)."""
    out = list(names)
    for image_token, video_token in ((vocab.IMAGE, vocab.GIMG), (vocab.IMG, vocab.VIDEO)):
        if image_token in out and video_token not in out:
            out.append(video_token)
    return out
