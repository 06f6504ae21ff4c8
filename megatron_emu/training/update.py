"""One optimizer update after the backward passes of a step (shared by the training loop and
the tests that check it against a reference)."""

from __future__ import annotations

import math

import torch

from megatron_emu.training.grad_norm import clip_grads_, global_grad_norm


def apply_update(optimizer, scheduler, clip_grad: float, losses: torch.Tensor,
                 device: torch.device) -> tuple[bool, list[float]]:
    """``losses`` ``[3]`` (loss, lm_loss, reg_loss of the global batch, on the device) ->
    ``(applied, [loss, lm_loss, reg_loss, grad_norm])``.

    Main gradients are prepared, their global norm computed once on the device; the one host
    read of the step decides whether everything is finite. Only then the LR schedule advances
    (update k uses lr(k), so warmup starts above 0), gradients are clipped by that same norm and
    the optimizer steps; otherwise the update is skipped and nothing changes.
    """
    optimizer.prepare_grads()
    norm = global_grad_norm(optimizer, device)
    values = torch.cat([losses.double().reshape(-1), norm.double().reshape(1)]).tolist()
    ok = all(math.isfinite(v) for v in values)
    if ok:
        scheduler.step(increment=1)
        clip_grads_(optimizer, clip_grad, norm)
        optimizer.step_with_ready_grads()
    return ok, values
