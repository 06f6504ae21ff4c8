"""The micro-batch contract between the data layer and the model.

The data layer builds an ``Emu2Batch`` on the host; the model consumes it on the device. Every
position the forward needs (where visual embeddings go, which rows are regressed and which
embedding each predicts, which labels count for cross-entropy) is computed here, on the host,
with numpy, so the forward has no ``nonzero``, boolean-mask indexing or ``.item()``: no
device-to-host synchronisation.

Conventions (emu2_spec.md §1.7): an image is ``[IMG]`` + ``<image>`` x n_query + ``[/IMG]``, a
video frame ``[IMG]`` + ``[gIMG]`` x n_query + ``[/IMG]``; visual embeddings are numbered by the
row-major (sample, position) order of their slots (``<image>`` and ``[gIMG]`` tokens); the hidden
state at ``t`` predicts ``t + 1`` (next token; next visual embedding when token ``t + 1`` is
``<image>``, or ``[gIMG]`` when video frames are regressed). "Rows" index the flattened
``[s * b, h]`` view of the model's ``[s, b, h]`` activations: row ``t * b + i`` is sample ``i``,
position ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import numpy as np
import torch

# Fields only the first pipeline stage reads (embedding, ViT) and only the last reads (heads).
FIRST_STAGE_FIELDS = ("tokens", "images", "image_rows")
LAST_STAGE_FIELDS = ("labels", "ce_mask", "reg_rows", "reg_features")


@dataclass
class Emu2Batch:
    """One micro-batch (``b`` samples of ``s`` tokens, ``n`` images, ``N = n * n_query``
    visual embeddings, ``R`` regressed positions).

    tokens ``[b, s]`` int64; labels ``[b, s]`` int64 (next-token ids);
    ce_mask ``[b, s]`` float32: 1 where the label is trained with cross-entropy;
    images ``[n, 3, H, W]``: uint8 on the host, normalised float on the device;
    image_rows ``[N]`` int64: the row of each visual embedding, in embedding order;
    reg_rows ``[R]`` int64: rows whose hidden state is regressed, in row-major sample order;
    reg_features ``[R]`` int64: the visual embedding each of those rows predicts.

    Pipeline stages that need none of a group of fields receive them as ``None``.
    """

    tokens: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    ce_mask: Optional[torch.Tensor]
    images: Optional[torch.Tensor]
    image_rows: Optional[torch.Tensor]
    reg_rows: Optional[torch.Tensor]
    reg_features: Optional[torch.Tensor]

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])

    def tensors(self) -> dict[str, Optional[torch.Tensor]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def only(self, names: Sequence[str]) -> "Emu2Batch":
        """The same batch with every field outside ``names`` set to None."""
        return replace(self, **{k: None for k in self.tensors() if k not in names})

    def pin_memory(self) -> "Emu2Batch":
        """Host tensors page-locked (for ``non_blocking`` copies); device tensors (images
        decoded on the GPU) kept as they are."""
        return replace(self, **{k: v if v is None or v.device.type != "cpu" else v.pin_memory()
                                for k, v in self.tensors().items()})

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32,
           normalize=None) -> "Emu2Batch":
        """Copy to ``device`` (``non_blocking``: from pinned memory the copy overlaps compute);
        ``normalize(uint8 images, dtype)`` turns pixels into model inputs there (images that
        are float already are model inputs: only cast)."""
        moved = {k: None if v is None else v.to(device, non_blocking=True)
                 for k, v in self.tensors().items()}
        images = moved["images"]
        if images is not None:
            if images.dtype == torch.uint8 and normalize is not None:
                moved["images"] = normalize(images, dtype)
            elif images.is_floating_point():
                moved["images"] = images.to(dtype)
        return Emu2Batch(**moved)


def host_indices(tokens: np.ndarray, image_id: int, video_id: Optional[int] = None,
                 regress_video: bool = False, reg_mask: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """tokens ``[b, s]`` -> ``image_rows [N]``, ``reg_rows [R]``, ``reg_features [R]`` (int64).

    ``video_id``: the slot token of video frames (also visual embeddings); their embeddings are
    regression targets only with ``regress_video``. ``reg_mask`` ``[b, s]`` bool, when given,
    says exactly which positions regress the slot after them (the data layer's choice:
    ``train.regression``); it must only mark positions followed by a slot."""
    b, s = tokens.shape
    is_image = tokens == image_id
    is_slot = is_image if video_id is None else is_image | (tokens == video_id)
    sample, pos = np.nonzero(is_slot)  # row-major: the embedding order
    image_rows = (pos * b + sample).astype(np.int64)
    feature = np.full((b, s), -1, dtype=np.int64)
    feature[sample, pos] = np.arange(sample.size, dtype=np.int64)
    target = is_slot if regress_video else is_image
    regressed = np.zeros((b, s), dtype=bool)
    regressed[:, :-1] = target[:, 1:]
    if reg_mask is not None:
        given = np.asarray(reg_mask, dtype=bool)
        if (given[:, :-1] & ~is_slot[:, 1:]).any() or given[:, -1].any():
            raise ValueError("reg_mask marks a position that is not followed by a visual slot")
        regressed = given
    r_sample, r_pos = np.nonzero(regressed)
    return {"image_rows": image_rows, "reg_rows": (r_pos * b + r_sample).astype(np.int64),
            "reg_features": feature[r_sample, r_pos + 1]}


def ce_mask(labels: np.ndarray, loss_mask: np.ndarray, ignore_ids: Sequence[int]) -> np.ndarray:
    """``[b, s]`` float32: ``loss_mask`` minus the positions whose label is in ``ignore_ids``."""
    keep = ~np.isin(labels, np.asarray(list(ignore_ids), dtype=labels.dtype))
    return (np.asarray(loss_mask, dtype=np.float32) * keep).astype(np.float32)


def make_batch(tokens, labels, loss_mask, images, *, image_id: int,
               ce_ignore_ids: Sequence[int], video_id: Optional[int] = None,
               regress_video: bool = False, reg_mask=None) -> Emu2Batch:
    """Host tensors or arrays (tokens/labels ``[b, s]``, loss_mask ``[b, s]`` 0 at padding,
    images ``[n, 3, H, W]`` or None: images and video frames in slot order; ``reg_mask``
    ``[b, s]``: see ``host_indices``) -> a complete ``Emu2Batch`` on the host."""
    tok = np.asarray(tokens, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)
    idx = host_indices(tok, image_id, video_id, regress_video,
                       None if reg_mask is None else np.asarray(reg_mask))
    as_tensor = torch.from_numpy
    return Emu2Batch(
        tokens=as_tensor(tok), labels=as_tensor(lab),
        ce_mask=as_tensor(ce_mask(lab, np.asarray(loss_mask), ce_ignore_ids)),
        images=images if images is None or isinstance(images, torch.Tensor) else as_tensor(images),
        image_rows=as_tensor(idx["image_rows"]), reg_rows=as_tensor(idx["reg_rows"]),
        reg_features=as_tensor(idx["reg_features"]),
    )
