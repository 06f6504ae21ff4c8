"""checkpoint.load into a grown vocabulary (Emu2 32272 -> Emu2-Chat 32274, within the same padded
rows): the new rows of the embedding and of the LM head start at the mean of the loaded rows,
not at the zero padding rows; across tensor-parallel ranks the mean is that of all rows."""

from __future__ import annotations

import torch

from megatron_emu.training.checkpointing import VOCAB_ROW_MODULES, init_grown_vocab_rows
from tests.helpers.dist import run_ranks
from tests.helpers.layouts import _setup
from tests.helpers.tiny import tiny_config

OLD, NEW, PADDED = 32272, 32274, 32384


def _full(seed: int, hidden: int) -> torch.Tensor:
    weight = torch.randn(PADDED, hidden, generator=torch.Generator().manual_seed(seed))
    weight[OLD:] = 0.0  # the padding rows, as the HF conversion writes them
    return weight


def _grow(rank: int, tp: int) -> dict:
    cfg = tiny_config(tp=tp)
    _, chunks = _setup(cfg)
    modules = {n.rsplit(".", 1)[-1]: m for c in chunks for n, m in c.named_modules() if n.endswith(VOCAB_ROW_MODULES)}
    assert len(modules) == 2
    out = {}
    for seed, (_, module) in enumerate(sorted(modules.items())):
        rows = module.weight.shape[0]
        start = torch.distributed.get_rank(module.tp_group) * rows
        with torch.no_grad():
            module.weight.copy_(_full(seed, cfg.model.lm.hidden_size)[start:start + rows])
    init_grown_vocab_rows(chunks, OLD, NEW)
    for name, module in sorted(modules.items()):
        parts = [torch.empty_like(module.weight) for _ in range(tp)]
        torch.distributed.all_gather(parts, module.weight.detach().contiguous(), group=module.tp_group)
        out[name] = torch.cat(parts)
    return out


def test_grown_vocabulary_rows_start_at_the_mean_of_the_loaded_rows():
    results = run_ranks(2, _grow, 2)
    hidden = tiny_config().model.lm.hidden_size
    for seed, name in enumerate(sorted(results[0])):
        before, after = _full(seed, hidden), results[0][name]
        assert torch.equal(after, results[1][name]) and after.shape == before.shape
        mean = before[:OLD].mean(0)
        assert torch.allclose(after[OLD:NEW], mean.expand(NEW - OLD, -1), atol=1e-6)
        assert mean.abs().sum() > 0
        assert torch.equal(after[:OLD], before[:OLD]) and not after[NEW:].any()  # the rest untouched
