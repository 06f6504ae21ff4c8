"""``python -m megatron_emu.launch`` = ``megatron-emu-launch`` (torchrun that saves on SIGTERM/SIGUSR1)."""

import sys

from megatron_emu.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
