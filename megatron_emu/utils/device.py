"""The one module that decides about devices: CUDA + NCCL when a GPU is present, else CPU + gloo.

Nothing else in megatron_emu touches ``torch.cuda`` (a test greps for it).
"""

from __future__ import annotations

import os

import torch


def has_cuda() -> bool:
    """A GPU is present and not hidden (``CUDA_VISIBLE_DEVICES=""`` hides it, also when the
    CUDA runtime was initialised before the variable was set, e.g. in a forked CPU-only rank)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    return torch.cuda.is_available()


def backend() -> str:
    return "nccl" if has_cuda() else "gloo"


def device() -> torch.device:
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_index() -> int:
    """Index of this process's GPU (0 on CPU)."""
    return torch.cuda.current_device() if has_cuda() else 0


def rng_state() -> torch.Tensor:
    return torch.cuda.get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    torch.cuda.set_rng_state(state)


def peak_tflops(dtype: str, fp8: bool = False) -> float | None:
    """Dense peak TFLOP/s of this GPU for MFU (H100 SXM: 989 bf16, 1979 fp8); None on CPU or
    an unknown GPU."""
    if not has_cuda():
        return None
    name = torch.cuda.get_device_name()
    table = {"H100": (989.4, 1978.9), "H200": (989.4, 1978.9), "A100": (312.0, None)}
    for key, (bf16, f8) in table.items():
        if key in name:
            if fp8 and f8:
                return f8
            return bf16 if dtype == "bfloat16" else bf16 / 2
    return None


def set_local_device() -> None:
    """Bind this process to its GPU (``LOCAL_RANK``); nothing on CPU."""
    if has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def synchronize() -> None:
    if has_cuda():
        torch.cuda.synchronize()


def max_memory_gib() -> float | None:
    """Peak allocated device memory in GiB (None on CPU)."""
    if has_cuda():
        return torch.cuda.max_memory_allocated() / 2**30
    return None
