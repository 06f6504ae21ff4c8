"""Conversion between megatron_emu checkpoints and the Hugging Face layouts.

* ``mcore_to_hf``: any TP/PP/DP checkpoint -> HF Emu2 (or, ``lm_only``, plain LLaMA). Streams:
  one layer's tensors at a time are read (``reader.py``), mapped (``hf_mapping.py``) and
  appended to safetensors shards whose headers were planned up front (``safetensors_io.py``).
* ``hf_to_mcore``: an HF Emu2 directory, or a LLaMA directory (+ optionally an EVA vision
  tower) with everything else initialised fresh, -> a megatron_emu checkpoint (weights only)
  saved at the requested TP/PP layout; ``megatron-emu-train --set checkpoint.load=DIR`` loads it
  at any layout.

Inputs are validated (files, shapes, keys) before anything is written; output is built in a
temporary directory next to ``out`` and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from megatron_emu.checkpoint import hf_config
from megatron_emu.checkpoint.hf_mapping import HF_LM, HF_LM_HEAD, Dims, from_hf, to_hf
from megatron_emu.checkpoint.reader import CheckpointReader
from megatron_emu.checkpoint.safetensors_io import HFReader, ShardWriter, plan_shards, shard_names, write_index

log = logging.getLogger("megatron_emu.convert")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LM_PREFIXES = ("embedding.", "decoder.", "heads.output_layer.")
VOCAB_NAMES = ("embedding.word_embeddings.weight", "heads.output_layer.weight")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


class ConversionError(ValueError):
    """Input that cannot be converted; the message says why. Nothing was written."""


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def _staging(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"--out {out} exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def resolve_checkpoint(ckpt: str | Path, iteration: Optional[int] = None) -> Path:
    from megatron_emu.training.checkpointing import iter_name, resolve

    ckpt = Path(ckpt)
    if iteration is not None:
        path = ckpt / iter_name(iteration)
        if not (path / "megatron_emu.json").is_file():
            raise ConversionError(f"--iteration {iteration}: {path} is not a complete checkpoint")
        return path
    path = resolve(ckpt)
    if path is None:
        raise ConversionError(f"--ckpt {ckpt}: no checkpoint (no megatron_emu.json, no `latest`)")
    return path


def _lm_only_name(name: str) -> Optional[str]:
    if name == HF_LM_HEAD:
        return "lm_head.weight"
    if name.startswith(HF_LM):
        return "model." + name[len(HF_LM):]
    return None


def mcore_to_hf(ckpt: str | Path, out: str | Path, *, iteration: Optional[int] = None, dtype: str = "fp32",
                lm_only: bool = False, tokenizer: Optional[str] = None, max_shard_gb: float = 5.0,
                progress: bool = True) -> dict:
    """Write the HF directory; returns ``{"tensors", "total_size", "shards"}``."""
    from megatron_emu.config.io import from_dict

    src = resolve_checkpoint(ckpt, iteration)
    reader = CheckpointReader(src)
    if "config" not in reader.meta:
        raise ConversionError(f"{src}/megatron_emu.json has no config: not a megatron_emu checkpoint")
    cfg = from_dict(reader.meta["config"])
    dims, torch_dtype = Dims.from_config(cfg), DTYPES[dtype]
    tok_dir = Path(tokenizer or cfg.data.tokenizer or "")
    if not all((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ConversionError(f"tokenizer files not found in {str(tok_dir) or '(none)'}: pass --tokenizer DIR "
                              f"(a directory from `megatron-emu-data tokenizer`)")
    # Plan every output tensor from shapes alone (meta tensors), in the order they will be written.
    plan, per_entry = [], []
    for name, key, layer in reader.entries():
        meta = torch.empty(reader.shape(key, layer), dtype=reader.dtypes[key], device="meta")
        mapped = _select(to_hf({name: meta}, dims), lm_only)
        per_entry.append((name, key, layer, [n for n, _ in mapped]))
        plan += [(n, tuple(t.shape), torch_dtype) for n, t in mapped]
    if not plan:
        raise ConversionError(f"{src}: no model tensors found")
    shards = plan_shards(plan, int(max_shard_gb * 2**30))
    names = shard_names(len(shards))
    tmp = _staging(Path(out))
    try:
        writers = iter([ShardWriter(tmp / f, s) for f, s in zip(names, shards)])
        current, left = next(writers), len(shards[0])
        bar = _progress(len(per_entry), "mcore-to-hf", progress)
        for name, key, layer, _ in per_entry:
            for hf_name, t in _select(to_hf({name: reader.read(key, layer)}, dims), lm_only):
                current.write(hf_name, t.to(torch_dtype))
                left -= 1
                if left == 0:
                    current.close()
                    current = next(writers, None)
                    left = len(current.entries) if current else 0
            bar.update(1)
        bar.close()
        index = write_index(tmp, shards, names)
        config = hf_config.llama_config(cfg, dtype) if lm_only else hf_config.emu2_config(cfg, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in TOKENIZER_FILES:
            shutil.copyfile(tok_dir / f, tmp / f)
        _publish(tmp, Path(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %d tensors, %.2f GB in %d shard(s)", out, len(plan), index["metadata"]["total_size"] / 1e9,
             len(shards))
    return {"tensors": len(plan), "total_size": index["metadata"]["total_size"], "shards": len(shards)}


def _select(mapped: dict, lm_only: bool) -> list[tuple[str, torch.Tensor]]:
    if not lm_only:
        return list(mapped.items())
    out = []
    for n, t in mapped.items():
        renamed = _lm_only_name(n)
        if renamed:
            out.append((renamed, t))
    return out


# ------------------------------------------------------------------------------------------
def hf_to_mcore(out: str | Path, *, hf: Optional[str] = None, llama: Optional[str] = None,
                vision: Optional[str] = None, config: Optional[str] = None, overrides: tuple = (),
                tp: int = 1, pp: int = 1) -> dict:
    """Write a weights-only megatron_emu checkpoint at TP x PP; returns a summary."""
    from megatron_emu.config.io import load_config
    from megatron_emu.config.validate import validate

    if (hf is None) == (llama is None):
        raise ConversionError("give exactly one of --hf HFDIR or --llama DIR")
    sets = list(overrides) + [f"parallel.tensor_model_parallel_size={tp}",
                              f"parallel.pipeline_model_parallel_size={pp}",
                              f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}",
                              "parallel.virtual_pipeline_model_parallel_size=null",
                              "parallel.num_layers_in_first_pipeline_stage=null", "parallel.data_parallel_size=null"]
    if hf is not None:
        hf_cfg = hf_config.read_json(Path(hf) / "config.json")
        if "vision_config" not in hf_cfg:
            raise ConversionError(f"{hf}/config.json has no vision_config: not an Emu2 directory (use --llama)")
        sets = hf_config.lm_overrides(hf_cfg) + hf_config.vision_overrides(hf_cfg["vision_config"]) + \
            [f"model.lm.vocab_size={hf_cfg['vocab_size']}"] + sets
        source = {"": HFReader(hf)}
    else:
        if config is None:
            raise ConversionError("--llama needs --config FILE.yaml (what LLaMA does not define)")
        llama_cfg = hf_config.read_json(Path(llama) / "config.json")
        sets = hf_config.lm_overrides(llama_cfg) + sets
        source = {"llama": HFReader(llama)}
        if vision:
            vis_cfg = hf_config.read_json(Path(vision) / "config.json")
            sets = hf_config.vision_overrides(vis_cfg.get("vision_config", vis_cfg)) + sets
            source["vision"] = HFReader(vision)
    try:
        if config is not None:
            cfg = load_config(config, sets)
        else:  # --hf alone: the architecture comes entirely from config.json
            cfg = config_from_hf(hf, sets)
        cfg = validate(cfg, tp * pp)
    except Exception as e:  # ConfigError and friends: name what is wrong, write nothing
        raise ConversionError(f"configuration: {e}") from None
    _check_inputs(source)
    tmp = _staging(Path(out))
    try:
        from megatron_emu.parallel.local_launch import run_local

        counts = run_local(tp * pp, _save_rank, cfg, {k: str(v.dir) for k, v in source.items()}, str(tmp))
        _publish(tmp, Path(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (TP %d x PP %d) from %s", out, tp, pp, hf or llama)
    return {"layout": {"tp": tp, "pp": pp}, "converted_tensors_per_rank": counts}


def config_from_hf(hf: str, extra: list[str] = ()):
    """An EmuConfig whose model is entirely defined by an Emu2 HF directory's config.json."""
    from megatron_emu.config.io import apply_overrides, from_dict

    hf_cfg = hf_config.read_json(Path(hf) / "config.json")
    if "vision_config" not in hf_cfg:
        raise ConversionError(f"{hf}/config.json has no vision_config: not an Emu2 directory")
    sets = hf_config.lm_overrides(hf_cfg) + hf_config.vision_overrides(hf_cfg["vision_config"]) + \
        [f"model.lm.vocab_size={hf_cfg['vocab_size']}",
         f"train.seq_length={hf_cfg.get('max_position_embeddings', 2048)}", *extra]
    return from_dict(apply_overrides({"model": {"vision": {}, "adapter": {}, "lm": {},
                                               "params_dtype": "float32"}}, sets))


def _check_inputs(source: dict) -> None:
    """Open every input (index, shards) before any work; readers re-open them per rank."""
    for reader in source.values():
        reader.keys()


class CanonicalSource:
    """Canonical tensors computed lazily from the HF inputs, one layer group at a time (so a
    rank holds about one layer of the inputs besides its own shard)."""

    GROUP = re.compile(r"^(model\.visual\.blocks\.\d+\.|model\.decoder\.lm\.model\.layers\.\d+\.)")

    def __init__(self, dirs: dict, dims: Dims):
        self.dims = dims
        self.readers = {k: HFReader(v) for k, v in dirs.items()}
        self.where: dict = {}  # Emu2 HF name -> (reader, original name)
        renames = {"": {}, "llama": {"model.": HF_LM, "lm_head.": "model.decoder.lm.lm_head."},
                   "vision": {"model.visual.": "model.visual.", "visual.": "model.visual."}}
        for src, reader in self.readers.items():
            for name in reader.keys():
                new = name
                for old, repl in renames[src].items():
                    if name.startswith(old):
                        new = repl + name[len(old):]
                        break
                if src == "vision" and not new.startswith("model.visual."):
                    continue
                if not new.endswith("rotary_emb.inv_freq"):
                    self.where[new] = (src, name)
        if "vision" in self.readers and not any(n.startswith("model.visual.") for n in self.where):
            raise ConversionError("--vision has no visual.* / model.visual.* tensors")
        self._cache_key, self._cache = None, {}
        self.vocab_rows: Optional[int] = None

    def groups(self) -> dict:
        out: dict = {}
        for n in self.where:
            m = self.GROUP.match(n)
            out.setdefault(m.group(1) if m else n, []).append(n)
        return out

    def canonical_group(self, group: str, members: list) -> dict:
        if self._cache_key != group:
            hf = {n: self.readers[self.where[n][0]].get(self.where[n][1]) for n in members}
            for n, t in hf.items():  # rows beyond the input's vocabulary keep their fresh init
                if n in (HF_LM + "embed_tokens.weight", HF_LM_HEAD):
                    self.vocab_rows = t.shape[0]
            try:
                self._cache = from_hf(hf, self.dims)
            except KeyError as e:
                raise ConversionError(str(e.args[0])) from None
            self._cache_key = group
        return self._cache


def _save_rank(rank: int, cfg, dirs: dict, out: str) -> int:
    """Build this rank's chunks (fresh init), copy in every tensor the inputs give (this rank's
    slice of it), check shapes, and save the checkpoint collectively."""
    from megatron.core import dist_checkpointing

    from megatron_emu.model.builder import build_model_chunks
    from megatron_emu.parallel.groups import init_distributed, init_model_parallel

    init_distributed()
    pgs = init_model_parallel(cfg)
    chunks = build_model_chunks(cfg, pgs)
    sharded = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    required = ("",) if "" in dirs else LM_PREFIXES + (("vision.",) if "vision" in dirs else ())
    copied = _copy_into_shards(sharded, CanonicalSource(dirs, Dims.from_config(cfg)), required)
    if torch.distributed.get_rank() == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded, out)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        layout = {"tp": cfg.parallel.tensor_model_parallel_size, "pp": cfg.parallel.pipeline_model_parallel_size,
                  "vpp": None, "dp": 1}
        meta = {"iteration": 0, "kind": "weights", "layout": layout, "config": asdict(cfg)}
        (Path(out) / "megatron_emu.json").write_text(json.dumps(meta, indent=1) + "\n")
    return copied


def _copy_into_shards(sharded: dict, source: CanonicalSource, required: tuple) -> int:
    """Copy the canonical tensors into this rank's ShardedTensors (their data views), group by
    group; every model tensor whose name starts with one of ``required`` must be given (all of
    them for an Emu2 input; the LM's for LLaMA; the ViT's too with an EVA tower)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_emu.checkpoint.reader import _RENAMES, STACKED

    # Factories (e.g. SwiGLU's fc1 = [gate; up], stored as two global halves) become plain
    # ShardedTensors whose data are views of the parameters.
    apply_factories(sharded)
    targets: dict = {}
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor) or "_extra_state" in sh.key:
            continue
        if sh.prepend_axis_num:
            prefix = next(p for p in STACKED if sh.key.startswith(p))
            rest = sh.key[len(prefix):]
            name = f"{prefix}{sh.global_offset[0]}.{_RENAMES.get(rest, rest)}"
            targets.setdefault(name, []).append((sh, sh.global_offset[1:], sh.global_shape[1:]))
        else:
            targets.setdefault(sh.key, []).append((sh, sh.global_offset, sh.global_shape))
    copied = set()
    for group, members in source.groups().items():
        for name, full in source.canonical_group(group, members).items():
            for sh, offsets, shape in targets.get(name, []):
                if tuple(full.shape) != tuple(shape):
                    raise ConversionError(f"{name}: input shape {tuple(full.shape)} but the model needs {tuple(shape)}")
                region = full[tuple(slice(o, o + n) for o, n in zip(offsets, sh.data.shape))]
                data = sh.data
                if name in VOCAB_NAMES and source.vocab_rows is not None:  # Emu2's added rows stay fresh
                    keep = max(0, min(data.shape[0], source.vocab_rows - offsets[0]))
                    region, data = region[:keep], data[:keep]
                with torch.no_grad():
                    data.copy_(region.to(data.dtype))
                copied.add(name)
    missing = sorted(n for n in set(targets) - copied if n.startswith(required))
    if missing:
        raise ConversionError(f"the input lacks {len(missing)} model tensor(s), e.g. {missing[:3]}")
    return len(copied)
