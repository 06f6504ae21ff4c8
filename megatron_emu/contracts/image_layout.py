"""The image block contract: how an image sits in a token sequence.

An image is ``[IMG]`` + ``<image>`` x n_query + ``[/IMG]`` (Emu2): the data layer writes these
tokens, the model replaces the ``<image>`` embeddings by the image's ``n_query`` visual
embeddings (in order) and regresses the next visual embedding at every position followed by
``<image>``; a text prompt marks each image with one ``<image>`` placeholder, expanded to the
block.
"""

from __future__ import annotations

from megatron_emu.contracts import vocab

# The token a visual embedding replaces, and the placeholder of an image in a text prompt.
PLACEHOLDER = vocab.IMAGE
PLACEHOLDER_ID = vocab.IMAGE_ID


def tokens_per_image(n_query: int) -> int:
    """``[IMG]`` + ``<image>`` x n_query + ``[/IMG]``."""
    return n_query + 2


def image_block(n_query: int) -> list[int]:
    """The token ids of one image: ``[IMG_ID, IMAGE_ID x n_query, IMG_END_ID]``."""
    return [vocab.IMG_ID] + [vocab.IMAGE_ID] * n_query + [vocab.IMG_END_ID]
