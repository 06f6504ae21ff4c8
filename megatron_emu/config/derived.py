"""Pure derivations from the config tree. Configs are never mutated; these functions compute."""

from __future__ import annotations

import math
from typing import Optional

from megatron_emu.config.schema import EmuConfig, LMConfig, VisionConfig


def padded_vocab_size(lm: LMConfig) -> int:
    """Vocabulary rounded up to ``make_vocab_size_divisible_by``.

    Unlike Megatron-LM (which pads to a multiple of ``divisible_by * tp``), the padding does not
    depend on the tensor-parallel size, so one checkpoint reshards across every TP layout.
    """
    m = lm.make_vocab_size_divisible_by
    return int(math.ceil(lm.vocab_size / m) * m)


def patch_grid(vision: VisionConfig) -> int:
    """Patches per side: 448 / 14 = 32."""
    return vision.image_size // vision.patch_size


def vision_seq_length(vision: VisionConfig) -> int:
    """Tokens through the ViT: patches + CLS (1025 for Emu2)."""
    return patch_grid(vision) ** 2 + 1


def num_microbatches(cfg: EmuConfig, dp: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank."""
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def lm_layers_per_stage(lm_layers: int, pp: int, vpp: Optional[int] = None,
                        first: Optional[int] = None) -> list[list[int]]:
    """Global LM layer indices held by each pipeline rank (all virtual chunks of a rank).

    Returns ``stages[p]`` = sorted layer indices of pipeline rank ``p``. Virtual pipeline
    chunk ``v`` of rank ``p`` holds model chunk ``v * pp + p`` (Megatron's interleaving);
    ``first``: LM layers of the first stage (None: an even split).
    """
    vpp = vpp or 1
    if pp == 1:
        return [list(range(lm_layers))]
    if first is not None:
        rest = (lm_layers - first) // (pp - 1)
        sizes = [first] + [rest] * (pp - 1)
        out, start = [], 0
        for n in sizes:
            out.append(list(range(start, start + n)))
            start += n
        return out
    per_chunk = lm_layers // (pp * vpp)
    stages: list[list[int]] = [[] for _ in range(pp)]
    for chunk in range(pp * vpp):
        stages[chunk % pp].extend(range(chunk * per_chunk, (chunk + 1) * per_chunk))
    return stages
