"""Compatibility layers. Importing this package activates the megatron-core CPU layer when
CUDA is absent (a no-op on GPU machines); every megatron-facing package imports it first."""

from megatron_emu.compat.megatron_cpu import activate, is_active

activate()

__all__ = ["activate", "is_active"]
