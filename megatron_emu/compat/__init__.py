"""Compatibility layers, all explicit: importing megatron_emu changes nothing in torch,
megatron-core or the warning filters.

* ``setup_process()``: what an entry point (``megatron-emu-train``, the local launcher's ranks,
  the tests' process fixtures, the benchmarks) calls before it imports megatron-core: on a
  machine without CUDA ``enable_cpu()``; with CUDA the megatron-core version check and the
  known import notices hidden.
* ``enable_cpu()`` / ``disable()``: megatron-core on CPU/gloo, and back (``cpu.py``).
* ``check_megatron_version()``: the megatron-core versions this code was written for (``version.py``).
* ``distopt.apply()``: fixes of megatron-core's distributed optimizer over torch's Adam.
"""

from __future__ import annotations

from megatron_emu.compat.cpu import disable, enable_cpu, is_enabled, reached_cuda_names
from megatron_emu.compat.cuda_standin import CpuCompatError
from megatron_emu.compat.version import check_megatron_version


def setup_process(cpu: bool | None = None) -> None:
    """Prepare this process for megatron-core: ``enable_cpu()`` when ``cpu`` (default: no CUDA
    device is visible), otherwise check the megatron-core version and hide its known notices."""
    from megatron_emu.compat import notices
    from megatron_emu.utils import device

    if cpu is None:
        cpu = not device.has_cuda()
    if cpu:
        enable_cpu()
    else:
        check_megatron_version()
        notices.hide()


__all__ = ["CpuCompatError", "check_megatron_version", "disable", "enable_cpu", "is_enabled", "reached_cuda_names",
           "setup_process"]
