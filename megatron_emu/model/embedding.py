"""megatron-core's vocab-parallel token embedding without host synchronisation.

With TP > 1, megatron-core's ``VocabParallelEmbedding.forward`` zeroes the ids and rows outside
this rank's vocabulary shard with boolean-mask assignment (``x[mask] = 0``), which on a GPU
runs ``nonzero``: a device-to-host sync per micro-batch. This subclass computes the same values
with ``masked_fill``. It adds no state (same parameters, same checkpoint keys), so an embedding
built by megatron-core's ``LanguageModelEmbedding`` is switched to it in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


class SyncFreeVocabParallelEmbedding(VocabParallelEmbedding):
    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        """input_ ``[b, s]`` ids -> ``[b, s, h]`` (``[s/tp, b, h]`` when reduce-scattering)."""
        tp = self.tp_group.size()
        if tp > 1:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        else:
            local = input_
        out = self.weight[local] if self.deterministic_mode else F.embedding(local, self.weight)
        if tp > 1:
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(out.transpose(0, 1).contiguous(),
                                                              group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


def make_sync_free(embedding: VocabParallelEmbedding) -> VocabParallelEmbedding:
    """Switch a megatron-core ``VocabParallelEmbedding`` to the sync-free forward (in place)."""
    if type(embedding) is not VocabParallelEmbedding:
        raise TypeError(f"expected megatron-core's VocabParallelEmbedding, got {type(embedding).__name__}")
    embedding.__class__ = SyncFreeVocabParallelEmbedding
    return embedding
