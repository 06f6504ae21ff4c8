"""Fused operators: the chunked linear + MSE of the regression head (``fused_linear_mse``),
backed by the ``megatron_emu::l2_loss_grad_`` C++/CUDA operator (``csrc/``) or pure torch."""

from megatron_emu.ops._ext import has_extension, l2_loss_grad_, l2_loss_grad_torch
from megatron_emu.ops.fused_linear_mse import default_chunk_size, fused_linear_mse

__all__ = ["fused_linear_mse", "default_chunk_size", "l2_loss_grad_", "l2_loss_grad_torch", "has_extension"]
