"""``megatron-emu-convert``: checkpoints to and from the Hugging Face layouts, on CPU.

  megatron-emu-convert mcore-to-hf --ckpt DIR [--iteration N] --out HFDIR [--dtype bf16|fp32]
                                   [--layout hf|native | --lm-only]
  megatron-emu-convert hf-to-mcore --hf HFDIR|FILE [--config FILE.yaml] --out DIR [--tp T --pp P]
  megatron-emu-convert hf-to-mcore --llama DIR [--vision DIR] --config FILE.yaml --out DIR [--tp T --pp P]

--hf reads BAAI's Hugging Face layout (model.* keys, fused ViT qkv.bias) and its native GitHub layout
(visual.* / decoder.lm.* keys, separate q_bias / v_bias), as safetensors (one file or shards with an
index) or torch .bin files (loaded with torch.load(weights_only=True): nothing in them runs). The
tokenizer of the HF directory (or data.tokenizer) is copied into the checkpoint; mcore-to-hf uses the
checkpoint's copy, so it needs --tokenizer only for checkpoints saved without one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-emu-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("mcore-to-hf", help="megatron_emu checkpoint (any layout) -> Hugging Face")
    a.add_argument("--ckpt", required=True, help="checkpoint.dir (uses `latest`) or one iter_NNNNNNN directory")
    a.add_argument("--iteration", type=int, help="convert this iteration instead of `latest`")
    a.add_argument("--out", required=True, help="new output directory")
    a.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="tensor dtype (default fp32)")
    a.add_argument("--layout", choices=["hf", "native"], default="hf",
                   help="hf (default): BAAI/Emu2's Hugging Face layout plus our configuration_emu.py / "
                        "modeling_emu.py (AutoModelForCausalLM with trust_remote_code=True); native: the "
                        "state dict BAAI's GitHub EmuModel loads with strict=True")
    a.add_argument("--lm-only", action="store_true", help="a plain LlamaForCausalLM directory")
    a.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's own copy, else its "
                                       "data.tokenizer)")
    a.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--no-verify", action="store_true", help="do not check the checkpoint's checksums.json")
    b = sub.add_parser("hf-to-mcore", help="Hugging Face (Emu2, or LLaMA [+ EVA]) -> megatron_emu checkpoint")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Emu2 directory or weights file (HF or BAAI native layout, safetensors or .bin)")
    src.add_argument("--llama", help="LLaMA directory (LlamaForCausalLM safetensors); the rest starts fresh")
    b.add_argument("--vision", help="with --llama: an EVA vision tower (visual.* / model.visual.* tensors)")
    b.add_argument("--config", help="YAML preset for what the inputs do not define (required with --llama, and "
                                    "with --hf weights that have no config.json beside them)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--out", required=True, help="new output directory")
    b.add_argument("--tp", type=int, default=1, help="tensor-parallel size to save at (default 1)")
    b.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to save at (default 1)")
    b.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from megatron_emu.checkpoint.convert import ConversionError, hf_to_mcore, mcore_to_hf
    from megatron_emu.checkpoint.reader import CheckpointReadError
    from megatron_emu.contracts.checkpoint_format import CheckpointFileError
    from megatron_emu.checkpoint.safetensors_io import SafetensorsError

    try:
        if args.command == "mcore-to-hf":
            result = mcore_to_hf(args.ckpt, args.out, iteration=args.iteration, dtype=args.dtype,
                                 lm_only=args.lm_only, layout=args.layout, tokenizer=args.tokenizer,
                                 max_shard_gb=args.max_shard_gb, progress=not args.no_progress,
                                 verify=not args.no_verify)
        else:
            result = hf_to_mcore(args.out, hf=args.hf, llama=args.llama, vision=args.vision, config=args.config,
                                 overrides=tuple(args.overrides), tp=args.tp, pp=args.pp,
                                 progress=not args.no_progress)
    except (ConversionError, CheckpointReadError, CheckpointFileError, SafetensorsError, FileNotFoundError,
            KeyError) as e:
        print(f"megatron-emu-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
