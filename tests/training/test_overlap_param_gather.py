"""With the distributed optimizer's overlapped parameter all-gather, a step updates only each
rank's shard and the rest arrives with the next forward's pre-hooks: a checkpoint written right
after the step must still hold every updated weight (what `checkpoint.load`, conversion and
generation read), the same as without the overlap."""

from __future__ import annotations

import torch

from megatron_emu.checkpoint.reader import CheckpointReader
from tests.helpers.training import tiny_args, train

SETS = ("parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
        "train.train_iters=4", "train.exit_interval=2")


def test_checkpoint_after_an_overlapped_step_holds_the_updated_weights(train_data, tmp_path):
    data, tok = train_data
    saved = {}
    for overlap in ("true", "false"):
        root = tmp_path / overlap
        args = tiny_args(data, tok, root / "run", root / "ckpt", *SETS,
                         f"parallel.overlap_param_gather={overlap}", tp=1, pp=1)
        assert train(2, args) == [0, 0]  # DP 2: each rank owns half of every bucket
        reader = CheckpointReader(root / "ckpt" / "iter_0000002")
        saved[overlap] = {(key, layer): reader.read(key, layer) for _, key, layer in reader.entries()}
    assert saved["true"].keys() == saved["false"].keys() and saved["true"]
    stale = [k for k, v in saved["false"].items() if not torch.equal(saved["true"][k], v)]
    assert not stale, f"weights that miss the last update: {stale[:5]}"
