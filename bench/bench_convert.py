"""Peak memory and throughput of checkpoint conversion on a synthetic multi-GB checkpoint.

Builds a randomly initialised Emu2-shaped model (default: LM hidden 2560, 16 layers, FFN 6912,
Emu2 vocabulary; a small ViT: about 5.7 GB in fp32), saves it as a megatron_emu checkpoint
(TP 2 x PP 2 on 4 CPU processes), then runs ``megatron-emu-convert mcore-to-hf`` and
``hf-to-mcore`` in fresh processes and reports their peak RSS against the checkpoint size
(headline: peak RSS / checkpoint size of each direction, target <= 0.3) and GB/s.

Usage: python bench/bench_convert.py [--hidden 2560 --layers 16 --ffn 6912] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _save_random(rank: int, cfg, out: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_emu.training import build
    from dataclasses import asdict

    pgs = build.process_groups(cfg)
    chunks = build.model_chunks(cfg, pgs)
    import torch
    if torch.distributed.get_rank() == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save({f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}, out)
    torch.distributed.barrier()
    if rank == 0:
        meta = {"iteration": 0, "kind": "weights", "layout": {"tp": 2, "pp": 2, "vpp": None, "dp": 1},
                "config": asdict(cfg)}
        (Path(out) / "megatron_emu.json").write_text(json.dumps(meta))


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of ``cmd`` and its descendants, measured by a fresh wrapper
    process whose only children they are."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(r.stderr[-3000:]) if r.returncode else None; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return wall, int(proc.stdout.strip().splitlines()[-1]) / 2**20  # KiB -> GiB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--ffn", type=int, default=6912)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from megatron_emu.config.io import load_config
    from megatron_emu.parallel.local_launch import run_local

    heads = args.hidden // 128
    cfg = load_config(ROOT / "examples" / "configs" / "emu2_tiny.yaml", [
        f"model.lm.hidden_size={args.hidden}", f"model.lm.num_layers={args.layers}",
        f"model.lm.num_attention_heads={heads}", f"model.lm.ffn_hidden_size={args.ffn}",
        "model.lm.max_position_embeddings=2048", "train.seq_length=2048", "model.adapter.n_query=4",
        "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    tok = work / "tok"
    ckpt, hf, back = work / "ckpt", work / "hf", work / "back"
    for d in (ckpt, hf, back):
        shutil.rmtree(d, ignore_errors=True)
    env_py = [sys.executable]
    subprocess.run(env_py + ["-m", "data_tools", "samples", "--out", str(work / "s")], check=True, capture_output=True)
    subprocess.run(env_py + ["-m", "data_tools", "tokenizer", "--train", str(work / "s" / "corpus.txt"),
                             "--vocab-size", "800", "--out", str(tok)], check=True, capture_output=True)
    import dataclasses
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tok)))
    t0 = time.perf_counter()
    run_local(4, _save_random, cfg, str(ckpt))
    build_s = time.perf_counter() - t0
    from megatron_emu.checkpoint.reader import CheckpointReader
    reader = CheckpointReader(ckpt)
    size = sum(reader.shape(k).numel() * 4 for k in reader.shapes)
    conv = [sys.executable, "-m", "megatron_emu.cli.convert"]
    wall_a, rss_a = run_measured(conv + ["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(hf), "--no-progress"])
    wall_b, rss_b = run_measured(conv + ["hf-to-mcore", "--hf", str(hf), "--out", str(back), "--no-progress",
                                         "--set", f"data.tokenizer={tok}"])
    out = {"checkpoint_gib": size / 2**30, "build_and_save_s": build_s,
           "mcore_to_hf": {"wall_s": wall_a, "peak_rss_gib": rss_a, "gb_per_s": size / 1e9 / wall_a,
                           "peak_rss_over_checkpoint": rss_a / (size / 2**30)},
           "hf_to_mcore": {"wall_s": wall_b, "peak_rss_gib": rss_b, "gb_per_s": size / 1e9 / wall_b,
                           "peak_rss_over_checkpoint": rss_b / (size / 2**30)}}
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"checkpoint: {out['checkpoint_gib']:.2f} GiB of model tensors (fp32), built in {build_s:.0f} s")
    for k in ("mcore_to_hf", "hf_to_mcore"):
        r = out[k]
        print(f"{k:12s}: {r['wall_s']:6.1f} s, {r['gb_per_s']:.3f} GB/s, peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"= {r['peak_rss_over_checkpoint']:.2f} x checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
