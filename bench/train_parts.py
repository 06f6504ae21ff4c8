"""Pieces of ``bench_train.py``: the megatron-core GPT anchor, our Emu2 through the real training
loop, and component timings (ViT, heads, optimizer) measured in isolation on the same model.

Every function runs inside one process that already holds a world-1 process group; each run
initialises megatron-core's model-parallel state and tears it down again.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls after one warm-up (device synchronised)."""
    fn()
    times = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# -- (a) megatron-core's own GPT at the same LM shape -----------------------------------------
def anchor_run(cfg, steps: int, warmup: int) -> dict:
    """megatron-core ``GPTModel`` with its layer spec (local or TE; on the local spec the run's
    core attention), the same TransformerConfig, DDP, optimizer and batch as our LM, on random
    token ids. Returns the median step time and peak memory."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_emu.config import derived
    from megatron_emu.model import specs
    from megatron_emu.model.megatron_config import lm_transformer_config
    from megatron_emu.parallel.sizes import ParallelSizes
    from megatron_emu.training import build
    from megatron_emu.training.optimizer import optimizer_config
    from megatron_emu.training.schedule import wrap_ddp
    from megatron_emu.utils import device

    pgs = build.process_groups(cfg)
    config = lm_transformer_config(build.model_spec(cfg), ParallelSizes.from_groups(pgs))
    if cfg.model.transformer_impl == "transformer_engine":
        spec = specs.lm_layer_spec("transformer_engine")
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.self_attention.submodules.core_attention = specs.core_attention(
            "local", cfg.model.attention_backend)
    lm = cfg.model.lm
    model = GPTModel(config=config, transformer_layer_spec=spec,
                     vocab_size=derived.padded_vocab_size(lm), max_sequence_length=cfg.train.seq_length,
                     position_embedding_type="rope", rotary_base=lm.rope_theta,
                     share_embeddings_and_output_weights=False, pg_collection=pgs)
    model.to(device.device())
    ddp = wrap_ddp(build.ddp_spec(cfg), [model], pgs)
    opt_cfg = optimizer_config(build.optimizer_spec(cfg))
    optimizer = get_megatron_optimizer(opt_cfg, ddp, use_gloo_process_groups=False, pg_collection=pgs)
    b, s = cfg.train.micro_batch_size, cfg.train.seq_length
    n_micro = cfg.train.global_batch_size // b
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, lm.vocab_size, (b, s + 1), generator=g) for _ in range(n_micro)]

    def forward_step(it, m):
        ids = next(it).to(device.device(), non_blocking=True)
        tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        out = m(tokens, None, None, labels=labels)  # per-token CE [b, s]

        def loss_func(t):
            loss = t.float().mean()
            return loss, {"loss": loss.detach()}
        return out, loss_func

    def step():
        for m in ddp:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches),
                                    model=ddp, num_microbatches=n_micro, seq_length=s,
                                    micro_batch_size=b, forward_only=False)
        optimizer.step()

    reset_memory()
    times = []
    for i in range(steps):
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_time_s": statistics.median(times), "memory_gib": peak_memory_gib()}
    parallel_state.destroy_model_parallel()
    return out


# -- (b), (c) our Emu2 through the training loop -----------------------------------------------
def emu2_run(cfg, steps: int, warmup: int, repeat: int) -> dict:
    """``Trainer.step`` over the real data loader; then ViT, heads and optimizer timed in
    isolation on the same model (the LM share is the rest of the step)."""
    from megatron.core import parallel_state

    from megatron_emu.planner import plan
    from megatron_emu.training.build import plan_spec
    from megatron_emu.training.loop import Trainer

    reset_memory()
    trainer = Trainer(cfg)
    records = [trainer.step() for _ in range(steps)]
    steady = records[warmup:] or records[-1:]
    med = lambda k: statistics.median(r[k] for r in steady)  # noqa: E731
    out = {"step_time_s": med("step_time_s"), "data_wait_s": med("data_wait_s"),
           "images_per_step": med("images_per_s") * med("step_time_s"),
           "memory_gib": peak_memory_gib(), "planner_gib": plan(plan_spec(cfg, 1))["memory_gib_per_gpu"],
           "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]}
    out.update(_components(trainer, cfg, round(out["images_per_step"]), repeat))
    trainer.close()
    parallel_state.destroy_model_parallel()
    return out


def _components(trainer, cfg, images: int, repeat: int) -> dict:
    from megatron_emu.training.grad_norm import clip_grads_, global_grad_norm

    chunk = trainer.model[0].module
    dev, dtype = trainer.dev, trainer.dtype
    v = cfg.model.vision
    out = {}
    if images:
        pixels = torch.randn(images, 3, v.image_size, v.image_size, device=dev, dtype=dtype)

        def vit():
            feats = chunk.encode_images(pixels)
            visual = chunk.adapter(feats)
            if visual.requires_grad:
                visual.float().square().mean().backward()
        out["vit_s"] = timed(vit, repeat)
    else:
        out["vit_s"] = 0.0
    b, s, h = cfg.train.micro_batch_size, cfg.train.seq_length, cfg.model.lm.hidden_size
    n_micro = trainer.num_micro
    hidden = torch.randn(s, b, h, device=dev, dtype=dtype, requires_grad=True)
    labels = torch.randint(3, cfg.model.lm.vocab_size, (b, s), device=dev)
    mask = torch.ones(b, s, device=dev)
    regressed = min(s * b, images * cfg.model.adapter.n_query // max(1, n_micro))
    rows = torch.randperm(s * b, device=dev)[:regressed]
    targets = torch.randn(regressed, v.width, device=dev, dtype=dtype)

    def heads():
        for _ in range(n_micro):
            loss = chunk.heads.lm_loss(hidden, labels, mask)
            loss = loss + chunk.heads.regression_loss(hidden, rows, targets)
            loss.backward()
    out["heads_s"] = timed(heads, repeat)

    def optimizer():
        trainer.optimizer.prepare_grads()
        clip_grads_(trainer.optimizer, cfg.train.clip_grad, global_grad_norm(trainer.optimizer, dev))
        trainer.optimizer.step_with_ready_grads()
    out["optimizer_s"] = timed(optimizer, repeat)
    return out


def lm_flops_per_step(cfg) -> float:
    """Model FLOPs of the LM alone (layers + LM head) for one step: the anchor's count."""
    from megatron_emu.training.flops import lm_forward_flops_per_token

    h = cfg.model.lm.hidden_size
    per_token = lm_forward_flops_per_token(cfg) - 2 * h * cfg.model.vision.width  # no project_down
    return 3 * cfg.train.global_batch_size * cfg.train.seq_length * per_token


@functools.lru_cache(maxsize=None)
def have_te() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return torch.cuda.is_available()
