"""Loading the C++/CUDA extension (``megatron_emu._C`` / ``_C_cuda``) and the pure-torch kernel.

The operator ``torch.ops.megatron_emu.l2_loss_grad_`` comes from the compiled extension. When
it is missing (built with MEGATRON_EMU_BUILD_CUDA=0 and no compiler, an isolated build
without torch, ...) everything falls back to the torch kernel below with one log line.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("megatron_emu.ops")
_STATE: dict = {}


def _load() -> dict:
    if _STATE:
        return _STATE
    try:
        import megatron_emu._C  # noqa: F401  (registers the schema + CPU kernel)
        _STATE["cpu"] = True
    except ImportError as e:
        _STATE["cpu"] = False
        log.info("megatron_emu C++ extension not built (%s): using the pure-torch l2 kernel", e)
    try:
        import megatron_emu._C_cuda  # noqa: F401  (registers the CUDA kernel)
        _STATE["accelerator"] = True
    except ImportError:
        _STATE["accelerator"] = False
    if _STATE["cpu"]:
        _register_fake()
    return _STATE


def _register_fake() -> None:
    @torch.library.register_fake("megatron_emu::l2_loss_grad_")
    def _(pred, target, grad_scale):
        dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
        return pred.new_empty((pred.shape[0],), dtype=dtype)


def has_extension(device: torch.device | str = "cpu") -> bool:
    state = _load()
    # CPU tensors use the C++ kernel; accelerator tensors the CUDA kernel.
    return state["cpu"] if torch.device(device).type == "cpu" else state["accelerator"]


def l2_loss_grad_torch(pred: torch.Tensor, target: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """Same contract as the operator: returns the per-row squared error (op-math dtype) and
    overwrites ``pred`` with ``2 * grad_scale * (pred - target)``."""
    opmath = torch.float64 if pred.dtype == torch.float64 else torch.float32
    pred.sub_(target)
    row_loss = torch.linalg.vector_norm(pred, dim=1, dtype=opmath).square()
    pred.mul_(2.0 * grad_scale)
    return row_loss


def l2_loss_grad_(pred: torch.Tensor, target: torch.Tensor, grad_scale: float,
                  backend: str = "auto") -> torch.Tensor:
    """Dispatch to the extension (``ext``) or the torch kernel (``torch``); ``auto`` prefers
    the extension for the tensor's device."""
    if backend not in ("auto", "ext", "torch"):
        raise ValueError(f"backend must be auto, ext or torch, got {backend!r}")
    # Checked here as well as in C++: an exception thrown inside an extension built with another
    # GCC than torch's can crash the process (seen on a GPU machine) instead of raising.
    if pred.dim() != 2 or pred.shape != target.shape or pred.dtype != target.dtype \
            or pred.device != target.device:
        raise ValueError(f"l2_loss_grad_: pred and target must be [rows, D] of one dtype and device, got "
                         f"{tuple(pred.shape)} {pred.dtype} {pred.device} and {tuple(target.shape)} "
                         f"{target.dtype} {target.device}")
    if not (pred.is_contiguous() and target.is_contiguous()):
        raise ValueError("l2_loss_grad_: pred and target must be contiguous")
    use_ext = backend == "ext" or (backend == "auto" and has_extension(pred.device))
    if use_ext:
        if not has_extension(pred.device):
            raise RuntimeError(f"the megatron_emu extension for {pred.device.type} is not built")
        return torch.ops.megatron_emu.l2_loss_grad_(pred, target, float(grad_scale))
    return l2_loss_grad_torch(pred, target, grad_scale)
