"""Data pipeline throughput, measured side by side in one run.

1. Image decoding, images/s per CPU core: PIL (as the loader workers do) vs DALI's CPU decoder
   (batched, as the main process does), on the same real JPEGs at the model size.
2. Preprocessing: documents/s of ``megatron-emu-data preprocess`` on real photos.
3. Loader: sequences/s and images/s of ``EmuDataLoader`` with N workers, against what one
   training step consumes (global batch) for the tiny and the 37B presets: the number printed
   is "loader seconds per step", to compare with the step time on the target hardware.

Usage: python bench/bench_data.py [--image-size 448] [--copies 4] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn, *args, repeat: int = 3):
    """Best wall time and its CPU time over ``repeat`` runs."""
    best = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), cpu_seconds()
        out = fn(*args)
        w, c = time.perf_counter() - w0, cpu_seconds() - c0
        if best is None or w < best[0]:
            best = (w, c, out)
    return best


def bench_decode(jpegs: list[bytes], size: int) -> dict:
    import torch

    from megatron_emu.data import decode

    torch.set_num_threads(1)
    res = {}
    w, c, _ = timed(lambda: [decode.decode_pil(j, size) for j in jpegs])
    res["pil"] = {"images_per_s": len(jpegs) / w, "images_per_cpu_s": len(jpegs) / max(c, 1e-9)}
    if decode.dali_available():
        for threads in (1, 2):
            dec = decode.DaliDecoder(size, max_batch=64, gpu=False, num_threads=threads)
            dec(jpegs[:8])  # warm-up
            w, c, _ = timed(dec, jpegs)
            res[f"dali_cpu_{threads}t"] = {"images_per_s": len(jpegs) / w,
                                           "images_per_cpu_s": len(jpegs) / max(c, 1e-9)}
        if torch.cuda.is_available():  # nvJPEG on the GPU ("mixed"): images/s per GPU
            dec = decode.DaliDecoder(size, max_batch=64, gpu=True, num_threads=2)
            dec(jpegs[:8])

            def gpu_decode():
                out = dec(jpegs)
                torch.cuda.synchronize()
                return out
            w, c, _ = timed(gpu_decode)
            res["dali_gpu"] = {"images_per_s": len(jpegs) / w, "images_per_cpu_s": len(jpegs) / max(c, 1e-9)}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--copies", type=int, default=4, help="variants per sample photo (volume)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpus-37b", type=int, default=256, help="GPUs of the 37B job (sets its DP size)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    import logging
    logging.disable(logging.WARNING)

    from data_tools.preprocess import Options, run
    from data_tools.samples import write_samples
    from data_tools.tokenizer import build
    from megatron_emu.config.io import load_config
    from megatron_emu.data import shard_format as sf
    from megatron_emu.data.loader import EmuDataLoader, LoaderSpec

    out = {"cpu_cores": os.cpu_count(), "image_size": args.image_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_samples(tmp / "samples", copies=args.copies)
        build(tmp / "tok", train_text=tmp / "samples" / "corpus.txt", vocab_size=800)
        runs = {}
        for fmt, inputs, images in (("img2dataset", [tmp / "samples" / "img2dataset"], None),
                                    ("mmc4", [tmp / "samples" / "mmc4" / "docs.jsonl"], tmp / "samples" / "mmc4" / "images")):
            opts = Options(format=fmt, inputs=[str(i) for i in inputs], images=str(images) if images else None,
                           tokenizer=str(tmp / "tok"), out=str(tmp / fmt), image_size=args.image_size,
                           workers=args.workers, shard_size=16, progress=False)
            w0 = time.perf_counter()
            summary = run(opts)
            w = time.perf_counter() - w0
            runs[fmt] = {"documents": summary["documents"], "images": summary["images"],
                         "documents_per_s": summary["documents"] / w, "images_per_s": summary["images"] / w}
        out["preprocess"] = runs

        meta, index = sf.load_index(tmp / "img2dataset")
        jpegs = []
        for row in index:
            m = sf.read_span(tmp / "img2dataset" / meta["shards"][row[0]], int(row[1]), int(row[2]))
            jpegs += [v for k, v in m.items() if k.endswith(".jpg")]
        out["decode"] = bench_decode(jpegs, args.image_size)

        loader_res = {}
        for preset in ("emu2_tiny", "emu2_37b"):
            cfg = load_config(ROOT / "examples" / "configs" / f"{preset}.yaml")
            spec = LoaderSpec(paths=((3.0, str(tmp / "img2dataset")), (1.0, str(tmp / "mmc4"))),
                              seq_length=cfg.train.seq_length, n_query=cfg.model.adapter.n_query,
                              image_size=args.image_size, micro_batch_size=cfg.train.micro_batch_size,
                              max_images=cfg.data.max_images_per_sequence, num_workers=args.workers,
                              decoder="pil")
            loader = EmuDataLoader(spec)
            next(loader)  # start the workers
            n_batches = max(4, 64 // spec.micro_batch_size)
            w0 = time.perf_counter()
            seqs = imgs = 0
            for _ in range(n_batches):
                b = next(loader)
                seqs += b.tokens.shape[0]
                imgs += b.images.shape[0]
            w = time.perf_counter() - w0
            per_step = cfg.train.global_batch_size
            mp = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
            dp = cfg.parallel.data_parallel_size or (args.gpus_37b // mp if preset == "emu2_37b" else 1)
            loader_res[preset] = {
                "sequences_per_s": seqs / w, "images_per_s": imgs / w,
                "global_batch": per_step, "data_parallel_size": dp,
                # One loader per DP rank feeds global_batch / dp sequences per step.
                "loader_s_per_step_per_rank": (per_step / dp) / (seqs / w)}
        out["loader"] = loader_res

    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"cores: {out['cpu_cores']}, image size {args.image_size}")
    for k, v in out["decode"].items():
        print(f"decode {k:12s}: {v['images_per_s']:8.1f} img/s  {v['images_per_cpu_s']:8.1f} img per CPU-s")
    if "dali_cpu_1t" in out["decode"]:
        ratio = out["decode"]["dali_cpu_1t"]["images_per_cpu_s"] / out["decode"]["pil"]["images_per_cpu_s"]
        print(f"decode ratio DALI-CPU / PIL per CPU-second: {ratio:.2f}x")
    for k, v in out["preprocess"].items():
        print(f"preprocess {k:11s}: {v['documents_per_s']:8.1f} docs/s, {v['images_per_s']:8.1f} img/s "
              f"({v['documents']} docs)")
    for k, v in out["loader"].items():
        print(f"loader {k:10s}: {v['sequences_per_s']:8.1f} seq/s, {v['images_per_s']:8.1f} img/s; "
              f"one step ({v['global_batch']} seq / dp {v['data_parallel_size']}) needs "
              f"{v['loader_s_per_step_per_rank']:.2f} s of loading per rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
