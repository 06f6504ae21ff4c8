"""Training throughput on one GPU: tokens/s, TFLOP/s, MFU and peak memory of ``megatron-emu-train``,
with the naive heads vs the fused heads measured side by side in one run.

Builds real sample data (photos shipped in scikit-image / scikit-learn / matplotlib, a tiny
tokenizer, preprocessed at the model's image size), then trains a ~1.6B Emu2-shaped model
(ViT 1024 wide x 24 blocks at 224 px, frozen; LM hidden 2048 x 24 layers, seq 2048, bf16) for a
few steps per variant, each in a fresh ``torchrun`` with one process. Figures are the median of
the steps after the first ``--warmup`` (read from each run's metrics.jsonl).

Variants: ``naive`` (lm_ce_impl=plain, regression_impl=naive) and ``fused`` (lm_ce_impl=fused,
regression_impl=fused). Extra ``--set`` overrides apply to both (e.g.
``--set model.transformer_impl=transformer_engine --set train.fp8=hybrid``).

Usage: python bench/bench_train.py [--steps 12] [--warmup 4] [--workdir DIR] [--set KEY=VALUE ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 224

MODEL = [
    f"model.vision.image_size={IMAGE_SIZE}", "model.vision.patch_size=14", "model.vision.width=1024",
    "model.vision.num_layers=24", "model.vision.num_heads=16", "model.vision.mlp_dim=4096",
    "model.adapter.n_query=64", "model.lm.hidden_size=2048", "model.lm.num_layers=24",
    "model.lm.num_attention_heads=16", "model.lm.ffn_hidden_size=5632",
    "model.lm.max_position_embeddings=2048", "model.params_dtype=bfloat16",
    "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
    "parallel.sequence_parallel=false", "train.seq_length=2048", "train.micro_batch_size=1",
    "train.global_batch_size=8", "data.num_workers=4", "checkpoint.save_interval=100000",
    "checkpoint.save_at_end=false", "run.log_interval=1",
]
VARIANTS = {
    "naive": ["model.loss.lm_ce_impl=plain", "model.loss.regression_impl=naive"],
    "fused": ["model.loss.lm_ce_impl=fused", "model.loss.regression_impl=fused"],
}


def build_data(work: Path) -> tuple[Path, Path]:
    """Sample photos + captions -> tokenizer -> image-text pairs and MMC4 documents at 224 px."""
    cli = [sys.executable, "-m", "data_tools.cli"]
    raw, tok = work / "raw", work / "tokenizer"
    if not (work / "data" / "mmc4" / "summary.json").exists():
        subprocess.run([*cli, "samples", "--out", str(raw), "--copies", "2"], check=True, cwd=ROOT)
        subprocess.run([*cli, "tokenizer", "--train", str(raw / "corpus.txt"), "--vocab-size", "800",
                        "--out", str(tok)], check=True, cwd=ROOT)
        for fmt, inp, extra in (("img2dataset", raw / "img2dataset", []),
                                ("mmc4", raw / "mmc4" / "docs.jsonl", ["--images", str(raw / "mmc4" / "images")])):
            subprocess.run([*cli, "preprocess", "--format", fmt, "--input", str(inp), *extra,
                            "--tokenizer", str(tok), "--out", str(work / "data" / ("pairs" if fmt == "img2dataset" else fmt)),
                            "--image-size", str(IMAGE_SIZE), "--workers", "4", "--no-progress"],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return work / "data", tok


def run_variant(name: str, work: Path, data: Path, tok: Path, steps: int, extra: list[str]) -> list[dict]:
    run_dir = work / f"run_{name}"
    sets = [*MODEL, *VARIANTS[name], *extra, f"train.train_iters={steps}",
            f"data.path=['3:{data / 'pairs'}', '1:{data / 'mmc4'}']", f"data.tokenizer={tok}",
            f"run.dir={run_dir}", f"checkpoint.dir={work / f'ckpt_{name}'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "megatron_emu.train", "--config", str(ROOT / "examples" / "configs" / "emu2_tiny.yaml")]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "4"})
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-6000:])
        raise RuntimeError(f"variant {name} failed (exit {proc.returncode})")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarise(rows: list[dict], warmup: int) -> dict:
    steady = [r for r in rows if r["step"] > warmup and not r.get("skipped")] or rows[-1:]
    med = lambda k: statistics.median(r[k] for r in steady if r.get(k) is not None) \
        if any(r.get(k) is not None for r in steady) else None
    return {"steps": len(steady), "step_time_s": med("step_time_s"), "tokens_per_s": med("tokens_per_s"),
            "tflops_per_gpu": med("tflops_per_gpu"), "mfu": med("mfu"),
            "memory_gib": max((r["memory_gib"] or 0.0) for r in rows),
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--workdir", default=None)
    p.add_argument("--variants", default="naive,fused")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("bench_train.py measures GPU training; no CUDA device here", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    data, tok = build_data(work)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sets": args.sets, "variants": {}}
    for name in args.variants.split(","):
        out["variants"][name] = summarise(run_variant(name, work, data, tok, args.steps, args.sets), args.warmup)
    base = next(iter(out["variants"].values()))
    for v in out["variants"].values():
        v["time_vs_first"] = v["step_time_s"] / base["step_time_s"]
        v["memory_vs_first"] = v["memory_gib"] / base["memory_gib"] if base["memory_gib"] else None
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['device']}, torch {out['torch']}; ~1.6B Emu2-shaped model, seq 2048, 8 seq/step, bf16")
    for name, v in out["variants"].items():
        mfu = "-" if v["mfu"] is None else f"{100 * v['mfu']:.1f}%"
        print(f"  {name:6s} {v['step_time_s']:.3f} s/step ({v['time_vs_first']:.2f}x)  {v['tokens_per_s']:.0f} tok/s  "
              f"{v['tflops_per_gpu']:.0f} TFLOP/s  MFU {mfu}  peak {v['memory_gib']:.1f} GiB  "
              f"loss {v['first_loss']:.3f} -> {v['last_loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
