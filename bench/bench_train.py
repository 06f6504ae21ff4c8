"""Training throughput side by side in one run: megatron-core's own GPT (the anchor) against our
Emu2 on text only and with images, per attention backend and precision.

For each available backend (``unfused``, ``sdpa``; ``te`` where Transformer Engine and a GPU are
present) and precision (the model's dtype; ``fp8`` with TE), three runs in this process:
  (a) anchor: megatron-core ``GPTModel`` + its layer spec at our LM's shape, sequence and batch;
  (b) text: our Emu2 through the real training loop on text-only sequences (same data, images
      dropped by ``data.max_images_per_sequence=0``);
  (c) images: our Emu2 on the image-text blend.
Reported per run: tokens/s, TFLOP/s, MFU (GPU), the step split into data wait, ViT, heads and
optimizer (timed in isolation on the same model) and the LM (the rest), peak memory against the
planner's estimate, and the ratios (b)/(a), (c)/(a) of tokens/s. The ViT's measured share of
the step is printed next to the share its FLOPs predict.

GPU: a ~1.7B Emu2-shaped model (ViT 1024 x 24 at 224 px, LM 2048 x 24, seq 2048, bf16).
``--smoke``: the tiny preset on the CPU in seconds (CI runs it). ``--json``: one JSON object per
backend x precision. Usage:
  python bench/bench_train.py [--smoke] [--json] [--steps 10] [--warmup 3] [--backends sdpa,te]
      [--precisions bf16,fp8] [--data DIR --tokenizer DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import train_parts as parts  # noqa: E402

TINY = ROOT / "examples" / "configs" / "emu2_tiny.yaml"
GPU_MODEL = [
    "model.vision.image_size=224", "model.vision.patch_size=14", "model.vision.width=1024",
    "model.vision.num_layers=24", "model.vision.num_heads=16", "model.vision.mlp_dim=4096",
    "model.adapter.n_query=64", "model.lm.hidden_size=2048", "model.lm.num_layers=24",
    "model.lm.num_attention_heads=16", "model.lm.ffn_hidden_size=5632",
    "model.lm.max_position_embeddings=2048", "model.params_dtype=bfloat16",
    "train.seq_length=2048", "train.micro_batch_size=1", "train.global_batch_size=8", "data.num_workers=4",
]
COMMON = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
          "parallel.sequence_parallel=false", "checkpoint.dir=null", "run.log_interval=1000",
          "train.train_iters=100000"]


def build_data(work: Path, image_size: int) -> tuple[list[str], Path]:
    """Sample photos + captions -> tokenizer -> image-text pairs and MMC4 documents."""
    cli = [sys.executable, "-m", "data_tools.cli"]
    raw, tok, data = work / "raw", work / "tokenizer", work / "data"
    if not (data / "mmc4" / "summary.json").exists():
        run = lambda *a: subprocess.run([*cli, *a], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)  # noqa: E731
        run("samples", "--out", str(raw), "--copies", "2")
        run("tokenizer", "--train", str(raw / "corpus.txt"), "--vocab-size", "800", "--out", str(tok))
        run("preprocess", "--format", "img2dataset", "--input", str(raw / "img2dataset"), "--tokenizer",
            str(tok), "--out", str(data / "pairs"), "--image-size", str(image_size), "--no-progress")
        run("preprocess", "--format", "mmc4", "--input", str(raw / "mmc4" / "docs.jsonl"), "--images",
            str(raw / "mmc4" / "images"), "--tokenizer", str(tok), "--out", str(data / "mmc4"),
            "--image-size", str(image_size), "--no-progress")
    return [f"3:{data / 'pairs'}", f"1:{data / 'mmc4'}"], tok


def config(args, backend: str, precision: str, paths, tok, run_dir: Path, text_only: bool):
    from megatron_emu.config.io import load_config

    sets = [*([] if args.smoke else GPU_MODEL), *COMMON, *args.sets,
            f"data.path={json.dumps(paths)}", f"data.tokenizer={tok}", f"run.dir={run_dir}"]
    if backend == "te":
        sets.append("model.transformer_impl=transformer_engine")
    else:
        sets += ["model.transformer_impl=local", f"model.attention_backend={backend}"]
    if precision == "fp8":
        sets += ["train.fp8=hybrid", "train.fp8_recipe=delayed"]
    if text_only:
        sets.append("data.max_images_per_sequence=0")
    return load_config(TINY, sets)


def run_combination(args, backend: str, precision: str, paths, tok, work: Path) -> dict:
    from megatron_emu.training.flops import step_flops
    from megatron_emu.utils import device

    text_cfg = config(args, backend, precision, paths, tok, work / f"{backend}_{precision}_text", True)
    image_cfg = config(args, backend, precision, paths, tok, work / f"{backend}_{precision}_images", False)
    anchor = parts.anchor_run(text_cfg, args.steps, args.warmup)
    text = parts.emu2_run(text_cfg, args.steps, args.warmup, args.repeat)
    images = parts.emu2_run(image_cfg, args.steps, args.warmup, args.repeat)
    tokens = text_cfg.train.global_batch_size * text_cfg.train.seq_length
    peak = device.peak_tflops(text_cfg.model.params_dtype, fp8=precision == "fp8")
    out = {"backend": backend, "precision": precision, "device": _device_name(),
           "anchor_tokens_per_s": tokens / anchor["step_time_s"]}
    for name, r, cfg in (("text", text, text_cfg), ("images", images, image_cfg)):
        flops = step_flops(cfg, cfg.train.global_batch_size, round(r["images_per_step"]))
        tflops = flops / r["step_time_s"] / 1e12
        compute = r["step_time_s"] - r["data_wait_s"]
        vit_flops = flops - step_flops(cfg, cfg.train.global_batch_size, 0)
        out[f"emu2_{name}_tokens_per_s"] = tokens / r["step_time_s"]
        out[f"emu2_{name}"] = {
            "tflops_per_gpu": tflops, "mfu": None if peak is None else tflops / peak,
            "step_time_s": r["step_time_s"], "images_per_step": r["images_per_step"],
            "time_s": {"data_wait": r["data_wait_s"], "vit": r["vit_s"], "heads": r["heads_s"],
                       "optimizer": r["optimizer_s"],
                       "lm": max(0.0, compute - r["vit_s"] - r["heads_s"] - r["optimizer_s"])},
            "data_wait_fraction": r["data_wait_s"] / r["step_time_s"],
            "vit_share_measured": r["vit_s"] / compute if compute > 0 else None,
            "vit_share_flops": vit_flops / flops,
            "memory_gib": r["memory_gib"], "planner_gib": r["planner_gib"],
            "planner_vs_measured": None if not r["memory_gib"] else r["planner_gib"] / r["memory_gib"],
            "loss": [r["first_loss"], r["last_loss"]],
        }
    out["ratio_text_vs_anchor"] = out["emu2_text_tokens_per_s"] / out["anchor_tokens_per_s"]
    out["ratio_images_vs_anchor"] = out["emu2_images_tokens_per_s"] / out["anchor_tokens_per_s"]
    out["mfu"] = out["emu2_images"]["mfu"]
    anchor_tflops = parts.lm_flops_per_step(text_cfg) / anchor["step_time_s"] / 1e12
    out["anchor"] = {"tflops_per_gpu": anchor_tflops, "mfu": None if peak is None else anchor_tflops / peak,
                     "memory_gib": anchor["memory_gib"]}
    return out


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _init_world() -> None:
    import torch.distributed as dist

    from megatron_emu.compat import setup_process

    setup_process()  # megatron-core's CPU layer when there is no GPU (--smoke)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    from megatron_emu.parallel.groups import init_distributed

    init_distributed()
    assert dist.get_world_size() == 1


def _print(r: dict) -> None:
    mfu = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"\n{r['device']}  backend {r['backend']}  precision {r['precision']}")
    print(f"  (a) megatron-core GPT  {r['anchor_tokens_per_s']:10.0f} tok/s  MFU {mfu(r['anchor']['mfu'])}")
    for name in ("text", "images"):
        e = r[f"emu2_{name}"]
        t = e["time_s"]
        print(f"  ({'b' if name == 'text' else 'c'}) Emu2 {name:6s}     {r[f'emu2_{name}_tokens_per_s']:10.0f} tok/s"
              f"  x{r[f'ratio_{name}_vs_anchor']:.3f} of (a)  {e['tflops_per_gpu']:.1f} TFLOP/s  MFU {mfu(e['mfu'])}")
        print(f"      step {e['step_time_s'] * 1e3:.1f} ms: data {t['data_wait'] * 1e3:.1f}  ViT {t['vit'] * 1e3:.1f}"
              f"  LM {t['lm'] * 1e3:.1f}  heads {t['heads'] * 1e3:.1f}  optimizer {t['optimizer'] * 1e3:.1f} ms;"
              f" data wait {100 * e['data_wait_fraction']:.1f}%")
        if name == "images" and e["vit_share_measured"] is not None:
            print(f"      ViT share of compute: measured {100 * e['vit_share_measured']:.1f}%,"
                  f" FLOPs predict {100 * e['vit_share_flops']:.1f}%")
        if e["memory_gib"]:
            print(f"      peak {e['memory_gib']:.2f} GiB, planner {e['planner_gib']:.2f} GiB"
                  f" ({e['planner_vs_measured']:.2f}x)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, a few steps")
    p.add_argument("--json", action="store_true", help="one JSON object per backend x precision")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None, help="repeats of each isolated component timing")
    p.add_argument("--backends", default=None, help="comma list of unfused, sdpa, te (default: all available)")
    p.add_argument("--precisions", default=None, help="comma list of the model dtype and fp8 (default: all)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--data", nargs="*", default=None, help="data.path entries (default: built from samples)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args()
    import logging

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench_train.py measures GPU training; no CUDA device here (use --smoke on a CPU)",
              file=sys.stderr)
        return 2
    args.steps = args.steps or (3 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.repeat = args.repeat or (1 if args.smoke else 5)
    logging.disable(logging.WARNING)  # the training loop's start-up lines; results print below
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    if args.data:
        paths, tok = args.data, Path(args.tokenizer)
    else:
        paths, tok = build_data(work, 56 if args.smoke else 224)
    backends = (args.backends or ",".join(["unfused", "sdpa"] + (["te"] if parts.have_te() else []))).split(",")
    dtype = "fp32" if args.smoke else "bf16"
    _init_world()
    for backend in backends:
        precisions = args.precisions.split(",") if args.precisions else \
            [dtype] + (["fp8"] if backend == "te" else [])
        for precision in precisions:
            result = run_combination(args, backend, precision, paths, tok, work)
            print(json.dumps(result)) if args.json else _print(result)
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
