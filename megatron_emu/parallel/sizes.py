"""The sizes of this process's parallel groups and its ranks in them, read from the process
groups themselves: the one source of the TP/PP/DP sizes a running component uses (the config
only asks for them; megatron-core's global state and the model's ``TransformerConfig`` get
copies made from these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelSizes:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    pp_rank: int = 0
    dp_rank: int = 0

    @classmethod
    def from_groups(cls, pgs) -> "ParallelSizes":
        """From megatron-core's ``ProcessGroupCollection`` (its ``tp``, ``pp`` and ``dp`` groups)."""
        import torch.distributed as dist

        return cls(tp=dist.get_world_size(pgs.tp), pp=dist.get_world_size(pgs.pp), dp=dist.get_world_size(pgs.dp),
                   pp_rank=dist.get_rank(pgs.pp), dp_rank=dist.get_rank(pgs.dp))

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1
