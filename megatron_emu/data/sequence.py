"""Assemble one training sequence from packed documents (numpy only; runs in loader workers).

Layout (emu2_spec.md §1.7): every document is ``<s>`` + its segments + ``</s>``; an image is
``[IMG]`` + ``<image>`` x n_query + ``[/IMG]``, a video ``[VIDEO]`` + per frame ``[IMG]`` +
``[gIMG]`` x n_query + ``[/IMG]``. Documents are concatenated to ``seq_length + 1`` tokens
(inputs are ``[:-1]``, labels ``[1:]``) and padded with ``[PAD]``. An image or a video is never
split: one that does not fit (or exceeds the per-sequence image cap, frames counted) is dropped
with its tokens, text is cut at the end. A tuning document (chat, grounded, edit) that loses an
image or a video this way, and under ``last_image`` regression a document that loses its last
image, keeps its tokens but trains nothing (no cross-entropy or regression target): its answers
or its generated image would be learnt without the visual input they refer to. Such documents
are listed in ``Sequence.dropped`` (the loader counts them as bad samples). A pair (one image or video + caption) puts its image or
video before the caption with
probability ``image_first_prob`` (stage 2: 0.5), decided by a per-document seed, so a sequence is
a pure function of its descriptor. Special segments (the chat template's tokens) go in as
they are; the tokens of a document's ``no_loss`` segments (a conversation's prompt) are no
cross-entropy targets, and ``train.regression`` chooses the regressed images (``build_sequence``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_emu.contracts import image_layout
from megatron_emu.contracts import vocab as st
from megatron_emu.data.shard_format import Document


@dataclass
class Sequence:
    """tokens/labels ``[s]`` int64, loss_mask ``[s]`` float32 (0 at padding, document joins and
    labels of ``no_loss`` segments), reg_mask ``[s]`` bool (position ``t`` regresses the visual
    embedding at ``t + 1``: ``train.regression`` and ``model.regress_video_frames``), images:
    encoded images and video frames in slot order."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    reg_mask: np.ndarray
    images: list = field(default_factory=list)  # images and video frames, in slot order
    documents: list = field(default_factory=list)  # keys, for tests and debugging
    dropped: list = field(default_factory=list)  # indices (in ``docs``) of documents whose targets were zeroed


def image_first(seed: int, dataset: int, epoch: int, doc: int, prob: float) -> bool:
    """Deterministic coin for the placement of a pair's image."""
    if prob >= 1.0:
        return True
    if prob <= 0.0:
        return False
    return bool(np.random.default_rng([seed, dataset, epoch, doc, 0x1AB]).random() < prob)


def ordered_segments(doc: Document, first: bool) -> list:
    """A pair's segments with the image or video first (``first``) or last; others unchanged."""
    if doc.kind != "pair":
        return doc.segments
    images = [s for s in doc.segments if s[0] in ("image", "video")]
    texts = [s for s in doc.segments if s[0] == "text"]
    return images + texts if first else texts + images


REGRESSION_MODES = ("all", "last_image", "none")
# Kinds whose every target depends on the document's visual input (a dropped one zeroes them).
VISUAL_KINDS = ("chat", "grounded", "edit")


def _last_image(segments: list) -> int:
    """Index in ``segments`` of the document's last image (-1: none)."""
    last = [i for i, (kind, _) in enumerate(segments) if kind == "image"]
    return last[-1] if last else -1


def build_sequence(docs: list[tuple[Document, bool]], seq_length: int, n_query: int,
                   max_images: int, regression: str = "all", regress_video: bool = False) -> Sequence:
    """Pack ``(document, image_first)`` items, in order, into one sequence of ``seq_length``.

    ``regression`` (``train.regression``): "all" regresses every image embedding (and video
    frames' with ``regress_video``), "last_image" only those of each document's last image (the
    generated image of an Emu2-Gen sample; none when that image did not fit), "none" nothing.
    Tokens of a document's ``no_loss`` segments are no cross-entropy targets."""
    if regression not in REGRESSION_MODES:
        raise ValueError(f"train.regression {regression!r}: choose from {list(REGRESSION_MODES)}")
    cap = seq_length + 1
    tokens: list[int] = []
    target: list[bool] = []  # token t is a cross-entropy target
    regressed: list[bool] = []  # token t is a visual slot whose embedding is regressed
    images: list = []
    boundaries: list[int] = []  # indices of </s> tokens followed by another document
    per_image = image_layout.tokens_per_image(n_query)
    dropped: list[int] = []

    def put(ids: list[int], loss: bool, reg: bool = False) -> None:
        tokens.extend(ids)
        target.extend([loss] * len(ids))
        slots = (image_layout.PLACEHOLDER_ID, image_layout.VIDEO_SLOT_ID)
        regressed.extend(reg and i in slots for i in ids)

    for d, (doc, first) in enumerate(docs):
        if len(tokens) >= cap:
            break
        if tokens:
            boundaries.append(len(tokens) - 1)
        start, lost = len(tokens), False
        put([st.BOS_ID], True)
        segments = ordered_segments(doc, first)
        last_image = _last_image(segments)
        no_loss = doc.no_loss if doc.kind != "pair" else frozenset()
        for i, (kind, value) in enumerate(segments):
            room = cap - len(tokens)
            loss = i not in no_loss
            if kind == "text":
                put(value[:room], loss)
            elif kind == "special":
                if room:
                    put([value], loss)
            elif kind == "video":
                if image_layout.tokens_per_video(len(value), n_query) <= room \
                        and len(images) + len(value) <= max_images:
                    put(image_layout.video_block(len(value), n_query), loss,
                        regression == "all" and regress_video)
                    images.extend(value)
                else:
                    lost = lost or doc.kind in VISUAL_KINDS
            elif per_image <= room and len(images) < max_images:
                reg = regression == "all" or (regression == "last_image" and i == last_image)
                put(image_layout.image_block(n_query), loss, reg)
                images.append(value)
            else:
                lost = lost or doc.kind in VISUAL_KINDS or (regression == "last_image" and i == last_image)
        if len(tokens) < cap:
            put([st.EOS_ID], True)
        if lost:
            target[start:] = [False] * (len(target) - start)
            regressed[start:] = [False] * (len(regressed) - start)
            dropped.append(d)
    n = min(len(tokens), cap)
    full = np.full(cap, st.PAD_ID, dtype=np.int64)
    full[:n] = tokens[:n]
    inputs, labels = full[:-1].copy(), full[1:].copy()
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    loss_mask[: max(n - 1, 0)] = 1.0
    loss_mask[: max(n - 1, 0)] *= np.asarray(target[1:n], dtype=np.float32)
    for b in boundaries:  # do not train </s> -> next document's <s>
        if b < seq_length and inputs[b] == st.EOS_ID:
            loss_mask[b] = 0.0
    slots = np.zeros(cap, dtype=bool)
    slots[:n] = regressed[:n]
    reg_mask = np.zeros(seq_length, dtype=bool)
    reg_mask[:-1] = slots[1:seq_length]
    return Sequence(inputs, labels, loss_mask, reg_mask, images, [d.key for d, _ in docs], dropped)
