"""Pure sequence bookkeeping of the Emu2 objective (no parameters, CPU-testable).

Layout per image: ``[IMG]`` + ``<image>`` x n_query + ``[/IMG]``. The hidden state at position
``t`` predicts position ``t + 1``: the next token (cross-entropy, labels shifted by the data
loader) and, when token ``t + 1`` is ``<image>``, the next visual embedding (regression). So
``[IMG]`` and the first ``n_query - 1`` ``<image>`` positions of each image are regressed.
Visual embeddings are numbered by the row-major (batch, position) order of ``<image>`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Emu2Batch:
    """One micro-batch.

    tokens ``[b, s]`` int64 input ids; labels ``[b, s]`` next-token ids; loss_mask ``[b, s]``
    float (0 at padding); images ``[n, 3, H, W]`` float, one per ``[IMG]`` in row-major order
    (only the first pipeline stage needs them).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    images: Optional[torch.Tensor] = None


def image_feature_index(tokens: torch.Tensor, image_id: int) -> torch.Tensor:
    """``[b, s]`` index of the visual embedding placed at each ``<image>`` token, -1 elsewhere."""
    is_image = (tokens == image_id).reshape(-1)
    index = torch.cumsum(is_image.long(), 0) - 1
    return torch.where(is_image, index, torch.full_like(index, -1)).view_as(tokens)


def regression_targets(tokens: torch.Tensor, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions regressed and the embedding each predicts.

    Returns ``(mask [b, s] bool, feature_index [R] int64)`` where ``mask[b, t]`` is True iff
    ``tokens[b, t + 1]`` is ``<image>``, and ``feature_index`` lists, in row-major order of the
    masked positions, the index of the visual embedding at ``t + 1``.
    """
    index = image_feature_index(tokens, image_id)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, :-1] = index[:, 1:] >= 0
    return mask, index[:, 1:][mask[:, :-1]]


def ce_mask(labels: torch.Tensor, loss_mask: torch.Tensor, ignore_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` float mask of positions trained with cross-entropy: ``loss_mask`` minus the
    positions whose label is one of ``ignore_ids`` (``[PAD]``, ``[IMG]``, ``[/IMG]``, ``<image>``)."""
    keep = ~torch.isin(labels, ignore_ids.to(labels.device))
    return loss_mask.float() * keep.float()


def scatter_image_embeddings(embeddings: torch.Tensor, tokens: torch.Tensor,
                             visual: torch.Tensor, image_id: int) -> torch.Tensor:
    """Replace ``<image>`` token embeddings by visual embeddings (out of place).

    embeddings ``[s, b, h]``; tokens ``[b, s]``; visual ``[N, h]`` with N = number of
    ``<image>`` tokens (checked loudly). Returns ``[s, b, h]``.
    """
    positions = (tokens == image_id).nonzero(as_tuple=False)  # [N, 2] (b, s), row-major
    if positions.shape[0] != visual.shape[0]:
        raise ValueError(f"batch has {positions.shape[0]} <image> tokens but "
                         f"{visual.shape[0]} visual embeddings")
    if positions.shape[0] == 0:
        return embeddings
    return embeddings.index_put((positions[:, 1], positions[:, 0]), visual.to(embeddings.dtype))
