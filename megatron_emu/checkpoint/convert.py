"""Conversion between megatron_emu checkpoints and the Hugging Face layouts.

* ``mcore_to_hf``: any TP/PP/DP checkpoint -> HF Emu2 (or, ``lm_only``, plain LLaMA). Streams:
  one layer's tensors at a time are read (``reader.py``), mapped (``hf_mapping.py``) and
  appended to safetensors shards whose headers were planned up front (``safetensors_io.py``).
* ``hf_to_mcore``: an HF Emu2 directory, or a LLaMA directory (+ optionally an EVA vision
  tower) with everything else initialised fresh (``fresh_init.py``), -> a megatron_emu checkpoint
  (weights only) at the requested TP/PP layout; ``megatron-emu-train --set checkpoint.load=DIR``
  loads it at any layout. Streams too: each rank's sharded layout is derived from the config
  (``layout.py``; no model is built, megatron-core is not needed); one
  group of layers at a time is read (``hf_source.py``), sliced and appended to the rank's data
  file as torch DCP items, and rank 0 writes the checkpoint's metadata (``stream_writer.py``).

Inputs are validated (files, shapes, keys) before anything is written; output is built in a
temporary directory next to ``out`` (created with the usual, umask-governed permissions) and
renamed into place at the end. A megatron_emu checkpoint is read with its checksums verified
(``verify``); one written here gets a ``checksums.json`` like a training save.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from megatron_emu.checkpoint import hf_config, integrity, native_layout, row_gather, stream_writer, tokenizer_files
from megatron_emu.checkpoint.hf_mapping import HF_LM, HF_LM_HEAD, Dims, to_hf
from megatron_emu.checkpoint.hf_reader import HFReader
from megatron_emu.checkpoint.reader import CheckpointReader
from megatron_emu.checkpoint.safetensors_io import ShardWriter, plan_shards, shard_names, write_index
from megatron_emu.contracts import checkpoint_format as fmt

log = logging.getLogger("megatron_emu.convert")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LM_PREFIXES = ("embedding.", "decoder.", "heads.output_layer.")
LAYOUTS = ("hf", "native")
# Our transformers model code, copied into every Emu2 directory mcore-to-hf writes (shipped as
# package data: setup.py).
HF_MODEL_DIR = Path(__file__).resolve().parent / "hf_model"
HF_MODEL_FILES = ("configuration_emu.py", "modeling_emu.py", "visual.py")


class ConversionError(ValueError):
    """Input that cannot be converted; the message says why. Nothing was written."""


def _progress(total: int, desc: str, enabled: bool, unit: str = "tensor"):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def _staging(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"--out {out} exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # mode 0o777 & ~umask, as `out` itself would get (mkdtemp's 0700 would stay)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def resolve_checkpoint(ckpt: str | Path, iteration: Optional[int] = None) -> Path:
    ckpt = Path(ckpt)
    if iteration is not None:
        path = ckpt / fmt.iter_name(iteration)
        if not fmt.is_complete(path):
            raise ConversionError(f"--iteration {iteration}: {path} is not a complete checkpoint")
        return path
    path = fmt.resolve(ckpt)
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
                lm_only: bool = False, layout: str = "hf", tokenizer: Optional[str] = None,
                max_shard_gb: float = 5.0, progress: bool = True, verify: bool = True) -> dict:
    """Write the HF directory (``layout`` "hf": BAAI/Emu2's Hugging Face layout with our model
    code; "native": the state dict of BAAI's GitHub ``EmuModel``); returns a summary."""
    from megatron_emu.config.io import from_dict

    if layout not in LAYOUTS:
        raise ConversionError(f"--layout {layout}: choose one of {', '.join(LAYOUTS)}")
    if lm_only and layout != "hf":
        raise ConversionError("--lm-only writes a plain LLaMA directory; it takes no --layout native")
    src = resolve_checkpoint(ckpt, iteration)
    reader = CheckpointReader(src, verify=verify, reuse_buffers=True)  # each tensor is written before the next read
    if "config" not in reader.meta:
        raise ConversionError(f"{src}/megatron_emu.json has no config: not a megatron_emu checkpoint")
    cfg = from_dict(reader.meta["config"])
    dims, torch_dtype = Dims.from_config(cfg), DTYPES[dtype]
    tok_dir = tokenizer_files.find(src, tokenizer, cfg.data.tokenizer)
    if tok_dir is None:
        raise ConversionError(f"no tokenizer: {src} has no tokenizer/ copy and data.tokenizer "
                              f"({cfg.data.tokenizer or 'unset'}) is not a tokenizer directory; pass --tokenizer DIR "
                              f"(a directory from `megatron-emu-data tokenizer`)")

    def mapped(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        hf = to_hf({name: t}, dims)
        if layout == "native":
            return list(native_layout.to_native(hf, dims.lm_head_dim, dims.rope_theta).items())
        return _select(hf, lm_only)

    def out_dtype(name: str) -> torch.dtype:  # RoPE frequencies stay fp32, as transformers keeps them
        return torch.float32 if name.endswith(native_layout.INV_FREQ) else torch_dtype

    # Plan every output tensor from shapes alone, in the order they will be written: which rows
    # of which canonical tensor each is (``row_gather``; mapping row numbers needs no data).
    plan, per_entry = [], []
    for name, key, layer in reader.entries():
        outputs = row_gather.row_runs(mapped, name, tuple(reader.shape(key, layer)))
        direct = all(runs is not None and out_dtype(n) == reader.dtypes[key] for n, _, runs in outputs)
        per_entry.append((name, key, layer, outputs if direct else None))
        plan += [(n, shape, out_dtype(n)) for n, shape, _ in outputs]
    if not plan:
        raise ConversionError(f"{src}: no model tensors found")
    shards = plan_shards(plan, int(max_shard_gb * 2**30))
    names = shard_names(len(shards))
    tmp = _staging(Path(out))
    try:
        writers = iter([ShardWriter(tmp / f, s) for f, s in zip(names, shards)])
        current, left = next(writers), len(shards[0])
        bar = _progress(len(per_entry), "mcore-to-hf", progress)
        for name, key, layer, outputs in per_entry:
            chunks = reader.chunks(key, layer)
            shape = tuple(reader.shape(key, layer))
            views = [row_gather.row_buffers(chunks, shape, runs) for _, _, runs in outputs or ()]
            if outputs is None or any(v is None for v in views):  # assembled, mapped, converted
                views = [(n, t.to(out_dtype(n))) for n, t in mapped(name, reader.read(key, layer, chunks))]
            else:  # written straight from the chunks' mapped bytes
                views = [(n, (s, reader.dtypes[key], v)) for (n, s, _), v in zip(outputs, views)]
            chunks = None
            for hf_name, data in views:
                if isinstance(data, torch.Tensor):
                    current.write(hf_name, data)
                else:
                    current.write_buffers(hf_name, *data)
                left -= 1
                if left == 0:
                    current.close()
                    current = next(writers, None)
                    left = len(current.entries) if current else 0
            views = None
            bar.update(1)
        bar.close()
        index = write_index(tmp, shards, names)
        remote_code = layout == "hf" and not lm_only
        config = hf_config.llama_config(cfg, dtype) if lm_only else hf_config.emu2_config(cfg, dtype, remote_code)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tok_dir == tokenizer_files.bundled(src):
            tokenizer_files.copy_verified(reader.manifest, src, tmp)
        else:
            for f in tokenizer_files.FILES:
                shutil.copyfile(tok_dir / f, tmp / f)
        if remote_code:
            for f in HF_MODEL_FILES:
                shutil.copyfile(HF_MODEL_DIR / f, tmp / f)
        _publish(tmp, Path(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s layout): %d tensors, %.2f GB in %d shard(s)", out, "llama" if lm_only else layout,
             len(plan), index["metadata"]["total_size"] / 1e9, len(shards))
    return {"tensors": len(plan), "total_size": index["metadata"]["total_size"], "shards": len(shards),
            "layout": "llama" if lm_only else layout, "tokenizer": os.path.abspath(tok_dir)}


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
                tp: int = 1, pp: int = 1, progress: bool = True) -> dict:
    """Write a weights-only megatron_emu checkpoint at TP x PP, streaming (one layer group at a
    time per rank); returns a summary."""
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
        hf_cfg = emu2_json(hf)
        if hf_cfg is None and config is None:
            raise ConversionError(f"{hf}: no config.json beside the weights (BAAI's native files come without "
                                  f"one): pass --config FILE.yaml with the architecture, e.g. "
                                  f"examples/configs/emu2_37b.yaml")
        sets = (hf_config.emu2_overrides(hf_cfg) if hf_cfg else []) + sets
        source = {"": HFReader(hf)}  # reads the index / headers (a .bin: torch's weights-only load)
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
    found = {}  # what each input is: the summary says it
    for k, r in source.items():
        f = found[k or "hf"] = {"files": r.describe(), **native_layout.describe(r.keys())}
        log.info("--%s %s: %s layout (model. prefix: %s, ViT bias: %s), %s", k or "hf", r.source, f["layout"],
                 f["prefix"], f["qkv_bias"], f["files"])
    try:
        if config is not None:
            cfg = load_config(config, sets)
        else:  # --hf alone: the architecture comes entirely from config.json
            cfg = config_from_hf(hf, sets)
        cfg = validate(cfg, tp * pp)
    except Exception as e:  # ConfigError and friends: name what is wrong, write nothing
        raise ConversionError(f"configuration: {e}") from None
    # The tokenizer travels with the checkpoint: data.tokenizer if given, else the HF directory's.
    tok = cfg.data.tokenizer
    if not tok and hf is not None and tokenizer_files.is_tokenizer_dir(source[""].dir):
        tok = str(source[""].dir)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer_files.absolute(tok)))
    tmp = _staging(Path(out))
    try:
        from megatron_emu.parallel.local_launch import run_local

        ranks = run_local(tp * pp, _save_rank, cfg, {k: str(v.source) for k, v in source.items()}, str(tmp),
                          progress, cpu_only=True, megatron=False)
        counts, written = [n for n, _ in ranks], ranks[0][1]  # the data files' checksums, as written
        meta = {"iteration": 0, "kind": "weights", "layout": {"tp": tp, "pp": pp, "vpp": None, "dp": 1},
                "config": asdict(cfg)}
        (tmp / fmt.META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if tokenizer_files.is_tokenizer_dir(tok):
            tokenizer_files.bundle(tok, tmp)
        integrity.build(tmp, known=written)
        _publish(tmp, Path(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (TP %d x PP %d) from %s", out, tp, pp, hf or llama)
    return {"layout": {"tp": tp, "pp": pp}, "input": found, "converted_tensors_per_rank": counts,
            "tokenizer": cfg.data.tokenizer if tokenizer_files.is_tokenizer_dir(tok) else None}


def emu2_json(hf: str | Path) -> Optional[dict]:
    """The Emu2 ``config.json`` in ``hf`` (a directory, or beside a weights file), or None."""
    path = Path(hf) if Path(hf).is_dir() else Path(hf).parent
    if not (path / "config.json").is_file():
        return None
    hf_cfg = hf_config.read_json(path / "config.json")
    if "vision_config" not in hf_cfg:
        raise ConversionError(f"{path}/config.json has no vision_config: not an Emu2 directory (use --llama)")
    return hf_cfg


def config_from_hf(hf: str, extra: list[str] = ()):
    """An EmuConfig whose model is entirely defined by an Emu2 HF directory's config.json."""
    from megatron_emu.config.io import apply_overrides, from_dict

    hf_cfg = emu2_json(hf)
    if hf_cfg is None:
        raise ConversionError(f"{hf}: no config.json (an Emu2 directory has one)")
    sets = hf_config.emu2_overrides(hf_cfg) + \
        [f"train.seq_length={hf_cfg.get('max_position_embeddings', 2048)}", *extra]
    return from_dict(apply_overrides({"model": {"vision": {}, "adapter": {}, "lm": {},
                                               "params_dtype": "float32"}}, sets))


def _save_rank(rank: int, cfg, dirs: dict, out: str, progress: bool) -> tuple[int, dict]:
    """Stream this rank's shard of the checkpoint into ``out``: its sharded layout is derived
    from the config (``layout``: no megatron-core, no model), the inputs are checked against it
    from their headers, then each group of layers is read, mapped, sliced and appended to this
    rank's data file (``stream_writer``). Returns the number of tensors written and every data
    file's checksums. One rank needs no process group (it runs in the caller's process)."""
    from megatron_emu.checkpoint import layout, stream_writer
    from megatron_emu.checkpoint.fresh_init import fresh_tensor
    from megatron_emu.checkpoint.hf_source import CanonicalSource, SourceError

    if cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size > 1:
        from datetime import timedelta

        from megatron_emu.parallel.watchdog import watch_parent

        watch_parent()  # as groups.init_distributed: exit when the launcher dies, never wait alone
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=600))  # env:// (run_local)
    needed = layout.full_shapes(cfg)
    targets = layout.rank_targets(cfg, rank, needed)
    required = ("",) if "" in dirs else LM_PREFIXES + (("vision.",) if "vision" in dirs else ())
    try:
        source = CanonicalSource(dirs, Dims.from_config(cfg))
        plan = source.plan(needed, required)
    except SourceError as e:  # the same on every rank: all stop here, before writing
        raise ConversionError(str(e)) from None
    dtype = getattr(torch, cfg.model.params_dtype)
    bar = _progress(len(plan), "hf-to-mcore", progress and rank == 0, unit="group")
    writer = stream_writer.DcpWriter(Path(out), rank)
    written = 0
    for groups, names in plan:
        local = [n for n in names if n in targets]
        inputs, rows = source.rows(groups) if any(n in source.given for n in local) else ([], {})
        canon = None
        for n in local:
            pending = [(sh, sh.offsets) for sh in targets[n]]
            runs = rows.get(n)
            if runs is not None and all(inputs[k].dtype == dtype and inputs[k].is_contiguous() for k, _, _ in runs):
                rest = []  # whole-row regions are written straight from the inputs' mapped bytes
                for sh, offsets in pending:
                    if tuple(sh.shape[1:]) == tuple(needed[n][1:]):
                        rows_of = row_gather.select_rows(runs, inputs, offsets[0], offsets[0] + sh.shape[0])
                        writer.add_rows(sh, rows_of, dtype)
                    else:
                        rest.append((sh, offsets))
                pending = rest
            written += len(targets[n])
            if not pending:
                continue
            if canon is None and n in source.given:
                canon = source.canonical(groups)
            full = canon.pop(n, None) if canon is not None else None
            if full is None:
                full = fresh_tensor(n, needed[n], cfg)
            elif source.vocab_rows.get(n, needed[n][0]) < needed[n][0]:  # Emu2's added rows start fresh
                given = source.vocab_rows[n]
                full[given:] = fresh_tensor(n, needed[n], cfg, start_row=given).to(full.dtype)
            for sh, offsets in pending:
                writer.add(sh, offsets, full, dtype)
            full = None
        canon = inputs = None  # nothing of this group outlives it
        bar.update(1)
    bar.close()
    return written, stream_writer.finish(writer)
