"""Compatibility layers. Importing this package activates the megatron-core CPU layer when
CUDA is absent (a no-op on GPU machines); every megatron-facing package imports it first."""

import warnings

# megatron-core announces its fallbacks at import time, once per module and process; they are
# expected here (Transformer Engine / Apex are optional extras) and said once in our logs.
for _msg in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
             ".*full scope is deprecated.*", ".*deprecated. Please use .*_single.*",
             ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
             # megatron-core's optimizer touches .grad of non-leaf main params (harmless).
             ".*The .grad attribute of a Tensor that is not a leaf Tensor.*"):
    warnings.filterwarnings("ignore", message=_msg)

from megatron_emu.compat.megatron_cpu import activate, is_active  # noqa: E402

activate()

__all__ = ["activate", "is_active"]
