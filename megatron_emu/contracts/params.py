"""The parameter namespace: the names of the Emu2 model's parameters, grouped into families.

Names are the same on every layout (the stage-local layer index aside): a model chunk holds
``vision.*`` (the ViT), ``adapter.*`` (``project_up``) and ``embedding.*`` on the first stage,
``decoder.layers.<i>.*`` on every stage, ``decoder.final_layernorm.*`` and ``heads.*`` on the
last. This one table serves the freezing globs (``train.freeze``: the model freezes, the config
validator checks that a pattern matches a family), the per-module learning rates
(``train.module_lr``: the optimizer's parameter groups) and the planner's memory estimate.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class ParamFamily:
    name: str  # the planner's component name
    prefix: str  # every parameter of the family starts with it
    lr_group: str  # its key under train.module_lr
    examples: tuple[str, ...]  # parameter names every layout has (a freeze pattern must match one)
    whole: str  # under the prefix but no parameter's name: a pattern matching it covers the family


FAMILIES: tuple[ParamFamily, ...] = (
    ParamFamily("vision", "vision.", "vision",
                ("vision.patch_embed.weight", "vision.cls_token", "vision.pos_embed",
                 "vision.blocks.layers.0.self_attention.linear_qkv.weight"), "vision.x"),
    ParamFamily("adapter", "adapter.", "adapter", ("adapter.project_up.weight",), "adapter.x"),
    ParamFamily("embedding", "embedding.", "lm", ("embedding.word_embeddings.weight",), "embedding.x"),
    ParamFamily("lm_layers", "decoder.layers.", "lm",
                ("decoder.layers.0.self_attention.linear_qkv.weight",), "decoder.layers.0.x"),
    ParamFamily("lm_final_norm", "decoder.final_layernorm.", "lm", ("decoder.final_layernorm.weight",),
                "decoder.final_layernorm.x"),
    ParamFamily("lm_head", "heads.output_layer.", "lm", ("heads.output_layer.weight",), "heads.output_layer.x"),
    ParamFamily("regression_head", "heads.project_down.", "regression_head", ("heads.project_down.weight",),
                "heads.project_down.x"),
)

# Top-level modules of a model chunk, in model order (what a freeze pattern starts with).
MODULES: tuple[str, ...] = tuple(dict.fromkeys(f.prefix.split(".")[0] for f in FAMILIES))
# The train.module_lr keys.
LR_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(f.lr_group for f in FAMILIES))
# One parameter name per family member that every layout has (the validator's check).
EXAMPLE_NAMES: tuple[str, ...] = tuple(n for f in FAMILIES for n in f.examples)


def family(name: str) -> ParamFamily:
    """The family of a planner component name; ``KeyError`` naming it when unknown."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(f"unknown parameter family {name!r}")


def lr_globs(group: str, wrapped: bool = True) -> tuple[str, ...]:
    """Name globs of the parameters of a ``train.module_lr`` group; ``wrapped``: names as seen
    through a wrapper (DDP: ``module.<name>``)."""
    lead = "*" if wrapped else ""
    return tuple(f"{lead}{f.prefix}*" for f in FAMILIES if f.lr_group == group)


def matches(pattern: str, name: str) -> bool:
    """A freeze glob against a parameter name (case-sensitive, as everywhere)."""
    return fnmatch.fnmatchcase(name, pattern)


def whole_family_frozen(name: str, patterns: list[str]) -> bool:
    """Every parameter of the family is frozen by one of ``patterns``."""
    probe = family(name).whole
    return any(matches(p, probe) for p in patterns)
