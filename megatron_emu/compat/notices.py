"""megatron-core's import-time notices about optional extras, hidden by the entry points.

megatron-core announces its fallbacks when imported, once per module and process; they are
expected here (Transformer Engine and Apex are optional extras) and, for a training job, said
once in our words (``training/logs.py``). ``hide()`` installs the filters; nothing is filtered
by importing megatron_emu.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

KNOWN = (
    ".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
    ".*full scope is deprecated.*", ".*deprecated. Please use .*_single.*",
    ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    # megatron-core's optimizer touches .grad of non-leaf main params (harmless).
    ".*The .grad attribute of a Tensor that is not a leaf Tensor.*",
    ".*is deprecated, use .*_single.*",
)


def hide(register_undo: Optional[Callable[[Callable[[], None]], None]] = None) -> None:
    """Ignore the ``KNOWN`` notices in this process; ``register_undo(fn)`` receives the function
    that removes exactly these filters again."""
    before = list(warnings.filters)
    for message in KNOWN:
        warnings.filterwarnings("ignore", message=message)
    added = [f for f in warnings.filters if f not in before]

    def undo() -> None:
        for entry in added:
            if entry in warnings.filters:
                warnings.filters.remove(entry)
        mutated = getattr(warnings, "_filters_mutated", None) or getattr(warnings, "_filters_mutated_lock_held", None)
        if mutated is not None:
            mutated()

    if register_undo is not None:
        register_undo(undo)
