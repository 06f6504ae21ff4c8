"""What the model is built from: ``ModelSpec``, and the sizes derived from it.

The composition root (``training/build.py``) makes it from the config; the model never sees
the root config. The parallel sizes are not in it: the model reads them from the process groups
it is given (``parallel.sizes.ParallelSizes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_emu.config.schema import ModelConfig
from megatron_emu.contracts import image_layout
from megatron_emu.parallel.sizes import ParallelSizes


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model's own section plus the run settings that shape the modules.

    seq_length: tokens per sample; max_images_per_sequence: the cap the data layer applies
    (sizes the visual payload carried between pipeline stages); the pipeline split
    (virtual stages, LM layers of the first stage), sequence parallelism, batched p2p,
    activation recompute, FP8 and the frozen parameter globs.
    """

    model: ModelConfig
    seq_length: int
    max_images_per_sequence: int = 8
    virtual_pipeline: Optional[int] = None
    first_stage_layers: Optional[int] = None
    sequence_parallel: bool = False
    batch_p2p_comm: bool = True
    recompute_granularity: Optional[str] = None
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    freeze: tuple[str, ...] = ()


def max_visual_tokens(spec: ModelSpec) -> int:
    """Capacity of visual embeddings per sample carried between stages."""
    n_query = spec.model.adapter.n_query
    fit = spec.seq_length // image_layout.tokens_per_image(n_query)
    return min(spec.max_images_per_sequence, fit) * n_query


def extra_rows(spec: ModelSpec, pp: int) -> int:
    """Rows ``e`` of the ``[e, b, h]`` target payload appended to the pipeline activation."""
    if pp == 1:
        return 0
    per_sample = max_visual_tokens(spec) * spec.model.vision.width
    return math.ceil(per_sample / spec.model.lm.hidden_size)


def p2p_seq_length(spec: ModelSpec, sizes: ParallelSizes) -> int:
    """The ``seq_length`` to give megatron-core's schedules (it divides it by TP under SP)."""
    tp = sizes.tp if spec.sequence_parallel else 1
    return spec.seq_length + extra_rows(spec, sizes.pp) * tp
