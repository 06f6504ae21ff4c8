"""The composition root: the one place that reads the root config (``EmuConfig``) and hands each
component its own narrow spec.

Order: the process groups are created from the config's layout; from then on the parallel sizes
come from the groups (``ParallelSizes``), never from the config again. Each component receives
only what it uses:

==============================  ===========================================================
component                       spec
==============================  ===========================================================
process groups                  ``parallel.groups.GroupsSpec`` (sizes asked for, timeout, seed)
model chunks                    ``model.spec.ModelSpec`` (+ the process groups)
DDP / the schedule              ``training.schedule.DDPSpec`` / ``StepSpec``
optimizer + LR schedule         ``training.optimizer.OptimizerSpec``
data loader                     ``data.loader.LoaderSpec`` (+ this rank's DP rank and size)
dry-run planner                 ``planner.PlanSpec`` (the layout asked for: no groups exist)
==============================  ===========================================================

megatron-core is imported only by the functions that build (``process_groups``,
``model_and_optimizer``), so ``--dry-run`` reads specs without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from megatron_emu.config.schema import EmuConfig
from megatron_emu.contracts import image_layout, params, vocab
from megatron_emu.model.spec import ModelSpec, p2p_seq_length
from megatron_emu.parallel.sizes import ParallelSizes
from megatron_emu.planner import PlanSpec

if TYPE_CHECKING:  # pragma: no cover
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_emu.data.loader import LoaderSpec
    from megatron_emu.parallel.groups import GroupsSpec
    from megatron_emu.training.optimizer import OptimizerSpec
    from megatron_emu.training.schedule import DDPSpec, StepSpec


# -- specs ------------------------------------------------------------------------------------
def groups_spec(cfg: EmuConfig) -> "GroupsSpec":
    from megatron_emu.parallel.groups import GroupsSpec

    par = cfg.parallel
    return GroupsSpec(tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                      vpp=par.virtual_pipeline_model_parallel_size, timeout_s=par.collective_timeout_s,
                      seed=cfg.train.seed)


def model_spec(cfg: EmuConfig) -> ModelSpec:
    par, tr = cfg.parallel, cfg.train
    return ModelSpec(model=cfg.model, seq_length=tr.seq_length,
                     max_images_per_sequence=cfg.data.max_images_per_sequence,
                     virtual_pipeline=par.virtual_pipeline_model_parallel_size,
                     first_stage_layers=par.num_layers_in_first_pipeline_stage,
                     sequence_parallel=par.sequence_parallel, batch_p2p_comm=par.batch_p2p_comm,
                     recompute_granularity=tr.recompute_granularity, fp8=tr.fp8, fp8_recipe=tr.fp8_recipe,
                     freeze=tuple(tr.freeze))


def ddp_spec(cfg: EmuConfig) -> "DDPSpec":
    from megatron_emu.training.schedule import DDPSpec

    par = cfg.parallel
    return DDPSpec(overlap_grad_reduce=par.overlap_grad_reduce, overlap_param_gather=par.overlap_param_gather,
                   use_distributed_optimizer=par.use_distributed_optimizer)


def step_spec(cfg: EmuConfig, sizes: ParallelSizes) -> "StepSpec":
    from megatron_emu.training.schedule import StepSpec

    return StepSpec(seq_length=p2p_seq_length(model_spec(cfg), sizes), micro_batch_size=cfg.train.micro_batch_size)


def optimizer_spec(cfg: EmuConfig) -> "OptimizerSpec":
    from megatron_emu.training.optimizer import OptimizerSpec

    tr = cfg.train
    return OptimizerSpec(lr=tr.lr, min_lr=tr.min_lr, train_iters=tr.train_iters, warmup_fraction=tr.lr_warmup_fraction,
                         weight_decay=tr.weight_decay, adam_beta1=tr.adam_beta1, adam_beta2=tr.adam_beta2,
                         adam_eps=tr.adam_eps, clip_grad=tr.clip_grad, bf16=cfg.model.params_dtype == "bfloat16",
                         use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                         module_lr={m: getattr(tr.module_lr, m) for m in params.LR_GROUPS})


def loader_spec(cfg: EmuConfig, sizes: ParallelSizes, validation: bool = False) -> "LoaderSpec":
    """The training data, or with ``validation`` the held-out data: ``data.valid_path``, or the
    "valid" side of ``data.valid_fraction`` of ``data.path``. Only the first pipeline stage
    decodes pixels."""
    from megatron_emu.data.loader import LoaderSpec, parse_paths

    d = cfg.data
    paths = d.valid_path if validation and d.valid_path else d.path
    split = "all" if not d.valid_fraction else ("valid" if validation else "train")
    return LoaderSpec(paths=tuple(parse_paths(paths)), split=split, valid_fraction=d.valid_fraction,
                      seq_length=cfg.train.seq_length,
                      n_query=cfg.model.adapter.n_query, image_size=cfg.model.vision.image_size,
                      micro_batch_size=cfg.train.micro_batch_size, max_images=d.max_images_per_sequence,
                      dp_rank=sizes.dp_rank, dp_size=sizes.dp, num_workers=d.num_workers, seed=cfg.train.seed,
                      decoder=d.decoder, image_first_prob=d.pair_image_first_prob,
                      lookahead=d.packing_lookahead, decode_images=sizes.first_stage,
                      max_consecutive_bad=d.max_consecutive_bad_samples,
                      regress_video_frames=cfg.model.regress_video_frames,
                      regression=cfg.train.regression, vocab_size=cfg.model.lm.vocab_size,
                      ce_ignore_ids=tuple(vocab.token_id(t) for t in
                                          image_layout.ce_ignore_names(cfg.model.loss.ce_ignore_tokens)))


def plan_spec(cfg: EmuConfig, data_parallel_size: Optional[int] = None) -> PlanSpec:
    """The layout asked for (the dry run has no process groups)."""
    par = cfg.parallel
    return PlanSpec(model=model_spec(cfg), tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                    dp=data_parallel_size or par.data_parallel_size or 1, micro_batch_size=cfg.train.micro_batch_size,
                    use_distributed_optimizer=par.use_distributed_optimizer,
                    video_frames=cfg.data.video_frames)


# -- building ---------------------------------------------------------------------------------
def process_groups(cfg: EmuConfig) -> "ProcessGroupCollection":
    """torch.distributed (from the launcher's environment) and megatron-core's groups."""
    from megatron_emu.parallel.groups import init_distributed, init_groups

    init_distributed(cfg.parallel.collective_timeout_s)
    return init_groups(groups_spec(cfg))


def model_chunks(cfg: EmuConfig, pgs: "ProcessGroupCollection", meta: bool = False) -> list:
    """This rank's model chunks (unwrapped)."""
    from megatron_emu.model.builder import build_model_chunks

    return build_model_chunks(model_spec(cfg), pgs, meta=meta)


def model_and_optimizer(cfg: EmuConfig, pgs: "ProcessGroupCollection") -> tuple[list, object, object]:
    """``(DDP-wrapped chunks, optimizer, LR scheduler)`` of this rank."""
    from megatron_emu.training.optimizer import build_optimizer
    from megatron_emu.training.schedule import wrap_ddp

    model = wrap_ddp(ddp_spec(cfg), model_chunks(cfg, pgs), pgs)
    optimizer, scheduler = build_optimizer(optimizer_spec(cfg), model, pgs)
    return model, optimizer, scheduler
