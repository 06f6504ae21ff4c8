"""The global sample plan: which documents form training sequence ``g``, for every ``g``.

Every rank computes the same plan from the dataset indexes alone (no reading, no decoding), so
the plan is independent of the data-parallel size: rank ``r`` of ``D`` takes its slice of each
global micro-step. Its position is a small dict (``state_dict``): saved in the training
checkpoint, it resumes the exact sequence stream, also under another DP/TP/PP layout.

Per dataset: an epoch order over its documents (a two-level shuffle: blocks of documents in a
seeded order, documents within a block in a seeded order, so memory stays O(block) for billions
of documents), and greedy packing with a small look-ahead window (the next documents that still
fit fill the rest of a sequence). Blending: sequence ``g`` comes from the dataset whose share is
furthest below its weight (deterministic, exact ratios; as megatron-core's blended dataset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_emu.data import shard_format as sf


@dataclass(frozen=True)
class PackingSpec:
    seq_length: int
    tokens_per_image: int
    max_images: int
    lookahead: int = 16
    block: int = 65536
    seed: int = 0
    # Held-out validation by document: "all" documents, or the "train" / "valid" side of a
    # split that puts each document in "valid" with probability ``valid_fraction``.
    split: str = "all"
    valid_fraction: float = 0.0


_MASK = (1 << 64) - 1


def in_valid_split(doc: int, salt: int, fraction: float) -> bool:
    """Whether document ``doc`` of the dataset with ``salt`` is held out for validation: a
    splitmix64 hash of (doc, salt) below ``fraction`` of its range. Depends on the document and
    the dataset's content only (not on the seed, the layout or the blend)."""
    x = (doc + (salt * 0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) < fraction * 2.0**64


class DocumentStream:
    """Packs one dataset's documents into sequences; ``next_sequence() -> [(epoch, doc)]``."""

    def __init__(self, index: np.ndarray, dataset_id: int, spec: PackingSpec, salt: int = 0):
        if len(index) == 0:
            raise ValueError(f"dataset {dataset_id} has no documents")
        self.n = len(index)
        self.dataset_id, self.spec, self.salt = dataset_id, spec, salt
        images = np.minimum(np.asarray(index[:, sf.COL_IMAGES]), spec.max_images)
        length = sf.document_length(np.asarray(index[:, sf.COL_TEXT]), images, spec.tokens_per_image,
                                    sf.videos_column(index))
        self.length = np.minimum(length, spec.seq_length + 1).astype(np.int64)
        self.images = images.astype(np.int64)
        self.epoch, self.cursor = 0, 0
        self.pending: list[tuple[int, int]] = []
        self._block_cache: dict = {}

    # -- epoch order ---------------------------------------------------------------------
    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, self.dataset_id, *keys])

    def _doc_at(self, epoch: int, k: int) -> int:
        """Document at position ``k`` of ``epoch``'s order: the full blocks in a seeded order,
        then the partial last block; each block's documents in a seeded order."""
        b = self.spec.block
        n_full = self.n // b
        key = ("order", epoch)
        if key not in self._block_cache:
            self._block_cache = {key: self._rng(epoch, 1).permutation(n_full)}
        block = int(self._block_cache[key][k // b]) if k < n_full * b else n_full
        inner_key = ("block", epoch, block)
        if inner_key not in self._block_cache:
            size = min(b, self.n - block * b)
            for old in [x for x in self._block_cache if x[0] == "block"]:
                del self._block_cache[old]  # keep the order and the current block only
            self._block_cache[inner_key] = self._rng(epoch, 2, block).permutation(size)
        return block * b + int(self._block_cache[inner_key][k % b])

    def _draw(self) -> tuple[int, int]:
        """The next document of this stream's split in epoch order."""
        since_hit = 0
        while True:
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
            item = (self.epoch, self._doc_at(self.epoch, self.cursor))
            self.cursor += 1
            if self.spec.split == "all" or \
                    in_valid_split(item[1], self.salt, self.spec.valid_fraction) == (self.spec.split == "valid"):
                return item
            since_hit += 1
            if since_hit > self.n:
                raise ValueError(f"dataset {self.dataset_id}: no document falls in the {self.spec.split!r} "
                                 f"side of data.valid_fraction={self.spec.valid_fraction} ({self.n} "
                                 f"documents); change the fraction or give data.valid_path")

    # -- packing -------------------------------------------------------------------------
    def next_sequence(self) -> list[tuple[int, int]]:
        while len(self.pending) < self.spec.lookahead:
            self.pending.append(self._draw())
        first = self.pending[0]
        room = self.spec.seq_length + 1 - int(self.length[first[1]])
        images = int(self.images[first[1]])
        taken, keep = [first], []
        for item in self.pending[1:]:
            length, n_img = int(self.length[item[1]]), int(self.images[item[1]])
            if length <= room and images + n_img <= self.spec.max_images:
                taken.append(item)
                room -= length
                images += n_img
            else:
                keep.append(item)
        self.pending = keep
        return taken

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "pending": [list(p) for p in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.pending = [(int(e), int(d)) for e, d in state["pending"]]


class BlendedPlan:
    """Global sequence stream over weighted datasets: ``next() -> (dataset, [(epoch, doc)])``."""

    def __init__(self, indexes: list[np.ndarray], weights: list[float], spec: PackingSpec,
                 fingerprint: dict, salts: list[int] | None = None):
        if len(indexes) != len(weights) or not indexes or min(weights) <= 0:
            raise ValueError("data.path: one positive weight per dataset is required")
        total = float(sum(weights))
        self.weights = np.asarray(weights, dtype=np.float64) / total
        salts = salts or [0] * len(indexes)
        self.streams = [DocumentStream(ix, i, spec, salt) for i, (ix, salt) in enumerate(zip(indexes, salts))]
        self.counts = np.zeros(len(indexes), dtype=np.int64)
        self.index = 0  # global sequence index of the next sequence
        self.fingerprint = fingerprint

    def next(self) -> tuple[int, list[tuple[int, int]]]:
        deficit = self.weights * (self.index + 1) - self.counts
        d = int(np.argmax(deficit))
        self.counts[d] += 1
        self.index += 1
        return d, self.streams[d].next_sequence()

    def state_dict(self) -> dict:
        return {"index": self.index, "counts": self.counts.tolist(), "fingerprint": self.fingerprint,
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            saved, now = state.get("fingerprint") or {}, self.fingerprint
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ValueError(f"the checkpoint's data position belongs to another data setup "
                             f"(differs in {', '.join(diff)}); resume with the same data.* and "
                             f"train.seq_length, or start the data from the beginning")
        self.index = int(state["index"])
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
