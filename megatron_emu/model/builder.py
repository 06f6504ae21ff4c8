"""Build this rank's model chunks (one per virtual pipeline stage) and apply freezing."""

from __future__ import annotations

import contextlib

import torch
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel.utils import is_vp_first_stage, is_vp_last_stage
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_emu.contracts import params
from megatron_emu.model.emu2 import Emu2Model
from megatron_emu.model.spec import ModelSpec


def build_model_chunks(spec: ModelSpec, pgs: ProcessGroupCollection, meta: bool = False) -> list[Emu2Model]:
    """The chunks this rank holds: ``[Emu2Model]`` (or one per virtual stage), on the device
    (``meta``: on the meta device, without memory: megatron-core's sharded layout without data, which
    the tests hold ``checkpoint/layout.py``'s derivation equal to).

    The first chunk of pipeline rank 0 holds the ViT, adapter and embedding; the last chunk of
    the last rank holds the final norm and heads.
    """
    from megatron_emu.model.specs import quiet_known_mlp_notice
    from megatron_emu.utils import device

    if not isinstance(spec, ModelSpec):  # transitional: a root config (see _spec_of_root_config)
        spec = _spec_of_root_config(spec)
    quiet_known_mlp_notice()
    vpp = spec.virtual_pipeline
    pp_rank = torch.distributed.get_rank(pgs.pp)
    pp_size = torch.distributed.get_world_size(pgs.pp)
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        pre = pp_rank == 0 and (vp_stage is None or is_vp_first_stage(vp_stage, vpp))
        post = pp_rank == pp_size - 1 and (vp_stage is None or is_vp_last_stage(vp_stage, vpp))
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = Emu2Model(spec, pgs, pre_process=pre, post_process=post, vp_stage=vp_stage)
        model.model_type = ModelType.encoder_or_decoder
        chunks.append(model if meta else model.to(device.device()))
    apply_freeze(chunks, list(spec.freeze))
    return chunks


def apply_freeze(chunks: list[torch.nn.Module], patterns: list[str]) -> list[str]:
    """Freeze parameters whose name matches a glob (``vision.*``); returns the frozen names.

    Names are the same on every layout (``contracts/params.py``); the config validator rejects
    patterns that match nothing and stage-local layer indices.
    """
    frozen = []
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if any(params.matches(p, name) for p in patterns):
                param.requires_grad_(False)
                frozen.append(name)
    return frozen


def _spec_of_root_config(cfg) -> ModelSpec:
    """Transitional: the converter (``checkpoint/convert.py``) and generation
    (``inference/generate.py``) still pass the root config. The same reading as the composition
    root's ``training/build.py::model_spec`` (a test keeps them equal); it goes when they build
    through the root's specs."""
    par, tr = cfg.parallel, cfg.train
    return ModelSpec(model=cfg.model, seq_length=tr.seq_length,
                     max_images_per_sequence=cfg.data.max_images_per_sequence,
                     virtual_pipeline=par.virtual_pipeline_model_parallel_size,
                     first_stage_layers=par.num_layers_in_first_pipeline_stage,
                     sequence_parallel=par.sequence_parallel, batch_p2p_comm=par.batch_p2p_comm,
                     recompute_granularity=tr.recompute_granularity, fp8=tr.fp8, fp8_recipe=tr.fp8_recipe,
                     freeze=tuple(tr.freeze))
