"""``megatron-emu-data``: the Emu2 tokenizer, dataset preprocessing and shard inspection.

  megatron-emu-data tokenizer --llama-model tokenizer.model --out DIR
  megatron-emu-data tokenizer --train TEXTFILE --vocab-size N --out DIR
  megatron-emu-data preprocess --format {img2dataset,mmc4,obelics,laion,jsonl,webvid,llava,gen}
                               --input PATH... [--images DIR] --tokenizer DIR --out DIR [--image-size 448]
                               [--workers N] [--video-frames 8] [--system-message short|detailed|none]
                               [--overwrite]
  megatron-emu-data inspect DIR [--tokenizer DIR]
  megatron-emu-data samples --out DIR [--copies N]      (real photos + captions, every input format)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-emu-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenizer", help="write an Emu2 tokenizer directory (Hugging Face layout)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--llama-model", help="LLaMA SentencePiece tokenizer.model (32000 pieces)")
    src.add_argument("--train", metavar="TEXTFILE", help="train a small SentencePiece model on this text")
    t.add_argument("--vocab-size", type=int, default=1000, help="pieces to learn with --train (default 1000)")
    t.add_argument("--chat", action="store_true", help="Emu2-Chat: also [USER] and [ASSISTANT] (32274 ids)")
    t.add_argument("--out", required=True, help="output directory")

    pp = sub.add_parser("preprocess", help="inputs -> interleaved-document WebDataset shards")
    pp.add_argument("--format", required=True, choices=["img2dataset", "mmc4", "obelics", "laion", "jsonl", "webvid",
                                                       "llava", "gen"])
    pp.add_argument("--input", nargs="+", required=True, help="input files or directories")
    pp.add_argument("--images", help="image/video folder, or folder of img2dataset/video2dataset tars "
                                     "(joined by URL)")
    pp.add_argument("--video-frames", type=int, default=8,
                    help="frames sampled uniformly from each video (default 8)")
    pp.add_argument("--system-message", choices=["short", "detailed", "none"], default="short",
                    help="llava: the chat template's system message (default short; docs/tuning.md)")
    pp.add_argument("--tokenizer", required=True, help="directory from `megatron-emu-data tokenizer`")
    pp.add_argument("--out", required=True, help="output dataset directory")
    pp.add_argument("--image-size", type=int, default=448, help="square image side (default 448)")
    pp.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    pp.add_argument("--shard-size", type=int, default=1000, help="input records per output shard (default 1000)")
    pp.add_argument("--caption-field", help="caption column/JSON field (laion, img2dataset, webvid)")
    pp.add_argument("--max-pixels", type=int, default=8192 * 8192, help="larger images are skipped")
    pp.add_argument("--no-progress", action="store_true", help="no progress bar")
    pp.add_argument("--overwrite", action="store_true",
                    help="replace another dataset found in --out (refused otherwise)")
    pp.add_argument("--num-tasks", type=int, default=1,
                    help="array jobs: total tasks; each processes every num-tasks-th shard, no merge")
    pp.add_argument("--task-index", type=int, default=None,
                    help="array jobs: this task (default $SLURM_ARRAY_TASK_ID, else 0)")
    pp.add_argument("--merge-only", action="store_true",
                    help="array jobs: write index.npy / dataset.json / summary.json once all shards exist")

    sm = sub.add_parser("samples", help="write real sample photos, videos and captions in every input format")
    sm.add_argument("--out", required=True, help="output directory")
    sm.add_argument("--copies", type=int, default=1, help="flipped/cropped variants per photo (default 1)")

    i = sub.add_parser("inspect", help="validate shards and print a few samples (exit 1 when broken)")
    i.add_argument("dir")
    i.add_argument("--tokenizer", help="also check token ids against this tokenizer")
    i.add_argument("--show", type=int, default=3, help="samples to print (default 3)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "tokenizer":
            from data_tools.tokenizer import build
            build(args.out, llama_model=args.llama_model, train_text=args.train, vocab_size=args.vocab_size,
                  chat=args.chat)
            return 0
        if args.command == "preprocess":
            return _preprocess(args)
        if args.command == "samples":
            from data_tools.samples import write_samples
            print(json.dumps(write_samples(args.out, copies=args.copies)))
            return 0
        return _inspect(args)
    except (OSError, ValueError) as e:
        print(f"megatron-emu-data {args.command}: error: {e}", file=sys.stderr)
        return 2


def _preprocess(args) -> int:
    from data_tools.preprocess import Options, run

    opts = Options(format=args.format, inputs=args.input, tokenizer=args.tokenizer, out=args.out,
                   images=args.images, image_size=args.image_size, workers=args.workers,
                   shard_size=args.shard_size, caption_field=args.caption_field,
                   max_pixels=args.max_pixels, progress=not args.no_progress,
                   video_frames=args.video_frames, system_message=args.system_message,
                   num_tasks=args.num_tasks, merge_only=args.merge_only, overwrite=args.overwrite,
                   task_index=args.task_index if args.task_index is not None
                   else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")) if args.num_tasks > 1 else 0)
    summary = run(opts)
    print(json.dumps(summary, indent=2))
    if args.num_tasks > 1 and not args.merge_only:
        return 0  # one part of an array job; the merge step judges the whole
    if summary["documents"] == 0:
        print("megatron-emu-data preprocess: no valid document was produced", file=sys.stderr)
        return 1
    return 0


def _inspect(args) -> int:
    from data_tools.inspect import inspect

    report = inspect(args.dir, tokenizer=args.tokenizer, show=args.show)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for s in report["samples"]:
            print(f"[{s['key']}] {s['kind']}, {s['images']} image(s): {s['text']}")
        for msg in report["broken"][:50]:
            print(f"BROKEN {msg}")
        print(f"{report['documents']} documents in {report['shards']} shards, "
              f"{len(report['broken'])} problem(s)")
    return 1 if report["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
