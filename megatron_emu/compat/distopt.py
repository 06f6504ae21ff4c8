"""Fixes for megatron-core's distributed optimizer over plain ``torch.optim.AdamW``.

Without Apex or Transformer Engine (CPU, or a GPU install without them) megatron-core's
``DistributedOptimizer`` wraps torch's AdamW, and its checkpoint resume is broken in three
places (0.16.1; see the megatron-core CPU notes, #12-#14):

1. ``state_dict()`` of a fresh optimizer asserts ``len(steps) == 1`` (torch Adam creates its
   state lazily, at the first step) -- hit when loading a checkpoint before any step.
2. Loading the ``fully_reshardable`` format copies every key of the torch-Adam state,
   including ``step``, from a dict that has no ``step`` -> ``KeyError``.
3. After ``load_state_dict`` every parameter shares ONE ``step`` tensor, which torch Adam
   increments once per parameter per step: bias correction goes wrong from the second resumed
   step on (silently).

``apply()`` patches these three places; it is a no-op when megatron-core uses Apex/TE Adam
(those paths are not taken there).
"""

from __future__ import annotations

import functools

import torch

_APPLIED = False


def _fill_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create torch Adam's lazy state (step 0, zero moments) for every parameter: the same
    values its first step would create."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def apply() -> bool:
    """Patch once; returns True when the torch-Adam code paths are in use."""
    global _APPLIED
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE:
        return False
    if _APPLIED:
        return True
    cls = dopt.DistributedOptimizer

    original_state_dict = cls.state_dict

    @functools.wraps(original_state_dict)
    def state_dict(self):
        _fill_adam_state(self.optimizer)  # fix 1
        return original_state_dict(self)

    original_set = cls._set_main_param_and_optimizer_states

    @functools.wraps(original_set)
    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        _fill_adam_state(self.optimizer)
        state = self.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:  # fix 2: copy only what was saved
            dst = {"param": main_param, **{k: v for k, v in state.items() if k != "step"}}
            for key, value in dst.items():
                value.copy_(tensors[key])
            return
        original_set(self, model_param, tensors)

    original_load = cls.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():  # fix 3: one step counter per parameter
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].detach().clone()

    cls.state_dict = state_dict
    cls._set_main_param_and_optimizer_states = set_states
    cls.load_state_dict = load_state_dict
    _APPLIED = True
    return True
