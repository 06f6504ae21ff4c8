"""A stand-in for ``torch.cuda`` while the CPU layer is on (``cpu.enable_cpu``).

``torch.cuda`` (the attribute of the ``torch`` package, through which megatron-core and torch
reach it) is replaced by a module object that answers:

* ``COVERED`` names with CPU stand-ins (the device is the CPU, streams and events do nothing, the
  "CUDA" RNG is the CPU generator), for every caller, as megatron-core needs them;
* ``PASSED`` names with the real ``torch.cuda`` attribute (right on a machine without CUDA:
  ``is_available()`` is False, ``device_count()`` 0, ...);
* any other name: the real attribute for callers outside megatron-core, and a
  ``CpuCompatError`` naming the attribute when megatron-core itself reaches it, so that a
  megatron-core release reaching something new fails loudly instead of running CUDA code paths
  half-patched.

Which names megatron-core reaches on our paths was measured by running the CPU test suite
(unit, distributed, training, conversion, ops, data, the quickstart and the benchmark smoke run)
with the stand-in recording instead of raising (``enable_cpu(strict=False)``, then
``reached_cuda_names()``). On megatron-core 0.16.1 they are ``current_device``,
``synchronize``, ``get_rng_state``, ``manual_seed`` (covered) and ``is_available`` (passed);
``COVERED`` also keeps the streams, events and the rest that the overlapped-communication and
asynchronous-save paths use.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch


class CpuCompatError(RuntimeError):
    """megatron-core reached a ``torch.cuda`` attribute the CPU layer has no stand-in for."""


class NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event`` (and their context-manager use)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *a, **k: None


def _manual_seed(seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)


COVERED: dict[str, Any] = {
    # device
    "current_device": lambda: torch.device("cpu"),
    "set_device": lambda *a, **k: None,
    "synchronize": lambda *a, **k: None,
    "empty_cache": lambda: None,
    # streams and events
    "Stream": NullStream,
    "Event": NullStream,
    "current_stream": lambda *a, **k: NullStream(),
    "default_stream": lambda *a, **k: NullStream(),
    "stream": lambda *a, **k: NullStream(),
    # the "CUDA" RNG is the CPU generator
    "get_rng_state": lambda *a, **k: torch.get_rng_state(),
    "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
    "manual_seed": _manual_seed,
    "manual_seed_all": _manual_seed,
}

# Real attributes, correct on a machine without CUDA.
PASSED = frozenset({
    "is_available", "is_initialized", "device_count", "_is_compiled", "is_bf16_supported",
    "amp", "nvtx", "memory", "random", "FloatTensor", "HalfTensor", "BFloat16Tensor",
    "OutOfMemoryError",
})


class CudaStandIn(types.ModuleType):
    """``torch.cuda`` while the CPU layer is on (see the module docstring)."""

    def __init__(self, real: types.ModuleType, strict: bool = True):
        super().__init__(real.__name__, real.__doc__)
        vars(self).update(_real=real, _strict=strict, _reached={})

    def __getattr__(self, name: str):  # only for names not in the instance dict
        if name in COVERED:
            self._record(name, covered=True)
            return COVERED[name]
        real = vars(self)["_real"]
        if name.startswith("__"):
            return getattr(real, name)
        if name in PASSED:
            self._record(name, covered=True)
            return getattr(real, name)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron."):
            self._record(name, covered=False)
            if vars(self)["_strict"]:
                raise CpuCompatError(
                    f"megatron-core ({caller}) reached torch.cuda.{name}, which megatron_emu's CPU layer "
                    f"has no stand-in for; add one to megatron_emu/compat/cuda_standin.py or run on a GPU")
        return getattr(real, name)

    def _record(self, name: str, covered: bool) -> None:
        caller = sys._getframe(2).f_globals.get("__name__", "")
        if caller.startswith("megatron."):
            vars(self)["_reached"].setdefault(name, covered)

    def reached(self) -> dict[str, bool]:
        """``{name: covered}`` of the attributes megatron-core reached so far."""
        return dict(vars(self)["_reached"])
