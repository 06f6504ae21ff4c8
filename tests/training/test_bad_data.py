"""Bad data during real training runs (4 CPU ranks, TP2 PP2): web text that spells special tokens
trains; a corrupt JPEG and a truncated shard are skipped, logged with shard and key, and counted
in metrics.jsonl; data that is broken throughout stops the job with one line."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest

from megatron_emu.data import shard_format as sf
from megatron_emu.contracts import vocab as st
from tests.data.test_bad_samples import jpeg_of_doc, patch
from tests.helpers.datasets import preprocess
from tests.helpers.dist import run_ranks
from tests.helpers.training import metrics, tiny_args

SPELLED = "see <image> and [IMG] x [/IMG], <s> </s> [PAD] <grounding><patch_index_0007> [IMG]"


def train_logged(rank: int, log_dir, argv: list[str]) -> int:
    """``megatron-emu-train`` on one forked rank, its ``megatron_emu`` log lines kept in a file."""
    from megatron_emu.cli.train import main

    handler = logging.FileHandler(f"{log_dir}/rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("megatron_emu").addHandler(handler)
    return main(argv)


def run(tmp_path, data, tok, *sets) -> tuple[list[int], str]:
    argv = tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", *sets)
    codes = run_ranks(4, train_logged, tmp_path, argv, timeout=300)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("rank*.log")))
    return codes, logs


def test_text_spelling_special_tokens_trains(samples, tokenizer_dir, tmp_path):
    """Web text with ``<image>``, ``[IMG]``, ``<s>``, ... is preprocessed into plain text ids (only
    the real images get special ids) and trains (it stopped at step 1: "N <image> tokens but 0
    visual embeddings")."""
    src = samples / "jsonl" / "docs.jsonl"
    lines = []
    for line in src.read_text().splitlines():
        doc = json.loads(line)
        for seg in doc["segments"]:
            if "text" in seg:
                seg["text"] = f"{seg['text']} {SPELLED}"
        lines.append(json.dumps(doc))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "data"
    summary = preprocess(samples, tokenizer_dir, "jsonl", out, inputs=[str(tmp_path / "in" / "docs.jsonl")],
                         shard_size=8)
    assert summary["skipped"] == {} and summary["documents"] == len(lines)
    meta, index = sf.load_index(out)
    for row in index:
        members = sf.read_span(out / meta["shards"][int(row[0])], int(row[1]), int(row[2]))
        doc = sf.decode_document("k", members, keep_text=True)
        for kind, value in doc.segments:
            if kind == "text":
                text, ids = value
                assert SPELLED in text and max(ids) < st.LLAMA_VOCAB_SIZE
    codes, logs = run(tmp_path, [str(out)], tokenizer_dir)
    assert codes == [0] * 4, logs
    m = metrics(tmp_path / "run")
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(x["loss"]) and x["bad_samples"] == 0 for x in m)


def test_a_corrupt_jpeg_and_a_truncated_shard_are_skipped_during_training(datasets, tokenizer_dir, tmp_path):
    """A blend of two copies of the pairs: one with a corrupt JPEG (document 5), one with its
    first shard cut in half. The run completes; each bad sample is logged once per reading rank
    with its shard and key, and counted in metrics.jsonl."""
    jpeg, cut = tmp_path / "jpeg", tmp_path / "cut"
    shutil.copytree(datasets["img2dataset"][0], jpeg)
    shutil.copytree(datasets["img2dataset"][0], cut)
    path, pos = jpeg_of_doc(jpeg, doc=5)
    patch(path, pos, b"XX")  # the JPEG start marker is gone
    shard = cut / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    codes, logs = run(tmp_path, [f"1:{jpeg}", f"1:{cut}"], tokenizer_dir)
    assert codes == [0] * 4, logs
    m = metrics(tmp_path / "run")
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(x["loss"]) for x in m)
    lines = [x for x in logs.splitlines() if "skipped a bad sample" in x]
    jpeg_lines = [x for x in lines if str(path) in x]
    assert jpeg_lines and all("key 0000000000005" in x and "JPEG" in x for x in jpeg_lines)
    # Logged once per reading rank, although seen every epoch: TP2 x PP2 has 2 readers (the first
    # rank of each pipeline stage's TP group; its TP peer receives the batch by broadcast).
    assert len(jpeg_lines) == 2
    cut_lines = [x for x in lines if str(shard) in x]
    assert cut_lines and all("truncated" in x for x in cut_lines)
    assert len(lines) == len(jpeg_lines) + len(cut_lines)
    # metrics.jsonl counts them (rank 0's DP group: every bad document of the run once per step).
    assert sum(x["bad_samples"] for x in m) >= 2


def test_data_broken_throughout_stops_with_one_line(datasets, tokenizer_dir, tmp_path):
    directory = tmp_path / "pairs"
    shutil.copytree(datasets["img2dataset"][0], directory)
    for shard in directory.glob("shard-*.tar"):
        shard.write_bytes(b"")
    codes, logs = run(tmp_path, [str(directory)], tokenizer_dir, "data.max_consecutive_bad_samples=3")
    assert codes == [1] * 4, logs
    errors = [x for x in logs.splitlines() if x.startswith("ERROR")]
    assert errors and all("3 bad samples in a row" in x and "data.max_consecutive_bad_samples=3" in x
                          for x in errors)
    assert "Traceback" not in logs
    status = json.loads((tmp_path / "run" / "exit_status.json").read_text())
    assert status["status"] == "failed" and "bad samples in a row" in status["reason"]


def _first_docs(argv: list[str], dp_rank: int, steps: int = 6) -> set[int]:
    """Documents data-parallel rank ``dp_rank`` of 2 reads in the first ``steps`` steps."""
    from megatron_emu.cli.train import build_parser
    from megatron_emu.config.io import load_config
    from megatron_emu.data.loader import EmuDataLoader
    from megatron_emu.parallel.sizes import ParallelSizes
    from megatron_emu.training.build import loader_spec

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    spec = loader_spec(cfg, ParallelSizes(dp=2, dp_rank=dp_rank))
    loader = EmuDataLoader(spec)
    per_step = cfg.train.global_batch_size // (cfg.train.micro_batch_size * 2)
    keys = [k for _ in range(steps * per_step) for row in next(loader).keys for k in row]
    return {int(k.split(":")[1]) for k in keys}


def test_a_data_error_on_one_replica_stops_every_rank(datasets, tokenizer_dir, tmp_path):
    """DP 2: a corrupt JPEG lands in one replica's share of the plan only; with
    data.max_consecutive_bad_samples=1 that replica's loader stops. Its peer must stop too, at
    the same step, instead of waiting in the gradient all-reduce until the collective timeout."""
    jpeg = tmp_path / "jpeg"
    shutil.copytree(datasets["img2dataset"][0], jpeg)
    argv = tiny_args([str(jpeg)], tokenizer_dir, tmp_path / "run", tmp_path / "ckpt",
                     "data.max_consecutive_bad_samples=1", "parallel.collective_timeout_s=120",
                     tp=1, pp=1)
    only_rank0 = sorted(_first_docs(argv, 0) - _first_docs(argv, 1))
    assert only_rank0
    path, pos = jpeg_of_doc(jpeg, doc=only_rank0[0])
    patch(path, pos, b"XX")
    codes = run_ranks(2, train_logged, tmp_path, argv, timeout=100)
    assert codes == [1, 1]
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("rank*.log")))
    errors = [x for x in logs.splitlines() if x.startswith("ERROR")]
    assert len(errors) == 2 and "Traceback" not in logs
    assert any("1 bad samples in a row" in x for x in errors)
    assert any("the data loader of another rank failed" in x for x in errors)
