"""``megatron-emu-generate``: not implemented yet (its own issue); answers --help."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="megatron-emu-generate", description=__doc__).parse_args(argv)
    print("megatron-emu-generate: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
