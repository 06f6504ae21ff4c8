"""One validator: every cross-field problem of a config, reported at once, before any process
group starts. Each message names the dotted field(s) it is about."""

from __future__ import annotations

import math
import re
from typing import Optional

from megatron_emu.config import derived
from megatron_emu.config.io import ConfigError
from megatron_emu.config.schema import EmuConfig
from megatron_emu.contracts import image_layout, params
from megatron_emu.contracts import vocab as special_tokens
from megatron_emu.contracts.blend import split_entry


def _positive(errors: list[str], cfg: EmuConfig) -> None:
    checks = {
        "model.vision.image_size": cfg.model.vision.image_size,
        "model.vision.patch_size": cfg.model.vision.patch_size,
        "model.vision.width": cfg.model.vision.width,
        "model.vision.num_layers": cfg.model.vision.num_layers,
        "model.vision.num_heads": cfg.model.vision.num_heads,
        "model.vision.mlp_dim": cfg.model.vision.mlp_dim,
        "model.adapter.n_query": cfg.model.adapter.n_query,
        "model.lm.vocab_size": cfg.model.lm.vocab_size,
        "model.lm.hidden_size": cfg.model.lm.hidden_size,
        "model.lm.num_layers": cfg.model.lm.num_layers,
        "model.lm.num_attention_heads": cfg.model.lm.num_attention_heads,
        "model.lm.ffn_hidden_size": cfg.model.lm.ffn_hidden_size,
        "model.lm.make_vocab_size_divisible_by": cfg.model.lm.make_vocab_size_divisible_by,
        "parallel.tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
        "parallel.pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size,
        "train.train_iters": cfg.train.train_iters,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.seq_length": cfg.train.seq_length,
        "checkpoint.save_interval": cfg.checkpoint.save_interval,
        "run.log_interval": cfg.run.log_interval,
    }
    for name, value in checks.items():
        if value <= 0:
            errors.append(f"{name}: must be positive, got {value}")


def _finite(errors: list[str], node, path: str = "") -> None:
    """Every float of the config (at any depth, in lists too) is a finite number."""
    import dataclasses

    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _finite(errors, getattr(node, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _finite(errors, item, f"{path}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        errors.append(f"{path}: must be a finite number, got {node}")


def _vision(errors: list[str], cfg: EmuConfig) -> None:
    v, n_query = cfg.model.vision, cfg.model.adapter.n_query
    if v.image_size % v.patch_size:
        errors.append(f"model.vision.image_size ({v.image_size}) must be a multiple of "
                      f"model.vision.patch_size ({v.patch_size})")
    if v.width % v.num_heads:
        errors.append(f"model.vision.width ({v.width}) must be divisible by "
                      f"model.vision.num_heads ({v.num_heads})")
    side = math.isqrt(n_query)
    if side * side != n_query:
        errors.append(f"model.adapter.n_query ({n_query}) must be a perfect square (8x8 = 64)")
    elif v.patch_size > 0 and derived.patch_grid(v) % side:
        errors.append(f"model.adapter.n_query ({n_query}): the {derived.patch_grid(v)}x"
                      f"{derived.patch_grid(v)} patch grid cannot be average-pooled to {side}x{side}")


def _lm(errors: list[str], cfg: EmuConfig) -> None:
    lm = cfg.model.lm
    if lm.hidden_size % lm.num_attention_heads:
        errors.append(f"model.lm.hidden_size ({lm.hidden_size}) must be divisible by "
                      f"model.lm.num_attention_heads ({lm.num_attention_heads})")
    groups = lm.num_query_groups
    if groups is not None and (groups <= 0 or lm.num_attention_heads % groups):
        errors.append(f"model.lm.num_query_groups ({groups}) must divide "
                      f"model.lm.num_attention_heads ({lm.num_attention_heads})")
    needed = max(special_tokens.IMAGE_ID, special_tokens.GIMG_ID, special_tokens.VIDEO_ID) + 1
    if lm.vocab_size < needed:
        errors.append(f"model.lm.vocab_size ({lm.vocab_size}) must hold the Emu2 special token "
                      f"ids (at least {needed}; Emu2 uses {special_tokens.EMU2_VOCAB_SIZE})")
    if cfg.model.model_version == "chat" and lm.vocab_size < special_tokens.CHAT_VOCAB_SIZE:
        errors.append(f"model.model_version chat: model.lm.vocab_size ({lm.vocab_size}) must hold [USER] and "
                      f"[ASSISTANT] (ids {special_tokens.USER_ID}, {special_tokens.ASSISTANT_ID}; Emu2-Chat uses "
                      f"{special_tokens.CHAT_VOCAB_SIZE})")
    seq = cfg.train.seq_length
    if seq > lm.max_position_embeddings:
        errors.append(f"train.seq_length ({seq}) exceeds model.lm.max_position_embeddings "
                      f"({lm.max_position_embeddings})")
    if seq < image_layout.tokens_per_image(cfg.model.adapter.n_query) + 2:
        errors.append(f"train.seq_length ({seq}) cannot hold one image "
                      f"({image_layout.tokens_per_image(cfg.model.adapter.n_query)} tokens) plus <s> and </s>")
    for i, name in enumerate(cfg.model.loss.ce_ignore_tokens):
        if name not in special_tokens.TOKEN_IDS:
            errors.append(f"model.loss.ce_ignore_tokens[{i}]: unknown special token {name!r}")
    for name in ("lm_weight", "reg_weight"):
        if getattr(cfg.model.loss, name) < 0:
            errors.append(f"model.loss.{name}: must be >= 0")


def _tensor_parallel(errors: list[str], cfg: EmuConfig) -> None:
    tp, lm, v = cfg.parallel.tensor_model_parallel_size, cfg.model.lm, cfg.model.vision
    divisible = {
        "model.lm.num_attention_heads": lm.num_attention_heads,
        "model.vision.num_heads": v.num_heads,
        "model.lm.ffn_hidden_size": lm.ffn_hidden_size,
        "model.vision.mlp_dim": v.mlp_dim,
    }
    if lm.num_query_groups is not None:
        divisible["model.lm.num_query_groups"] = lm.num_query_groups
    if lm.make_vocab_size_divisible_by > 0:
        divisible["padded vocabulary (model.lm.vocab_size rounded up to "
                  "model.lm.make_vocab_size_divisible_by)"] = derived.padded_vocab_size(lm)
    for name, value in divisible.items():
        if value % tp:
            errors.append(f"parallel.tensor_model_parallel_size ({tp}) must divide {name} ({value})")
    if cfg.parallel.sequence_parallel:
        if tp == 1:
            errors.append("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
        if cfg.train.seq_length % tp:
            errors.append(f"train.seq_length ({cfg.train.seq_length}) must be divisible by "
                          f"parallel.tensor_model_parallel_size ({tp}) with sequence parallelism")


def _pipeline(errors: list[str], cfg: EmuConfig) -> None:
    par, layers = cfg.parallel, cfg.model.lm.num_layers
    pp, vpp, first = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size, par.num_layers_in_first_pipeline_stage
    if vpp is not None:
        if vpp < 2:
            errors.append(f"parallel.virtual_pipeline_model_parallel_size ({vpp}) must be >= 2 or null")
        if pp < 2:
            errors.append("parallel.virtual_pipeline_model_parallel_size needs "
                          "parallel.pipeline_model_parallel_size >= 2")
        if pp == 2 and par.batch_p2p_comm:
            errors.append("parallel.batch_p2p_comm must be false with virtual pipeline and "
                          "parallel.pipeline_model_parallel_size 2 (batched p2p between the same two "
                          "ranks silently swaps activations and gradients)")
        if first is not None:
            errors.append("parallel.num_layers_in_first_pipeline_stage is not supported together "
                          "with parallel.virtual_pipeline_model_parallel_size")
    if first is not None:
        if pp == 1:
            errors.append("parallel.num_layers_in_first_pipeline_stage needs "
                          "parallel.pipeline_model_parallel_size > 1")
        elif not 0 < first < layers or (layers - first) % (pp - 1):
            errors.append(f"parallel.num_layers_in_first_pipeline_stage ({first}): the remaining "
                          f"{layers - first} of model.lm.num_layers ({layers}) must split evenly over "
                          f"the other {pp - 1} stages, with at least one layer on the first stage")
    elif layers % (pp * (vpp or 1)):
        errors.append(f"model.lm.num_layers ({layers}) must be divisible by "
                      f"parallel.pipeline_model_parallel_size x virtual size ({pp * (vpp or 1)})")


def _batch(errors: list[str], cfg: EmuConfig, world_size: Optional[int]) -> None:
    par, tr = cfg.parallel, cfg.train
    mp = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    dp = par.data_parallel_size
    if world_size is not None:
        if world_size % mp:
            errors.append(f"world size {world_size} is not divisible by "
                          f"parallel.tensor_model_parallel_size x parallel.pipeline_model_parallel_size ({mp})")
        elif dp is not None and dp * mp != world_size:
            errors.append(f"parallel.data_parallel_size ({dp}) x tensor ({par.tensor_model_parallel_size}) x "
                          f"pipeline ({par.pipeline_model_parallel_size}) != world size {world_size}")
        dp = world_size // mp if world_size % mp == 0 else dp
    dp = dp or 1
    if tr.micro_batch_size > 0 and tr.global_batch_size % (tr.micro_batch_size * dp):
        errors.append(f"train.global_batch_size ({tr.global_batch_size}) must be divisible by "
                      f"train.micro_batch_size ({tr.micro_batch_size}) x data-parallel size ({dp})")
    elif par.virtual_pipeline_model_parallel_size and tr.micro_batch_size > 0:
        nmb = derived.num_microbatches(cfg, dp)
        if nmb % par.pipeline_model_parallel_size:
            errors.append(f"interleaved pipeline needs the number of micro-batches ({nmb} = "
                          f"train.global_batch_size / (micro_batch_size x dp)) to be a multiple of "
                          f"parallel.pipeline_model_parallel_size")


def _train(errors: list[str], cfg: EmuConfig) -> None:
    tr = cfg.train
    if tr.lr <= 0:
        errors.append(f"train.lr: must be positive, got {tr.lr}")
    if not 0 <= tr.min_lr <= tr.lr:
        errors.append(f"train.min_lr ({tr.min_lr}) must be in [0, train.lr]")
    if not 0 <= tr.lr_warmup_fraction <= 1:
        errors.append(f"train.lr_warmup_fraction ({tr.lr_warmup_fraction}) must be in [0, 1]")
    if not (0 <= tr.adam_beta1 < 1 and 0 <= tr.adam_beta2 < 1):
        errors.append("train.adam_beta1 / train.adam_beta2 must be in [0, 1)")
    if tr.fp8 is not None:
        if cfg.model.transformer_impl != "transformer_engine":
            errors.append("train.fp8 needs model.transformer_impl: transformer_engine")
        if cfg.model.params_dtype != "bfloat16":
            errors.append("train.fp8 needs model.params_dtype: bfloat16")
    if cfg.model.transformer_impl == "transformer_engine" and cfg.model.attention_backend != "auto":
        errors.append(f"model.attention_backend={cfg.model.attention_backend} applies to the local spec; "
                      "transformer_impl: transformer_engine uses TE's fused attention (set auto)")
    for name in params.LR_GROUPS:
        value = getattr(tr.module_lr, name)
        if value is not None and value <= 0:
            errors.append(f"train.module_lr.{name}: must be positive, got {value}")
    if tr.exit_duration_mins is not None and tr.exit_duration_mins <= 0:
        errors.append(f"train.exit_duration_mins ({tr.exit_duration_mins}) must be positive")
    if tr.exit_interval is not None and tr.exit_interval < 1:
        errors.append(f"train.exit_interval ({tr.exit_interval}) must be >= 1")
    if tr.max_consecutive_skips < 1:
        errors.append(f"train.max_consecutive_skips ({tr.max_consecutive_skips}) must be >= 1")
    ck = cfg.checkpoint
    if ck.save_interval < 1 or ck.keep_last < 1:
        errors.append("checkpoint.save_interval and checkpoint.keep_last must be >= 1")
    if cfg.parallel.collective_timeout_s <= 0:
        errors.append(f"parallel.collective_timeout_s ({cfg.parallel.collective_timeout_s}) must be positive")
    if cfg.parallel.overlap_param_gather and not cfg.parallel.use_distributed_optimizer:
        errors.append("parallel.overlap_param_gather needs parallel.use_distributed_optimizer")


def _loss(errors: list[str], cfg: EmuConfig) -> None:
    if cfg.model.loss.lm_ce_impl == "linear_chunked" and cfg.parallel.tensor_model_parallel_size > 1:
        errors.append("model.loss.lm_ce_impl=linear_chunked needs parallel.tensor_model_parallel_size 1 "
                      "(torch's chunked linear CE holds the whole vocabulary); use fused under TP")


def _data(errors: list[str], cfg: EmuConfig) -> None:
    d = cfg.data
    if not 0.0 <= d.pair_image_first_prob <= 1.0:
        errors.append(f"data.pair_image_first_prob ({d.pair_image_first_prob}) must be in [0, 1]")
    if d.packing_lookahead < 1:
        errors.append(f"data.packing_lookahead ({d.packing_lookahead}) must be >= 1")
    if d.max_consecutive_bad_samples < 1:
        errors.append(f"data.max_consecutive_bad_samples ({d.max_consecutive_bad_samples}) must be >= 1")
    if d.num_workers < 0:
        errors.append(f"data.num_workers ({d.num_workers}) must be >= 0")
    if d.max_images_per_sequence < 0:
        errors.append(f"data.max_images_per_sequence ({d.max_images_per_sequence}) must be >= 0")
    if d.video_frames < 1:
        errors.append(f"data.video_frames ({d.video_frames}) must be >= 1")
    if not 0.0 <= d.valid_fraction < 1.0:
        errors.append(f"data.valid_fraction ({d.valid_fraction}) must be in [0, 1)")
    if d.valid_fraction and d.valid_path:
        errors.append("data.valid_path and data.valid_fraction: give one way to validate, not both")
    tr = cfg.train
    if tr.eval_iters < 1:
        errors.append(f"train.eval_iters ({tr.eval_iters}) must be >= 1")
    if tr.eval_interval is not None and tr.eval_interval < 1:
        errors.append(f"train.eval_interval ({tr.eval_interval}) must be >= 1 (or null)")
    for key in ("path", "valid_path"):
        for i, entry in enumerate(getattr(d, key)):
            weight, directory = split_entry(entry)
            if weight is not None and (weight <= 0 or not directory):
                errors.append(f"data.{key}[{i}] ({entry!r}): a blend entry is WEIGHT:DIR with WEIGHT > 0")


def data_path_errors(cfg: EmuConfig) -> list[str]:
    """Problems with the data on disk (checked by the training job before any process group)."""
    errors = []
    if not cfg.data.path:
        errors.append("data.path: no dataset given (a directory from `megatron-emu-data preprocess`)")
    if cfg.run.wandb is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            errors.append("run.wandb: the wandb package is not installed (`pip install wandb`, or "
                          "remove run.wandb)")
    if not cfg.data.tokenizer:
        errors.append("data.tokenizer: required for training: the tokenizer directory the data was "
                      "preprocessed with (`megatron-emu-data tokenizer`); checkpoints record it for "
                      "conversion and generation")
    for key in ("path", "valid_path"):
        for i, entry in enumerate(getattr(cfg.data, key)):
            errors += _dataset_errors(cfg, f"data.{key}[{i}]", entry)
    return errors


def _dataset_errors(cfg: EmuConfig, name: str, entry: str) -> list[str]:
    """Problems of one ``data.path`` / ``data.valid_path`` entry on disk."""
    import json
    from pathlib import Path

    _, directory = split_entry(entry)
    meta_file = Path(directory) / "dataset.json"
    if not meta_file.is_file():
        return [f"{name}: {directory!r} is not a preprocessed dataset (no dataset.json)"]
    errors = []
    meta = json.loads(meta_file.read_text())
    size = meta.get("image_size")
    if meta.get("incomplete"):
        errors.append(f"{name}: {directory} is an incomplete dataset ({meta['incomplete']}); "
                      f"finish it by re-running its `megatron-emu-data preprocess` command")
    elif size != cfg.model.vision.image_size:
        errors.append(f"{name}: images in {directory} are {size} px but "
                      f"model.vision.image_size is {cfg.model.vision.image_size}")
    if cfg.data.tokenizer:
        errors += _tokenizer_matches(name, meta_file, cfg.data.tokenizer)
    return errors


def _tokenizer_matches(name: str, meta_file, tokenizer: str) -> list[str]:
    import hashlib
    import json
    from pathlib import Path

    model = Path(tokenizer) / "tokenizer.model"
    if not model.is_file():
        return [f"data.tokenizer: {tokenizer!r} has no tokenizer.model"]
    saved = json.loads(meta_file.read_text()).get("tokenizer_sha256")
    if saved and saved != hashlib.sha256(model.read_bytes()).hexdigest():
        return [f"{name}: {meta_file.parent} was tokenized with another tokenizer than "
                f"data.tokenizer ({tokenizer})"]
    return []


def _freeze(errors: list[str], cfg: EmuConfig) -> None:
    for i, pattern in enumerate(cfg.train.freeze):
        if re.search(r"(^|\.)layers\.\d", pattern):
            errors.append(f"train.freeze[{i}] ({pattern!r}): layer indices are local to a pipeline "
                          f"stage; freeze whole modules (e.g. 'vision.*', 'embedding.*')")
        elif not any(params.matches(pattern, n) for n in params.EXAMPLE_NAMES):
            errors.append(f"train.freeze[{i}] ({pattern!r}) matches no parameter; module prefixes "
                          f"are {', '.join(params.MODULES)}")


def config_errors(cfg: EmuConfig, world_size: Optional[int] = None) -> list[str]:
    """All problems of ``cfg`` (empty when valid). ``world_size`` is checked when given."""
    errors: list[str] = []
    _finite(errors, cfg)
    if errors:  # NaN passes every comparison below
        return errors
    _positive(errors, cfg)
    if errors:  # the cross-field rules below divide by these sizes
        return errors
    _vision(errors, cfg)
    _lm(errors, cfg)
    _tensor_parallel(errors, cfg)
    _pipeline(errors, cfg)
    _batch(errors, cfg, world_size)
    _train(errors, cfg)
    _freeze(errors, cfg)
    _data(errors, cfg)
    _loss(errors, cfg)
    return errors


def validate(cfg: EmuConfig, world_size: Optional[int] = None) -> EmuConfig:
    """Raise ``ConfigError`` listing every problem; return ``cfg`` unchanged when valid."""
    errors = config_errors(cfg, world_size)
    if errors:
        raise ConfigError(errors)
    return cfg
