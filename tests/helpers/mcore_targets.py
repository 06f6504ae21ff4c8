"""megatron-core's own account of a model's sharded layout (from ``sharded_state_dict``), which
``megatron_emu.checkpoint.layout`` derives without it: the tests hold the two equal."""

from __future__ import annotations

from megatron_emu.checkpoint.reader import RENAMES, STACKED


def rank_targets(chunks: list) -> dict[str, list]:
    """Canonical tensor name -> this rank's ShardedTensors that store part of it, each with its
    offsets and the full shape within the canonical (unstacked) tensor:
    ``{name: [(ShardedTensor, offsets, shape), ...]}``. ``_extra_state`` objects are left out.
    SwiGLU's fc1 factory becomes its two stored halves (gate and up rows)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    apply_factories(sharded)
    targets: dict[str, list] = {}
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor) or "_extra_state" in sh.key:
            continue
        if sh.prepend_axis_num:
            prefix = next(p for p in STACKED if sh.key.startswith(p))
            rest = sh.key[len(prefix):]
            name = f"{prefix}{sh.global_offset[0]}.{RENAMES.get(rest, rest)}"
            targets.setdefault(name, []).append((sh, tuple(sh.global_offset[1:]), tuple(sh.global_shape[1:])))
        else:
            targets.setdefault(sh.key, []).append((sh, tuple(sh.global_offset), tuple(sh.global_shape)))
    return targets


def described(targets: dict) -> dict:
    """``rank_targets``' ShardedTensors as the fields ``layout.Target`` has, comparable."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    return {name: sorted((sh.key, tuple(sh.global_shape), tuple(sh.global_offset), tuple(sh.local_shape), offsets,
                          sh.prepend_axis_num, is_main_replica(sh.replica_id)) for sh, offsets, _ in lst)
            for name, lst in targets.items()}
