"""See module docstrings."""

import megatron_emu.compat  # noqa: F401  (must precede every megatron-core import)
