"""Validation: the losses of held-out data, the same batches every time.

Each evaluation builds a fresh loader over the validation data (``data.valid_path``, or the
held-out side of ``data.valid_fraction``) from its first sequence, runs ``train.eval_iters``
global batches through megatron-core's schedule forward-only on the same model chunks, and
averages the LM and regression losses over micro-batches and data-parallel ranks, as training
does. The training loader, the RNG streams and the optimizer are untouched, so a run with
validation trains exactly as one without, and resuming does not change what is measured.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Callable, Optional

import torch
from megatron.core import tensor_parallel

log = logging.getLogger("megatron_emu.train")


class Evaluator:
    """``evaluate() -> {"valid_loss", "valid_lm_loss", "valid_reg_loss", "valid_ppl"}`` on every
    rank (a collective: all ranks call it together).

    make_source: builds this rank's batch source over the validation data (a new one per call,
    so every evaluation starts at the first validation sequence).
    run_forward: ``(microbatches) -> per-micro-batch loss reports`` (forward only).
    reduce: ``(reports) -> [3]`` device tensor of the global means, as for training.
    """

    def __init__(self, model: list, make_source: Callable, num_micro: int, iters: int,
                 run_forward: Callable, reduce: Callable):
        self.model, self.make_source, self.num_micro, self.iters = model, make_source, num_micro, iters
        self.run_forward, self.reduce = run_forward, reduce

    def evaluate(self) -> dict:
        rng = _rng_state()
        for chunk in self.model:
            chunk.eval()
        source = self.make_source()
        try:
            total = None
            with torch.no_grad():
                for _ in range(self.iters):
                    reports = self.run_forward([next(source) for _ in range(self.num_micro)])
                    losses = self.reduce(reports)
                    total = losses if total is None else total + losses
        finally:
            source.close()
            for chunk in self.model:
                chunk.train()
            _set_rng_state(rng)
        loss, lm_loss, reg_loss = (total / self.iters).tolist()
        return {"valid_loss": loss, "valid_lm_loss": lm_loss, "valid_reg_loss": reg_loss,
                "valid_ppl": math.exp(lm_loss) if lm_loss < 700 else float("inf")}


def _rng_state() -> dict:
    from megatron_emu.utils import device

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if device.has_cuda():
        state["device"] = device.rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron_emu.utils import device

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "device" in state:
        device.set_rng_state(state["device"])


def validation_due(iteration: int, interval: Optional[int], last: bool, stopping: bool) -> bool:
    """Evaluate every ``interval`` iterations, at the last one, and before a save on a stop."""
    return last or stopping or bool(interval and iteration % interval == 0)
