"""megatron-core on CPU/gloo: the explicit switch ``enable_cpu()`` / ``disable()``.

megatron-core assumes CUDA throughout: ``torch.cuda.current_device()`` as a device,
``device='cuda'`` literals, the CUDA RNG behind its model-parallel RNG tracker, CUDA streams in
the gradient buffers and pipeline p2p, and ``tensor.type() == 'torch.cuda.FloatTensor'``
asserts in the optimizer. Nothing is changed when megatron_emu is imported; an entry point that
runs on a CPU calls ``enable_cpu()`` (through ``compat.setup_process()``) before it imports
megatron-core, which patches exactly these points, and ``disable()`` puts every one back:

==============  ========================================================================
patch           effect
==============  ========================================================================
cuda            ``torch.cuda`` is a stand-in (``cuda_standin.py``): CPU device, no-op streams,
                events and synchronisation, the CPU generator as the "CUDA" RNG; a name
                megatron-core reaches that it does not cover raises an error naming it
factories       torch factory functions, ``Tensor.new_*``/``to``/``cuda``: a CUDA device -> CPU;
                ``Tensor.type()`` reports ``torch.cuda.*`` names (megatron's dtype asserts)
rng             megatron-core's tracker reads and sets the CPU generator's state
fastsave        dist_checkpointing's results queue is an in-process ``queue.Queue`` (no spawn
                ``Manager``: synchronous saves only)
jit             megatron-core is imported with ``torch.compile`` as the identity (its jit
                fusions stay eager; torch._dynamo is not imported)
==============  ========================================================================

No megatron source file is edited; our own code never uses CUDA literals (``utils/device.py`` is
the one device module), so the patches only change megatron-core's behaviour.
"""

from __future__ import annotations

import functools
import logging
import queue
import sys
from typing import Any, Optional

import torch

from megatron_emu.compat import cuda_standin, notices
from megatron_emu.compat.version import check_megatron_version

log = logging.getLogger(__name__)

_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
    "randint", "randperm", "eye", "linspace", "empty_strided", "zeros_like", "ones_like",
    "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "logspace",
)
_TENSOR_NEW = ("new_tensor", "new_zeros", "new_ones", "new_empty", "new_full")
_MISSING = object()


class _Patches:
    """Attribute replacements, undone in reverse order (an attribute the object did not hold
    itself, e.g. a method inherited from ``torch._C.TensorBase``, is deleted again)."""

    def __init__(self):
        self._undo: list = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, vars(obj).get(name, _MISSING)))
        setattr(obj, name, value)

    def add_undo(self, fn) -> None:
        self._undo.append(fn)

    def restore(self) -> None:
        while self._undo:
            item = self._undo.pop()
            if callable(item):
                item()
                continue
            obj, name, old = item
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


_patches: Optional[_Patches] = None
_standin: Optional[cuda_standin.CudaStandIn] = None


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _cpu_kwargs(kwargs: dict) -> dict:
    if _is_cuda(kwargs.get("device")):
        kwargs["device"] = "cpu"
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return kwargs


def _wrap_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **_cpu_kwargs(kwargs))

    return wrapper


def _patch_factories(p: _Patches) -> None:
    # torch's device contexts (``with torch.device("meta")``, used by megatron-core and
    # transformers alike) recognise factories by identity in a set cached on first use: fill
    # it with the original functions before wrapping them, so the contexts keep working.
    from torch.utils import _device

    _device._device_constructors()
    for name in _FACTORIES:
        if hasattr(torch, name):
            p.set(torch, name, _wrap_factory(getattr(torch, name)))
    for name in _TENSOR_NEW:
        p.set(torch.Tensor, name, _wrap_factory(getattr(torch.Tensor, name)))

    orig_to, orig_type = torch.Tensor.to, torch.Tensor.type

    def to(self, *args, **kwargs):
        args = tuple("cpu" if _is_cuda(a) and not isinstance(a, bool) else a for a in args)
        return orig_to(self, *args, **_cpu_kwargs(kwargs))

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = orig_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        if isinstance(dtype, str):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return orig_type(self, dtype, non_blocking, **kwargs)

    p.set(torch.Tensor, "to", to)
    p.set(torch.Tensor, "type", type_)
    p.set(torch.Tensor, "cuda", lambda self, *a, **k: self)
    p.set(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    p.set(torch.Tensor, "record_stream", lambda self, *a, **k: None)


class _DropTrackerWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron(p: _Patches) -> None:
    """megatron-core's RNG tracker and checkpoint results queue (imported eagerly first)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    from megatron.core.tensor_parallel import random as mrandom

    p.set(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    p.set(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    tracker_log, drop = logging.getLogger(mrandom.__name__), _DropTrackerWarning()
    tracker_log.addFilter(drop)
    p.add_undo(lambda: tracker_log.removeFilter(drop))
    results: queue.Queue = queue.Queue()
    for name in ("_get_write_results_queue", "get_write_results_queue"):
        if hasattr(fsa, name):
            p.set(fsa, name, lambda: results)


def _import_megatron_eagerly(p: _Patches) -> None:
    """Import megatron.core with ``torch.compile`` as the identity (its jit fusions stay eager,
    and torch._dynamo/_inductor are not imported: ~1.5 s per process on 2 cores)."""
    already = "megatron.core.jit" in sys.modules
    orig_compile = torch.compile
    torch.compile = lambda fn=None, *a, **k: fn if fn is not None else (lambda f: f)
    try:
        import megatron.core  # noqa: F401
        import megatron.core.jit as mjit
        import megatron.core.pipeline_parallel  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401
        import megatron.core.transformer  # noqa: F401
    finally:
        torch.compile = orig_compile
    p.set(mjit, "jit_fuser", mjit.noop_decorator)
    if already:
        log.debug("megatron-core was imported before enable_cpu(): its fusions decorated then stay compiled")


def enable_cpu(strict: bool = True) -> None:
    """Run megatron-core on this process's CPU (idempotent). Checks the megatron-core version,
    hides its known import notices, imports it eagerly and applies the patches of the module
    docstring. ``strict``: a ``torch.cuda`` name megatron-core reaches without a stand-in
    raises (``False`` only records it, ``reached_cuda_names()``: for measuring)."""
    global _patches, _standin
    if _patches is not None:
        return
    version = check_megatron_version()
    p = _Patches()
    try:
        notices.hide(p.add_undo)
        _import_megatron_eagerly(p)
        _patch_factories(p)
        _standin = cuda_standin.CudaStandIn(torch.cuda, strict=strict)
        p.set(torch, "cuda", _standin)
        _patch_megatron(p)
    except BaseException:
        p.restore()
        _standin = None
        raise
    _patches = p
    log.debug("megatron-core %s: CPU compatibility layer enabled", version)


def disable() -> None:
    """Undo ``enable_cpu()``: torch, megatron-core and the warning filters as they were."""
    global _patches, _standin
    if _patches is not None:
        _patches.restore()
    _patches = _standin = None


def is_enabled() -> bool:
    return _patches is not None


def reached_cuda_names() -> dict[str, bool]:
    """``{torch.cuda name: covered}`` megatron-core reached while the layer was on."""
    return {} if _standin is None else _standin.reached()
