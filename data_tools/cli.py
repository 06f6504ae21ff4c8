"""``megatron-emu-data {tokenizer,preprocess,inspect}``: not implemented yet (the data issue)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-emu-data", description=__doc__)
    p.add_argument("command", choices=["tokenizer", "preprocess", "inspect"])
    args, _ = p.parse_known_args(argv)
    print(f"megatron-emu-data {args.command}: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
