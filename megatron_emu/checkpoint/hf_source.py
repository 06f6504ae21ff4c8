"""The Hugging Face inputs of ``hf-to-mcore`` as canonical tensors, one layer group at a time.

Inputs: an Emu2 directory (``""``), or a LLaMA directory (``"llama"``) and optionally an EVA
vision tower (``"vision"``), renamed into Emu2's HF names and mapped by ``hf_mapping.from_hf``
into our canonical (unsharded) names. ``plan`` checks everything against the model from
shapes alone (meta tensors: no data is read) and orders the work in groups no larger than the
largest layer; ``canonical`` then reads one group's tensors.
"""

from __future__ import annotations

import math
import re

import torch

from megatron_emu.checkpoint import native_layout
from megatron_emu.checkpoint.hf_mapping import HF_LM, IGNORED_HF_SUFFIX, VOCAB, Dims, find_hf, from_hf
from megatron_emu.checkpoint.hf_reader import HFReader
from megatron_emu.checkpoint.row_gather import row_ids, source_runs

_HF_GROUP = re.compile(r"^(model\.visual\.blocks\.\d+\.|model\.decoder\.lm\.model\.layers\.\d+\.)")
_OUR_GROUP = re.compile(r"^(vision\.blocks\.layers\.\d+\.|decoder\.layers\.\d+\.)")
_LLAMA_RENAMES = {"model.": HF_LM, "lm_head.": "model.decoder.lm.lm_head."}


def emu2_name(src: str, name: str) -> str:
    """An input tensor name -> its Emu2 HF name: LLaMA's names move under ``model.decoder.lm``;
    an Emu2 or vision input may use the HF or BAAI's native layout (``native_layout``)."""
    if src != "llama":
        return native_layout.hf_name(name)
    for old, repl in _LLAMA_RENAMES.items():
        if name.startswith(old):
            return repl + name[len(old):]
    return name


class SourceError(ValueError):
    """The inputs do not fit the model; the message says why."""


class CanonicalSource:
    def __init__(self, dirs: dict, dims: Dims):
        self.dims = dims
        self.readers = {k: HFReader(v) for k, v in dirs.items()}
        self.where: dict = {}  # Emu2 HF name -> (input, original name)
        for src, reader in self.readers.items():
            for name in reader.keys():
                new = emu2_name(src, name)
                if src == "vision" and not new.startswith("model.visual."):
                    continue
                if new in self.where:
                    raise SourceError(f"{reader.source}: {self.where[new][1]!r} and {name!r} are the same "
                                      f"tensor in two layouts; keep one")
                if not new.endswith(IGNORED_HF_SUFFIX):
                    self.where[new] = (src, name)
        if "vision" in self.readers and not any(n.startswith("model.visual.") for n in self.where):
            raise SourceError("--vision has no visual.* / model.visual.* tensors")
        self.vocab_rows: dict[str, int] = {}  # canonical vocab tensor -> rows the input gives
        self.given: set[str] = set()  # canonical names the inputs provide (filled by plan)
        # HF layer prefix (or a lone tensor's name) -> its HF tensor names, in input order.
        self.groups: dict[str, list[str]] = {}
        for n in self.where:
            m = _HF_GROUP.match(n)
            self.groups.setdefault(m.group(1) if m else n, []).append(n)

    def describe(self) -> dict:
        """What was found, per input: file format and layout (``native_layout.describe``)."""
        return {src or "hf": {"files": r.describe(), **native_layout.describe(r.keys())}
                for src, r in self.readers.items()}

    def canonical_all(self) -> dict[str, torch.Tensor]:
        """Every input tensor, mapped (the whole model at once: for small models)."""
        return self.canonical(list(self.groups))

    def _map(self, hf: dict) -> dict:
        try:
            return from_hf(hf, self.dims)
        except (KeyError, ValueError, RuntimeError) as e:  # RuntimeError: rows that do not reshape
            raise SourceError(str(e.args[0]) if e.args else str(e)) from None

    def plan(self, needed: dict[str, tuple], required: tuple) -> list[tuple[list[str], list[str]]]:
        """Check the inputs against ``needed`` (canonical name -> full shape, every rank's) and
        return the work as ``[(hf_groups, canonical names)]``: input groups in input order,
        then the tensors to initialise fresh grouped by layer; consecutive small groups are
        merged up to the largest group's size. Raises SourceError for an unknown key, a shape
        mismatch or a missing required tensor."""
        entries = []
        for group, members in self.groups.items():
            metas = {}
            for n in members:
                src, orig = self.where[n]
                metas[n] = self.readers[src].meta(orig)
            canon = self._shapes(metas)
            for n, shape in canon.items():
                if n not in needed:
                    raise SourceError(f"input tensor(s) {members[:2]} map to {n}, which this model does not "
                                      f"have (check the layer count and architecture)")
                if shape != tuple(needed[n]):
                    raise SourceError(f"{n}: input shape {shape} but the model needs {tuple(needed[n])}")
            for n, t in metas.items():
                hit = find_hf(n)
                if hit is not None and hit[0].rule is VOCAB:  # a padded vocabulary: rows given
                    self.vocab_rows[hit[0].ours] = t.shape[0]
            self.given |= set(canon)
            entries.append(([group], sorted(canon), sum(math.prod(s) for s in canon.values())))
        fresh = [n for n in needed if n not in self.given]
        missing = sorted(n for n in fresh if n.startswith(required))
        if missing:
            raise SourceError(f"the input lacks {len(missing)} model tensor(s), e.g. {missing[:3]}")
        by_layer: dict = {}
        for n in fresh:
            m = _OUR_GROUP.match(n)
            by_layer.setdefault(m.group(1) if m else n, []).append(n)
        for names in by_layer.values():
            entries.append(([], names, sum(math.prod(needed[n]) for n in names)))
        return _coalesce(entries)

    def _shapes(self, metas: dict) -> dict[str, tuple]:
        """Canonical name -> the shape these input tensors (meta) map to, from their shapes
        alone: their row numbers are mapped (meta tensors would do, but their ops import much
        of torch: about 1 s of CPU), and the other dimensions, which every rule keeps, are the
        inputs', which must agree."""
        if any(t.dim() == 0 for t in metas.values()):
            return {n: tuple(t.shape) for n, t in self._map(metas).items()}
        tails: dict[str, set] = {}
        for n, t in metas.items():
            if (hit := find_hf(n)) is not None:
                tails.setdefault(hit[0].ours.replace("{i}", hit[1]), set()).add(tuple(t.shape[1:]))
        out = {}
        for n, t in self._map({n: row_ids(tuple(t.shape)) for n, t in metas.items()}).items():
            if len(tails.get(n, ())) != 1:
                raise SourceError(f"{n}: its input tensors disagree beyond the first dimension: {tails.get(n)}")
            out[n] = (t.shape[0], *next(iter(tails[n])))
        return out

    def canonical(self, groups: list[str]) -> dict[str, torch.Tensor]:
        """The canonical tensors of these HF groups, read and mapped (full, unsharded)."""
        hf = {}
        for group in groups:
            for n in self.groups[group]:
                src, orig = self.where[n]
                hf[n] = self.readers[src].get(orig)
        return self._map(hf)

    def rows(self, groups: list[str]) -> tuple[list[torch.Tensor], dict]:
        """The input tensors of these HF groups (memory-mapped, not copied) and, per canonical
        name, its rows as ``[(input index, start, stop)]`` in order, or ``None`` where rows are
        made rather than selected (vocabulary padding, BAAI's zero k bias): ``from_hf`` applied
        to tagged row numbers, so the layout logic is the same and no data moves."""
        sources, ids = [], {}
        for group in groups:
            for n in self.groups[group]:
                src, orig = self.where[n]
                sources.append(self.readers[src].get(orig))
                if sources[-1].dim() == 0:
                    return sources, {}
                ids[n] = row_ids(tuple(sources[-1].shape)) + (len(sources) << 32)
        return sources, {n: source_runs(t) for n, t in self._map(ids).items()}


def _coalesce(entries: list) -> list[tuple[list[str], list[str]]]:
    """Merge consecutive entries while their total stays within the largest one and the part
    keeps at most one layer of each stack (a group is one layer, or small tensors)."""
    limit = max((e[2] for e in entries), default=0)
    out: list = []
    size, stacks = 0, set()
    for groups, names, n in entries:
        mine = {m.group(1).split(".layers.")[0] for m in map(_OUR_GROUP.match, names) if m}
        if out and size + n <= limit and not (stacks & mine):
            out[-1][0].extend(groups)
            out[-1][1].extend(names)
            size, stacks = size + n, stacks | mine
        else:
            out.append((list(groups), list(names)))
            size, stacks = n, mine
    return out
