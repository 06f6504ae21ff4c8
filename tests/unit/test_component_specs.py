"""Each component builds from its own spec, without the root config: the process groups from a
``GroupsSpec``, the model from a ``ModelSpec`` (its sub-configs and a few run settings), DDP and
the schedule from ``DDPSpec`` / ``StepSpec``, the optimizer from an ``OptimizerSpec``, the
planner from a ``PlanSpec`` (the loader from a ``LoaderSpec``: tests/data/test_loader.py). An
``EmuConfig`` cannot even be constructed while they run; only the composition root
(``training/build.py``) reads one."""

from __future__ import annotations

import math
import re
from pathlib import Path

from megatron_emu.config.schema import AdapterConfig, LMConfig, ModelConfig, VisionConfig
from megatron_emu.model.spec import ModelSpec
from tests.helpers.dist import run_ranks

ROOT = Path(__file__).resolve().parents[2]

MODEL = ModelConfig(
    vision=VisionConfig(image_size=28, patch_size=14, width=32, num_layers=1, num_heads=2, mlp_dim=64),
    adapter=AdapterConfig(n_query=4),
    lm=LMConfig(vocab_size=32272, hidden_size=32, num_layers=2, num_attention_heads=2, ffn_hidden_size=64,
                max_position_embeddings=64),
    params_dtype="float32",
)
SPEC = ModelSpec(model=MODEL, seq_length=24, max_images_per_sequence=2)


def _refuse_root_config() -> None:
    from megatron_emu.config import schema

    def refuse(self, *args, **kwargs):
        raise AssertionError("a component built the root config (EmuConfig)")

    schema.EmuConfig.__init__ = refuse


def _build_and_step(rank: int) -> dict:
    import torch

    from megatron_emu.contracts import image_layout, vocab
    from megatron_emu.contracts.batch import make_batch
    from megatron_emu.model.builder import build_model_chunks
    from megatron_emu.model.spec import p2p_seq_length
    from megatron_emu.parallel.groups import GroupsSpec, init_distributed, init_groups
    from megatron_emu.parallel.sizes import ParallelSizes
    from megatron_emu.planner import PlanSpec, plan
    from megatron_emu.training.optimizer import OptimizerSpec, build_optimizer, module_lrs
    from megatron_emu.training.schedule import DDPSpec, StepSpec, forward_backward, wrap_ddp
    from megatron_emu.training.update import apply_update

    _refuse_root_config()
    init_distributed()
    pgs = init_groups(GroupsSpec(seed=5))
    sizes = ParallelSizes.from_groups(pgs)
    chunks = build_model_chunks(SPEC, pgs)
    model = wrap_ddp(DDPSpec(use_distributed_optimizer=False), chunks, pgs)
    opt_spec = OptimizerSpec(lr=1e-3, train_iters=4, module_lr={"adapter": 1e-2}, use_distributed_optimizer=False)
    optimizer, scheduler = build_optimizer(opt_spec, model, pgs)

    ids = [vocab.BOS_ID, 7, 8] + image_layout.image_block(MODEL.adapter.n_query) + [9, vocab.EOS_ID]
    ids += [vocab.PAD_ID] * (SPEC.seq_length + 1 - len(ids))
    seq = torch.tensor([ids])
    mask = (seq[:, 1:] != vocab.PAD_ID).float()
    size = MODEL.vision.image_size
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = make_batch(seq[:, :-1], seq[:, 1:], mask, images, image_id=image_layout.PLACEHOLDER_ID,
                       ce_ignore_ids=[vocab.PAD_ID, vocab.IMG_ID, vocab.IMG_END_ID, vocab.IMAGE_ID])
    step = StepSpec(seq_length=p2p_seq_length(SPEC, sizes), micro_batch_size=1)
    (report,) = forward_backward(step, model, [batch], torch.device("cpu"), torch.float32)
    losses = torch.stack([report[k].double() for k in ("loss", "lm_loss", "reg_loss")])
    ok, values = apply_update(optimizer, scheduler, 1.0, losses, torch.device("cpu"))
    return {"ok": ok, "values": values, "lrs": module_lrs(optimizer, opt_spec), "sizes": sizes,
            "params": sum(p.numel() for c in chunks for p in c.parameters()),
            "planned": plan(PlanSpec(model=SPEC))["params_per_gpu"]}


def test_model_schedule_and_optimizer_build_from_their_specs():
    (out,) = run_ranks(1, _build_and_step)
    assert out["ok"] and all(math.isfinite(v) for v in out["values"]) and out["values"][3] > 0
    assert out["sizes"].tp == out["sizes"].pp == out["sizes"].dp == 1  # read from the process groups
    # The adapter's own peak (warmup-free cosine, update 1 of 4) is logged as lr_adapter.
    assert math.isclose(out["lrs"]["lr_adapter"], 1e-2 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert out["planned"] == [out["params"]]  # the planner, from its PlanSpec


# Modules that hold components: none of them may name the root config (the transitional
# reading in model/builder.py aside, for checkpoint/convert.py and inference/generate.py).
COMPONENT_MODULES = [
    *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "megatron_emu" / "model").glob("*.py")),
    "megatron_emu/training/schedule.py", "megatron_emu/training/optimizer.py", "megatron_emu/data/loader.py",
    "megatron_emu/planner.py", "megatron_emu/parallel/sizes.py",
]
TRANSITIONAL = {"megatron_emu/model/builder.py": "_spec_of_root_config"}


def test_components_never_name_the_root_config():
    for rel in COMPONENT_MODULES:
        text = (ROOT / rel).read_text()
        if rel in TRANSITIONAL:
            text = text[:text.index(f"def {TRANSITIONAL[rel]}")]
        assert not re.search(r"\bEmuConfig\b|\bcfg\.(parallel|train|data|run|checkpoint)\b", text), rel


def test_transitional_model_spec_reading_equals_the_composition_root():
    from megatron_emu.model.builder import _spec_of_root_config
    from megatron_emu.training.build import model_spec
    from tests.helpers.tiny import tiny_config

    for cfg in (tiny_config(), tiny_config(tp=2, pp=2, vpp=2, sp=True, extra=("train.freeze=['vision.*']",
                                                                             "train.recompute_granularity=full"))):
        assert _spec_of_root_config(cfg) == model_spec(cfg)
