"""Run ``megatron-emu-train`` on forked CPU ranks (or under torchrun) and read its outputs."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.dist import run_ranks

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "emu2_tiny.yaml"


def train_rank(rank: int, argv: list[str]) -> int:
    from megatron_emu.cli.train import main

    return main(argv)


def tiny_args(data: list[str], tokenizer, run_dir, ckpt_dir, *sets: str, tp=2, pp=2) -> list[str]:
    """CLI arguments of the tiny preset on the test datasets (fp32, 0 loader workers)."""
    base = [f"data.path={json.dumps([str(d) for d in data])}", f"data.tokenizer={tokenizer}",
            f"run.dir={run_dir}", f"checkpoint.dir={ckpt_dir}", "data.num_workers=0",
            f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
            f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}",
            "train.train_iters=6", "checkpoint.save_interval=100", "run.log_interval=100"]
    argv = ["--config", str(TINY)]
    for s in [*base, *sets]:
        argv += ["--set", s]
    return argv


def train(world: int, argv: list[str], timeout: float = 300) -> list[int]:
    return run_ranks(world, train_rank, argv, timeout=timeout)


def metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
