"""Placing visual embeddings into the token embeddings (no parameters, CPU-testable).

The positions come with the batch (``contracts.batch``: computed on the host by the data
layer), so nothing here synchronises with the host.
"""

from __future__ import annotations

import torch


def scatter_image_embeddings(embeddings: torch.Tensor, image_rows: torch.Tensor,
                             visual: torch.Tensor) -> torch.Tensor:
    """Replace ``<image>`` token embeddings by visual embeddings (out of place).

    embeddings ``[s, b, h]``; image_rows ``[N]`` (row ``t * b + i`` of the ``[s * b, h]`` view
    for sample ``i``, position ``t``); visual ``[N, h]``, in the order of ``image_rows``.
    Returns ``[s, b, h]``. The counts are shapes known on the host: checked without a sync.
    """
    if image_rows.shape[0] != visual.shape[0]:
        raise ValueError(f"batch has {image_rows.shape[0]} <image> tokens but "
                         f"{visual.shape[0]} visual embeddings")
    if visual.shape[0] == 0:
        return embeddings
    s, b, h = embeddings.shape
    flat = embeddings.reshape(s * b, h).index_copy(0, image_rows, visual.to(embeddings.dtype))
    return flat.view(s, b, h)
