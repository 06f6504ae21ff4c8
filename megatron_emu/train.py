"""``python -m megatron_emu.train`` = ``megatron-emu-train``."""

import sys

from megatron_emu.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
