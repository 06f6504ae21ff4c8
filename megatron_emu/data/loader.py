"""The training data loader: packed Emu2 sequences from preprocessed shards, per DP rank.

The main process walks the global plan (``plan.py``) and keeps this rank's slice of every
global micro-step (``micro_batch_size x dp_size`` sequences, rank ``r`` takes the ``r``-th
``micro_batch_size``); workers of a torch ``DataLoader`` read, assemble and decode those
sequences. ``state_dict()`` is the plan position after the last micro-batch handed out (not
the ones prefetched), so a restored loader continues exactly, under any DP size as long as it is
saved at a global-batch boundary (the training loop saves there). A bad document (corrupt
image, cut shard) is dropped from its sequence alike on every rank, logged and counted
(``bad_samples.py``; ``EmuDataLoader.bad_samples``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_emu.contracts import image_layout, vocab
from megatron_emu.contracts.batch import Emu2Batch, make_batch
from megatron_emu.contracts.blend import split_entry
from megatron_emu.data import bad_samples as bad
from megatron_emu.data import decode as dec
from megatron_emu.data import shard_format as sf
from megatron_emu.data.plan import BlendedPlan, PackingSpec
from megatron_emu.data.sequence import build_sequence, image_first

log = logging.getLogger("megatron_emu.data")


def parse_paths(entries: list[str]) -> list[tuple[float, str]]:
    """``data.path`` entries ``"DIR"`` or ``"WEIGHT:DIR"`` -> ``[(weight, dir)]``."""
    out = []
    for e in entries:
        weight, directory = split_entry(e)
        out.append((1.0 if weight is None else weight, directory))
    return out


@dataclass(frozen=True)
class LoaderSpec:
    """What the loader reads and how (the composition root, ``training/build.py``, makes it)."""

    paths: tuple  # ((weight, dir), ...)
    seq_length: int
    n_query: int
    image_size: int
    micro_batch_size: int
    max_images: int = 8
    dp_rank: int = 0
    dp_size: int = 1
    num_workers: int = 2
    seed: int = 1234
    decoder: str = "pil"
    image_first_prob: float = 0.5
    lookahead: int = 16
    # False on ranks that never see pixels (pipeline stages after the first): no decoding.
    decode_images: bool = True
    max_consecutive_bad: int = 100  # bad_samples.py
    # Label ids excluded from cross-entropy (model.loss.ce_ignore_tokens), for the batch's CE mask.
    ce_ignore_ids: tuple = ()
    # Whether video frame embeddings are regression targets (model.regress_video_frames).
    regress_video_frames: bool = False
    # Which image embeddings are regressed: all | last_image | none (train.regression).
    regression: str = "all"
    # The model's vocabulary (model.lm.vocab_size): a dataset of conversations needs [USER] and [ASSISTANT].
    vocab_size: int = 32274
    # "all" documents, or the "train" / "valid" side of data.valid_fraction (plan.in_valid_split).
    split: str = "all"
    valid_fraction: float = 0.0


@dataclass
class LoaderBatch:
    """tokens/labels ``[b, s]`` int64, loss_mask ``[b, s]`` float, reg_mask ``[b, s]`` bool,
    images ``uint8 [n, 3, H, W]`` (images and video frames, row-major order of ``[IMG]``), keys:
    documents per row; regress_video: video frame embeddings are regression targets."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    reg_mask: torch.Tensor
    images: torch.Tensor
    keys: list = field(default_factory=list)
    regress_video: bool = False

    def to_batch(self, ce_ignore_ids) -> Emu2Batch:
        """The model's micro-batch on the host, every position precomputed (``contracts.batch``);
        pixels stay uint8 until the device normalises them."""
        return make_batch(self.tokens, self.labels, self.loss_mask, self.images,
                          image_id=image_layout.PLACEHOLDER_ID, ce_ignore_ids=ce_ignore_ids,
                          video_id=image_layout.VIDEO_SLOT_ID, regress_video=self.regress_video,
                          reg_mask=self.reg_mask)


class SequenceReader(torch.utils.data.Dataset):
    """Map-style dataset whose "indices" are plan descriptors ``(dataset, [(epoch, doc)])``."""

    def __init__(self, spec: LoaderSpec, indexes: list, metas: list, decode_here: bool):
        self.spec, self.indexes, self.metas, self.decode_here = spec, indexes, metas, decode_here
        self.dirs = [Path(d) for _, d in spec.paths]
        self._handles: dict = {}

    def _read(self, dataset: int, doc: int):
        """``(document, None)``, or ``(None, BadSample)`` for a document that cannot be used
        (``bad_samples.py``: the same answer on every rank)."""
        row = self.indexes[dataset][doc]
        shard, offset = int(row[sf.COL_SHARD]), int(row[sf.COL_OFFSET])
        path = self.dirs[dataset] / self.metas[dataset]["shards"][shard]
        try:
            handle = self._handles.get((dataset, shard))
            if handle is None:
                handle = self._handles[(dataset, shard)] = open(path, "rb")
            members = sf.read_span(path, offset, int(row[sf.COL_SIZE]), handle)
            document = sf.decode_document(f"{dataset}:{doc}", members)
            problem = bad.check_document(document)
        except Exception as e:  # noqa: BLE001 - a crafted or cut shard may raise anything
            problem, handle = f"{type(e).__name__}: {e}", self._handles.get((dataset, shard))
        if problem is None:
            return document, None
        key = bad.span_key(handle, offset) if handle is not None else f"byte {offset}"
        return None, bad.BadSample(str(path), key, problem)

    def __getitem__(self, descriptor) -> dict:
        dataset, items = descriptor
        s = self.spec
        docs, outcomes, owner, placed = [], [], {}, []
        for epoch, doc in items:
            document, problem = self._read(dataset, doc)
            outcomes.append(problem)
            if document is not None:
                placed.append((len(outcomes) - 1, doc))
                docs.append((document, image_first(s.seed, dataset, epoch, doc, s.image_first_prob)))
                owner.update({id(v): doc for k, v in document.segments if k == "image"})
                owner.update({id(f): doc for k, v in document.segments if k == "video" for f in v})
        seq = build_sequence(docs, s.seq_length, s.n_query, s.max_images, s.regression, s.regress_video_frames)
        for d in seq.dropped:  # its tokens stay, it trains nothing (sequence.py)
            slot, doc = placed[d]
            outcomes[slot] = self._bad(dataset, doc, "its image or video does not fit the sequence (or "
                                       "data.max_images_per_sequence); the document trains nothing")
        if not s.decode_images:
            images = []
        elif self.decode_here:
            images = [self._decode(dataset, owner[id(b)], b, outcomes) for b in seq.images]
        else:
            images = seq.images
        return {"tokens": seq.tokens, "labels": seq.labels, "loss_mask": seq.loss_mask,
                "reg_mask": seq.reg_mask, "images": images, "keys": seq.documents, "outcomes": outcomes}

    def _decode(self, dataset: int, doc: int, data: bytes, outcomes: list) -> np.ndarray:
        """Pixels of an image; one that does not decode is black (its tokens stay) and counted."""
        try:
            return dec.decode_pil(data, self.spec.image_size)
        except Exception as e:  # noqa: BLE001 - decoders of crafted bytes raise anything
            outcomes.append(self._bad(dataset, doc, f"image does not decode ({type(e).__name__}: {e})"))
            size = self.spec.image_size
            return np.zeros((3, size, size), dtype=np.uint8)

    def _bad(self, dataset: int, doc: int, reason: str) -> bad.BadSample:
        """The ``BadSample`` of a document that was read (its shard file is open here)."""
        row = self.indexes[dataset][doc]
        shard = int(row[sf.COL_SHARD])
        path = self.dirs[dataset] / self.metas[dataset]["shards"][shard]
        key = bad.span_key(self._handles[(dataset, shard)], int(row[sf.COL_OFFSET]))
        return bad.BadSample(str(path), key, reason)

    def close(self) -> None:
        """Close the shard files this process opened (workers close theirs when they exit)."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __len__(self) -> int:  # unused: the sampler is infinite
        return 2**62


def _collate(samples: list[dict]) -> dict:
    out = {k: torch.from_numpy(np.stack([s[k] for s in samples]))
           for k in ("tokens", "labels", "loss_mask", "reg_mask")}
    images = [im for s in samples for im in s["images"]]
    if images and isinstance(images[0], np.ndarray):
        out["images"] = torch.from_numpy(np.stack(images))
    else:
        out["images"] = images  # encoded, decoded in the main process (DALI)
    out["keys"] = [s["keys"] for s in samples]
    out["outcomes"] = [o for s in samples for o in s["outcomes"]]  # bad_samples.py, in plan order
    return out


class _PlanSampler:
    """Batch sampler: this rank's micro-batches of descriptors; records the plan state after
    each one (the loader pops them as batches are consumed)."""

    def __init__(self, plan: BlendedPlan, spec: LoaderSpec):
        self.plan, self.spec = plan, spec
        self.states: collections.deque = collections.deque()

    def __iter__(self):
        mbs, rank = self.spec.micro_batch_size, self.spec.dp_rank
        while True:
            step = [self.plan.next() for _ in range(mbs * self.spec.dp_size)]
            self.states.append(self.plan.state_dict())
            yield step[rank * mbs:(rank + 1) * mbs]


def _worker_init(_worker_id: int) -> None:
    """Stop signals are for the rank: SLURM and Kubernetes signal every process, and torch's
    worker handler dies of a SIGTERM not sent by its parent, which takes the rank down before it
    can save. A worker ignores SIGUSR1 and SIGINT, and leaves on SIGTERM only when its parent
    (the DataLoader shutting it down) sends it."""
    import os
    import signal
    import threading

    torch.set_num_threads(1)
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: the sender cannot be told; ignore it as well
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # only the thread below takes it
    parent = os.getppid()

    def exit_when_the_parent_asks() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=exit_when_the_parent_asks, name="sigterm", daemon=True).start()


def dataset_fingerprint(meta: dict, n_docs: int) -> str:
    """Identity of a dataset's content (not of its path: data may move between runs)."""
    text = json.dumps(meta, sort_keys=True) + f"/{n_docs}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _refuse_visuals_that_cannot_fit(directory: str, meta: dict, index: np.ndarray, spec: LoaderSpec) -> None:
    """A dataset whose videos or images cannot fit one sequence (with ``<s>`` and ``</s>``) at the
    model's n_query would lose every one of them: refused, naming the fields to change."""
    room = spec.seq_length + 1 - 2
    frames = int(meta.get("video_frames") or 0)
    if meta.get("videos") and image_layout.tokens_per_video(frames, spec.n_query) > room:
        need = image_layout.tokens_per_video(frames, spec.n_query) + 1
        raise ValueError(f"data.path {directory}: its videos take {frames} frames x "
                         f"{image_layout.tokens_per_image(spec.n_query)} tokens + [VIDEO] + <s></s> = {need + 1} "
                         f"tokens but train.seq_length is {spec.seq_length}, so every video would be dropped; "
                         f"raise train.seq_length to at least {need}, lower model.adapter.n_query, or re-run "
                         f"`megatron-emu-data preprocess --video-frames N` with fewer frames")
    if int(np.asarray(index[:, sf.COL_IMAGES]).sum()) > 0 and image_layout.tokens_per_image(spec.n_query) > room:
        raise ValueError(f"data.path {directory}: an image takes {image_layout.tokens_per_image(spec.n_query)} "
                         f"tokens (model.adapter.n_query {spec.n_query} + 2) + <s></s> but train.seq_length is "
                         f"{spec.seq_length}, so every image would be dropped; raise train.seq_length or lower "
                         f"model.adapter.n_query")


class EmuDataLoader:
    """Iterate ``LoaderBatch`` micro-batches forever; ``state_dict``/``load_state_dict`` save
    and restore the exact position."""

    def __init__(self, spec: LoaderSpec):
        if not spec.paths:
            raise ValueError("data.path: no dataset given")
        self.spec = spec
        metas, indexes = [], []
        for _, d in spec.paths:
            meta, index = sf.load_index(d)
            if int(meta["image_size"]) != spec.image_size:
                raise ValueError(f"data.path {d}: images were preprocessed at {meta['image_size']} px "
                                 f"but model.vision.image_size is {spec.image_size}; re-run "
                                 f"`megatron-emu-data preprocess --image-size {spec.image_size}`")
            frames = int(meta.get("video_frames") or 0)
            if meta.get("videos") and frames > spec.max_images:
                raise ValueError(f"data.path {d}: its videos have {frames} frames but "
                                 f"data.max_images_per_sequence is {spec.max_images} (frames count as images), "
                                 f"so every video would be dropped; raise the cap or re-run "
                                 f"`megatron-emu-data preprocess --video-frames {spec.max_images}`")
            _refuse_visuals_that_cannot_fit(d, meta, index, spec)
            if spec.vocab_size < vocab.CHAT_VOCAB_SIZE and (index[:, sf.COL_KIND] == sf.KIND_CODES["chat"]).any():
                raise ValueError(f"data.path {d} holds conversations ([USER] / [ASSISTANT], ids "
                                 f"{vocab.USER_ID}, {vocab.ASSISTANT_ID}) but model.lm.vocab_size is "
                                 f"{spec.vocab_size}; set model.lm.vocab_size={vocab.CHAT_VOCAB_SIZE} "
                                 f"(and model.model_version=chat)")
            metas.append(meta)
            indexes.append(index)
        pack = PackingSpec(seq_length=spec.seq_length, tokens_per_image=image_layout.tokens_per_image(spec.n_query),
                           max_images=spec.max_images, lookahead=spec.lookahead, seed=spec.seed,
                           split=spec.split, valid_fraction=spec.valid_fraction)
        identities = [dataset_fingerprint(m, len(ix)) for m, ix in zip(metas, indexes)]
        fingerprint = {
            "datasets": [f"{w:g}:{f}" for (w, _), f in zip(spec.paths, identities)],
            "seq_length": spec.seq_length, "tokens_per_image": image_layout.tokens_per_image(spec.n_query),
            "max_images": spec.max_images, "seed": spec.seed, "lookahead": spec.lookahead,
            "image_first_prob": spec.image_first_prob}
        if spec.split != "all":
            fingerprint.update(split=spec.split, valid_fraction=spec.valid_fraction)
        self.plan = BlendedPlan(indexes, [w for w, _ in spec.paths], pack, fingerprint,
                                salts=[int(f, 16) for f in identities])
        self.decoder = dec.resolve_decoder(spec.decoder)
        self._dali = None
        self.reader = SequenceReader(spec, indexes, metas, decode_here=self.decoder == "pil")
        self._state = self.plan.state_dict()
        self._sampler: Optional[_PlanSampler] = None
        self._iter = None
        self.bad = bad.BadSampleMonitor(spec.max_consecutive_bad)

    @property
    def bad_samples(self) -> int:
        """Bad samples skipped (or images blacked out) so far in the batches handed out."""
        return self.bad.total + (self._dali.failed if self._dali is not None else 0)

    def _start(self) -> None:
        self.plan.load_state_dict(self._state)
        self._sampler = _PlanSampler(self.plan, self.spec)
        n = self.spec.num_workers
        loader = torch.utils.data.DataLoader(
            self.reader, batch_sampler=self._sampler, num_workers=n, collate_fn=_collate,
            worker_init_fn=_worker_init if n else None, persistent_workers=False,
            prefetch_factor=2 if n else None, multiprocessing_context="fork" if n else None)
        self._iter = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> LoaderBatch:
        if self._iter is None:
            self._start()
        raw = next(self._iter)
        self._state = self._sampler.states.popleft()
        self.bad.update(raw["outcomes"])  # may raise BadDataError
        images = raw["images"]
        if not isinstance(images, torch.Tensor):
            images = self._decode_dali(images) if images else torch.empty(
                0, 3, self.spec.image_size, self.spec.image_size, dtype=torch.uint8)
        return LoaderBatch(raw["tokens"], raw["labels"], raw["loss_mask"], raw["reg_mask"],
                           images, raw["keys"], self.spec.regress_video_frames)

    def _decode_dali(self, encoded: list) -> torch.Tensor:
        if self._dali is None:
            self._dali = dec.DaliDecoder(self.spec.image_size,
                                         self.spec.micro_batch_size * self.spec.max_images,
                                         gpu=self.decoder == "dali")
        return self._dali(encoded)

    @property
    def consumed_sequences(self) -> int:
        """Global sequences handed out so far (all DP ranks together)."""
        return int(self._state["index"])

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self._state))

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.plan.load_state_dict(state)  # validates the fingerprint now
        self._state = self.plan.state_dict()

    def close(self) -> None:
        self._iter = None
        self._sampler = None
        self.reader.close()
