"""``megatron-emu-generate``: text generation after an interleaved prompt, on CPU or GPU.

  megatron-emu-generate (--ckpt DIR | --hf HFDIR) (--prompt TEXT [--image PATH ...] [--video PATH ...]
                        | --prompt-ids 1,2,3) [--chat [--system-message short|detailed|none]]
                        [--max-new-tokens N] [--greedy] [--json]

``<image>`` in --prompt marks where each --image goes (in order), ``<video>`` where each --video
goes (its frames sampled as preprocessing samples them: data.video_frames of the checkpoint's
config, or --video-frames); --chat puts the prompt in the Emu2-Chat template (docs/tuning.md)
and the answer follows ``[ASSISTANT]:``; --json prints
{"prompt_ids": [...], "output_ids": [...], "text": "..."} (output_ids: the new tokens only).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-emu-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="megatron_emu checkpoint (checkpoint.dir, an iter dir, or a converted dir)")
    src.add_argument("--hf", help="Hugging Face Emu2 directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text; each <image> is replaced by the next --image")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids (used as is)")
    p.add_argument("--image", action="append", default=[], help="image file for the next <image>")
    p.add_argument("--video", action="append", default=[], help="video file for the next <video>")
    p.add_argument("--video-frames", type=int, help="frames sampled per video (default: data.video_frames)")
    p.add_argument("--chat", action="store_true",
                   help="Emu2-Chat: put --prompt in the chat template ([USER]: ... [ASSISTANT]:; docs/tuning.md)")
    p.add_argument("--system-message", choices=["short", "detailed", "none"], default="short",
                   help="--chat: the system message (default short)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="do not check the checkpoint's checksums.json")
    return p


def _run(rank: int, args) -> dict:
    from megatron_emu.data.tokenizer import Emu2Tokenizer
    from megatron_emu.inference.generate import generate, load_images, load_model, prompt_ids

    model, cfg, tok_dir = load_model(ckpt=args.ckpt, hf=args.hf, verify=not args.no_verify)
    tok_dir = args.tokenizer or tok_dir
    tokenizer = Emu2Tokenizer(tok_dir) if tok_dir else None
    if args.chat or args.video or (args.prompt and "<video>" in args.prompt):
        return _run_with_videos(args, model, cfg, tokenizer)
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("no tokenizer: pass --tokenizer DIR")
        ids, n_images = prompt_ids(args.prompt, tokenizer, cfg.model.adapter.n_query)
        if n_images != len(args.image):
            raise ValueError(f"the prompt has {n_images} <image> placeholder(s) but {len(args.image)} --image")
    else:
        ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    images = load_images(args.image, cfg.model.vision.image_size) if args.image else None
    out = generate(model, ids, images, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                   top_k=args.top_k, seed=args.seed)
    text = tokenizer.decode(out) if tokenizer else ""
    return {"prompt_ids": ids, "output_ids": out, "text": text}


def _run_with_videos(args, model, cfg, tokenizer) -> dict:
    """A prompt with ``<video>`` (and maybe ``<image>``) placeholders, or any prompt with ``--chat``."""
    import torch

    from megatron_emu.inference.generate import generate, load_images
    from megatron_emu.contracts import chat_template, vocab
    from megatron_emu.inference.video import chat_prompt_ids, load_video, prompt_ids

    what = "--chat" if args.chat else "--video"
    if args.prompt is None or tokenizer is None:
        raise ValueError(f"{what} needs --prompt and a tokenizer (--tokenizer DIR)")
    if args.chat and (cfg.model.lm.vocab_size < vocab.CHAT_VOCAB_SIZE or not tokenizer.chat):
        raise ValueError(f"--chat needs a chat model and tokenizer ([USER] / [ASSISTANT]: model.lm.vocab_size "
                         f"{vocab.CHAT_VOCAB_SIZE}, `megatron-emu-data tokenizer --chat`); this one has "
                         f"{cfg.model.lm.vocab_size} ids{'' if tokenizer.chat else ' and a tokenizer without them'}")
    frames = args.video_frames or cfg.data.video_frames
    if frames < 1:
        raise ValueError(f"--video-frames {frames}: must be >= 1")
    if args.chat:
        ids, order = chat_prompt_ids(args.prompt, chat_template.system_message(args.system_message), tokenizer,
                                     cfg.model.adapter.n_query, frames)
    else:
        ids, order = prompt_ids(args.prompt, tokenizer, cfg.model.adapter.n_query, frames)
    for kind, given in (("image", args.image), ("video", args.video)):
        if order.count(kind) != len(given):
            raise ValueError(f"the prompt has {order.count(kind)} <{kind}> placeholder(s) but {len(given)} --{kind}")
    size, files = cfg.model.vision.image_size, {"image": iter(args.image), "video": iter(args.video)}
    visual = [load_images([next(files[k])], size) if k == "image" else load_video(next(files[k]), frames, size)
              for k in order]
    out = generate(model, ids, torch.cat(visual) if visual else None, args.max_new_tokens, greedy=args.greedy,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    return {"prompt_ids": ids, "output_ids": out, "text": tokenizer.decode(out)}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from megatron_emu.parallel.local_launch import run_local

    try:
        (result,) = run_local(1, _run, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"megatron-emu-generate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else result["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
