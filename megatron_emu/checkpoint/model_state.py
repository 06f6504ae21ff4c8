"""Reading a checkpoint's metadata and loading its model tensors into model chunks at any
layout: what training, conversion and generation share (training adds the optimizer, the RNG
and the data position on top: ``training/checkpointing.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_emu.checkpoint import mcore_load
from megatron_emu.checkpoint.integrity import Manifest
from megatron_emu.contracts.checkpoint_format import META_FILE, CheckpointFileError


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used with this configuration (message says why)."""


def read_meta(ckpt: Path, verify: bool = True) -> dict:
    """``megatron_emu.json`` of a checkpoint (checked against its ``checksums.json``)."""
    data = Manifest(ckpt, verify=verify).read_bytes(META_FILE)
    try:
        return json.loads(data)
    except ValueError:
        raise CheckpointFileError(f"{ckpt / META_FILE}: not valid JSON; restore it from a copy or resume "
                                  f"from an earlier iteration") from None


def chunks_of(model: list) -> list:
    """The model chunks themselves (DDP wrappers unwrapped)."""
    return [m.module if hasattr(m, "module") else m for m in model]


def load_model_state(ckpt: str | Path, model: list, verify: bool = True) -> None:
    """The model tensors of ``ckpt`` into ``model``'s chunks (any layout). Converted checkpoints
    (and those of another ``transformer_impl``) may lack some modules' ``_extra_state`` (e.g.
    Transformer Engine's FP8 scaling state, which then starts fresh); any other absent tensor
    is an error."""
    chunks = chunks_of(model)
    request = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    state, _, absent = mcore_load.load(request, ckpt, verify=verify, strict=StrictHandling.RETURN_UNEXPECTED)
    wanted = sorted(k for k in absent if not k.endswith("_extra_state"))
    problem = f"{ckpt} lacks {len(wanted)} model tensor(s) this model needs, e.g. {wanted[:3]}" if wanted else ""
    if not problem:
        try:
            load_chunks(chunks, state, allow_missing_extra_state=bool(absent))
        except CheckpointError as e:
            problem = str(e)
    # Ranks see different keys: agree before raising, so no rank is left waiting in a collective.
    from megatron_emu.utils import device

    flag = torch.tensor([1.0 if problem else 0.0], device=device.device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item():
        raise CheckpointError(problem or f"another rank could not load its part of {ckpt} (see its log)")


def load_chunks(model: list, state: dict, allow_missing_extra_state: bool = False) -> None:
    """``state["model<i>"]`` into chunk ``i`` of ``model``."""
    for i, chunk in enumerate(chunks_of(model)):
        result = chunk.load_state_dict(state[f"model{i}"], strict=not allow_missing_extra_state)
        if allow_missing_extra_state:
            bad = [k for k in result.missing_keys if not k.endswith("_extra_state")] + list(result.unexpected_keys)
            if bad:
                raise CheckpointError(f"model chunk {i}: state does not match the model: {bad[:3]}")
