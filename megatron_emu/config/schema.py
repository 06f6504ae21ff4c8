"""Typed configuration tree of megatron_emu.

YAML files are only a serialisation of these dataclasses (see ``config/io.py``): loading is
strict (unknown keys, wrong types and missing required fields are errors naming the dotted
path), and ``--set a.b=c`` overrides are type-checked against the field they change.
Cross-field rules live in ``config/validate.py``; derived values (padded vocabulary, layer
split per pipeline stage, micro-batch counts) are pure functions in ``config/derived.py``.
Each component receives only its own sub-config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass(kw_only=True)
class VisionConfig:
    """EVA-CLIP-style ViT (Emu2: EVA-02-CLIP-E/14-plus at 448 px).

    Architecture sizes have no defaults: a preset must state them (a forgotten key is an
    error, not a silently different model)."""

    image_size: int
    patch_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    postnorm: bool = True
    # "qv": q and v biases only (EVA-CLIP; the k third is zero); "qkv": a full QKV bias.
    qkv_bias: Literal["qv", "qkv"] = "qv"


@dataclass(kw_only=True)
class AdapterConfig:
    """Average-pool of the patch grid to ``n_query`` tokens, then ``project_up`` (no bias)."""

    n_query: int


@dataclass(kw_only=True)
class LMConfig:
    """LLaMA decoder (Emu2: LLaMA-33B with the Emu2 vocabulary)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: Optional[int] = None
    ffn_hidden_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    make_vocab_size_divisible_by: int = 128


@dataclass(kw_only=True)
class LossConfig:
    """The two heads' objective: ``lm_weight * CE + reg_weight * MSE``.

    ``ce_ignore_tokens`` are special-token names whose occurrence as a *label* (the next token)
    is excluded from cross-entropy (emu2_spec.md §2, Emu1 lineage).
    """

    lm_weight: float = 1.0
    reg_weight: float = 1.0
    # Text head cross-entropy: "plain" (megatron-core vocab-parallel CE, the reference; its
    # boolean-mask indexing syncs with the host on GPU), "fused" (megatron-core's
    # fused vocab-parallel CE: softmax and gradient in place, one all-reduce less) or
    # "linear_chunked" (torch's chunked linear + CE: never holds the [tokens, vocab] logits;
    # TP = 1 only). All give the same numbers.
    lm_ce_impl: Literal["plain", "fused", "linear_chunked"] = "fused"
    # Regression head: "fused" (chunked linear + MSE, megatron_emu.ops.fused_linear_mse: no
    # [rows, width] prediction kept) or "naive" (project_down on every position, then MSE).
    regression_impl: Literal["fused", "naive"] = "fused"
    ce_ignore_tokens: list[str] = field(
        default_factory=lambda: ["[PAD]", "[IMG]", "[/IMG]", "<image>"]
    )


@dataclass(kw_only=True)
class ModelConfig:
    vision: VisionConfig
    adapter: AdapterConfig
    lm: LMConfig
    loss: LossConfig = field(default_factory=LossConfig)
    # "local": megatron-core's local spec (CPU, CI); "transformer_engine": TE spec (GPU, FP8).
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    # Core attention of the local spec: "sdpa" (torch scaled_dot_product_attention: flash /
    # cuDNN / memory-efficient kernels on GPU, the math kernel on CPU), "unfused" (megatron-core's
    # DotProductAttention, [b, heads, s, s] scores in memory); "auto" = sdpa. The
    # transformer_engine spec always uses TE's own fused attention (leave this at auto).
    attention_backend: Literal["auto", "sdpa", "unfused"] = "auto"
    # Weights/activations dtype. fp32 on CPU makes layouts and resumes exactly comparable.
    params_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    init_method_std: float = 0.02
    # The Hugging Face ``model_version``: "base" (Emu2, Emu2-Gen) or "chat" (Emu2-Chat: [USER] and
    # [ASSISTANT] at ids 32272 / 32273, vocab_size 32274; 256 visual tokens per image there).
    # Conversion writes and reads it; the architecture is the same.
    model_version: Literal["base", "chat"] = "base"
    # Whether the visual embeddings of video frames ([gIMG] slots) are regression targets like
    # images' (docs/data.md: off, the paper is silent and Emu2's inference never
    # predicts them).
    regress_video_frames: bool = False


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    # LM layers on the first stage (which also holds the ViT and adapter); None = even split.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    # Expected data-parallel size; None = whatever the launcher's world size implies.
    data_parallel_size: Optional[int] = None
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Batched p2p is wrong with virtual pipeline and PP=2 (megatron_core_cpu.md §6).
    batch_p2p_comm: bool = True
    # Every collective and barrier (world and megatron-core's groups) fails after this long.
    collective_timeout_s: float = 600.0


@dataclass(kw_only=True)
class ModuleLRConfig:
    """Per-module peak learning rates (null: ``train.lr``). Paper stage 1: projection 1e-4,
    LLM 3e-5, ViT 5e-5. The cosine schedule scales each by ``train.min_lr / train.lr``."""

    vision: Optional[float] = None  # ViT
    adapter: Optional[float] = None  # project_up
    lm: Optional[float] = None  # token embedding, decoder layers, final norm, LM head
    regression_head: Optional[float] = None  # project_down


@dataclass(kw_only=True)
class TrainConfig:
    train_iters: int = 1000
    global_batch_size: int = 8
    micro_batch_size: int = 1
    seq_length: int = 2048
    seed: int = 1234
    lr: float = 3e-5
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.02
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-6
    clip_grad: float = 5.0
    # Parameter-name globs (e.g. "vision.*") that are frozen: no gradient, no optimizer state.
    freeze: list[str] = field(default_factory=list)
    # Which visual embeddings are regressed (docs/tuning.md): "all" (pretraining), "last_image"
    # (Emu2-Gen: only each sample's last image, the one to generate) or "none" (Emu2-Chat).
    regression: Literal["all", "last_image", "none"] = "all"
    recompute_granularity: Optional[Literal["selective", "full"]] = None
    # FP8 (Transformer Engine spec, bf16): format, and the scaling recipe: "delayed" (amax
    # history) or "current" (per-tensor current scaling, TE's Float8CurrentScaling).
    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    fp8_recipe: Literal["delayed", "current"] = "delayed"
    module_lr: ModuleLRConfig = field(default_factory=ModuleLRConfig)
    # Save and exit 0 once this much wall time has passed (a scheduler time limit); null: never.
    exit_duration_mins: Optional[float] = None
    # Validation (when data.valid_path or data.valid_fraction is set): every eval_interval
    # iterations (null: only at the end and before a save on a signal), eval_iters global
    # batches each time, always the same ones.
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    # Save and exit 0 at every multiple of this iteration (chained jobs of fixed length); null: never.
    exit_interval: Optional[int] = None
    # Stop with an error after this many consecutive steps skipped for a non-finite loss/grad.
    max_consecutive_skips: int = 5
    # Fault injection for tests and drills: the loss of these iterations (1-based) becomes NaN.
    inject_nan_iterations: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class DataConfig:
    # One dataset directory (from `megatron-emu-data preprocess`), or a blend of "WEIGHT:DIR"
    # entries (e.g. ["3:/data/laion", "1:/data/mmc4"]); a plain string means one directory.
    path: list[str] | str = field(default_factory=list)
    tokenizer: Optional[str] = None
    # Images per sequence, video frames included (a video is dropped whole when it exceeds it).
    max_images_per_sequence: int = 8
    # Frames per video (the preprocessing's --video-frames): megatron-emu-generate --video samples
    # this many, and the dry-run planner counts them (docs/data.md).
    video_frames: int = 8
    num_workers: int = 2
    # auto: DALI/nvJPEG on a GPU when installed, else PIL; or pil | dali_cpu | dali.
    decoder: Literal["auto", "pil", "dali_cpu", "dali"] = "auto"
    # A pair's image goes before its caption with this probability (paper stage 2: 0.5;
    # captioning-only stage 1: 1.0).
    pair_image_first_prob: float = 0.5
    # Documents looked ahead to fill a sequence when packing.
    packing_lookahead: int = 16
    # A bad sample (corrupt image, truncated shard) is skipped, logged and counted (bad_samples
    # in metrics.jsonl); this many in a row stop the job with an error (docs/data.md).
    max_consecutive_bad_samples: int = 100
    # Validation data (train.eval_interval / eval_iters): held-out dataset(s) with the blend
    # syntax of `path`, or a fraction of `path`'s documents held out by a hash of each document
    # (the same documents on every run and layout; training then never sees them). Neither: no
    # validation.
    valid_path: list[str] | str = field(default_factory=list)
    valid_fraction: float = 0.0

    def __post_init__(self):
        if isinstance(self.path, str):  # `--set data.path=/dir`: one dataset
            self.path = [self.path]
        if isinstance(self.valid_path, str):
            self.valid_path = [self.valid_path]


@dataclass(kw_only=True)
class CheckpointConfig:
    # Where iter_NNNNNNN/ and `latest` go; a restart resumes from `latest` here.
    dir: Optional[str] = None
    save_interval: int = 1000
    # Initialise weights (only) from this checkpoint (a checkpoint dir with `latest`, or one
    # iter_NNNNNNN/ dir) when checkpoint.dir has nothing to resume from.
    load: Optional[str] = None
    keep_last: int = 3
    # Save a final checkpoint when train_iters is reached.
    save_at_end: bool = True
    # GPU only: copy to host memory and write in the background while training goes on.
    async_save: bool = False
    # Check every checkpoint file read (resume, checkpoint.load) against its checksums.json.
    verify: bool = True


@dataclass(kw_only=True)
class WandbConfig:
    """Optional Weights & Biases logging of the metrics (needs `pip install wandb`)."""

    project: str
    name: Optional[str] = None
    mode: Literal["online", "offline"] = "online"


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    log_interval: int = 1
    wandb: Optional[WandbConfig] = None


@dataclass(kw_only=True)
class EmuConfig:
    """Root of the configuration tree (one YAML file)."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
