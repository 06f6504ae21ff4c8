"""megatron-core on CPU/gloo: the isolated compatibility layer.

megatron-core assumes CUDA throughout: ``torch.cuda.current_device()`` as a device,
``device='cuda'`` literals, the CUDA RNG behind its model-parallel RNG tracker, CUDA streams in
the gradient buffers and pipeline p2p, and ``tensor.type() == 'torch.cuda.FloatTensor'``
asserts in the optimizer (see megatron_core_cpu.md §3). When CUDA is absent, ``activate()``
patches exactly those points at run time:

==============  ========================================================================
patch           effect
==============  ========================================================================
device          ``torch.cuda.current_device()`` -> ``torch.device('cpu')``
factories       torch factory functions, ``Tensor.new_*``/``to``/``cuda``: a CUDA device -> CPU;
                ``Tensor.type()`` reports ``torch.cuda.*`` names (megatron's dtype asserts)
cudaapi         streams, events, ``synchronize``, ``set_device``, ``record_stream``: no-ops
rng             the "CUDA" RNG state is the CPU generator's state (tracker fork/restore,
                ``model_parallel_cuda_manual_seed``, activation recompute)
fastsave        dist_checkpointing's results queue is an in-process ``queue.Queue`` (no spawn
                ``Manager``: synchronous saves only)
jit             ``torch.compile`` is the identity while megatron imports (eager fusions)
==============  ========================================================================

Nothing here runs when ``torch.cuda.is_available()``; no megatron source file is edited.
Our own code never uses CUDA literals (``utils/device.py`` is the one device module), so the
patches only change megatron-core's behaviour. The layer is checked against the versions in
``TESTED_VERSIONS``; others get one warning, and the CPU equivalence tests are the gate.
"""

from __future__ import annotations

import functools
import logging
import queue
import warnings
from typing import Any

import torch

log = logging.getLogger(__name__)

TESTED_VERSIONS = ("0.16.1", "0.19.2")
_ACTIVE = False

_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
    "randint", "randperm", "eye", "linspace", "empty_strided", "zeros_like", "ones_like",
    "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "logspace",
)
_TENSOR_NEW = ("new_tensor", "new_zeros", "new_ones", "new_empty", "new_full")


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


def _patch_factories() -> None:
    # torch's device contexts (``with torch.device("meta")``, used by megatron-core and
    # transformers alike) recognise factories by identity in a set cached on first use: fill
    # it with the original functions before wrapping them, so the contexts keep working.
    from torch.utils import _device

    _device._device_constructors()
    for name in _FACTORIES:
        if hasattr(torch, name):
            setattr(torch, name, _wrap_factory(getattr(torch, name)))
    for name in _TENSOR_NEW:
        setattr(torch.Tensor, name, _wrap_factory(getattr(torch.Tensor, name)))

    orig_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if _is_cuda(a) and not isinstance(a, bool) else a for a in args)
        return orig_to(self, *args, **_cpu_kwargs(kwargs))

    orig_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = orig_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        if isinstance(dtype, str):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.Tensor.record_stream = lambda self, *a, **k: None


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event`` (and their context-manager use)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *a, **k: None


def _patch_cuda_api() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: _NullStream()
    cuda.empty_cache = lambda: None


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.random.default_generator.manual_seed(seed)
    torch.cuda.manual_seed_all = torch.cuda.manual_seed
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    class _DropTrackerWarning(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mrandom.__name__).addFilter(_DropTrackerWarning())


def _patch_fastsave() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    q: queue.Queue = queue.Queue()
    for name in ("_get_write_results_queue", "get_write_results_queue"):
        if hasattr(fsa, name):
            setattr(fsa, name, lambda: q)


def _import_megatron_eagerly() -> None:
    """Import megatron.core with ``torch.compile`` as the identity (its jit fusions stay eager,
    and torch._dynamo/_inductor are not imported: ~1.5 s per process on 2 cores)."""
    orig_compile = torch.compile
    torch.compile = lambda fn=None, *a, **k: fn if fn is not None else (lambda f: f)
    try:
        import megatron.core  # noqa: F401
        import megatron.core.jit as mjit
        import megatron.core.pipeline_parallel  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401
        import megatron.core.transformer  # noqa: F401

        mjit.jit_fuser = mjit.noop_decorator
    finally:
        torch.compile = orig_compile


def activate() -> bool:
    """Apply the CPU patches once when CUDA is absent; returns whether they are active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    from megatron_emu.utils import device

    if device.has_cuda():
        return False
    _import_megatron_eagerly()
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version not in TESTED_VERSIONS:
        warnings.warn(
            f"megatron-core {version}: the CPU compatibility layer was checked on "
            f"{', '.join(TESTED_VERSIONS)}; run the CPU equivalence tests before trusting it",
            stacklevel=2,
        )
    warnings.filterwarnings("ignore", message=".*is deprecated, use .*_single.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    _patch_factories()
    _patch_cuda_api()
    _patch_rng()
    _patch_fastsave()
    _ACTIVE = True
    log.debug("megatron-core %s: CPU compatibility layer active", version)
    return True


def is_active() -> bool:
    return _ACTIVE
