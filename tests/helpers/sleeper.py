"""A launcher's stand-in rank: sleeps (ignoring nothing, handling nothing) or exits at once with
``--exit CODE``; for testing megatron-emu-launch without training."""

import sys
import time

if __name__ == "__main__":
    if "--exit" in sys.argv:
        sys.exit(int(sys.argv[sys.argv.index("--exit") + 1]))
    time.sleep(600)
