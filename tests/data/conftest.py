"""Session fixtures: real photos + captions in every input format, a tiny trained tokenizer,
and the preprocessed datasets (all built once, offline)."""

from __future__ import annotations

import logging

import pytest

from data_tools.preprocess import Options, run
from data_tools.samples import write_samples
from data_tools.tokenizer import build

IMAGE_SIZE = 56


@pytest.fixture(scope="session")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    write_samples(out, copies=2)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    build(out, train_text=samples / "corpus.txt", vocab_size=800)
    return out


def format_inputs(samples, fmt: str) -> dict:
    """``--input``/``--images`` for each format on the sample data."""
    return {
        "img2dataset": {"inputs": [str(samples / "img2dataset")], "images": None},
        "mmc4": {"inputs": [str(samples / "mmc4" / "docs.jsonl")], "images": str(samples / "mmc4" / "images")},
        "jsonl": {"inputs": [str(samples / "jsonl" / "docs.jsonl")], "images": str(samples / "jsonl" / "images")},
        "laion": {"inputs": [str(samples / "laion")], "images": str(samples / "img2dataset")},
        "obelics": {"inputs": [str(samples / "obelics")], "images": str(samples / "img2dataset")},
    }[fmt]


def preprocess(samples, tokenizer_dir, fmt: str, out, **kw) -> dict:
    kw = {"image_size": IMAGE_SIZE, "progress": False, **format_inputs(samples, fmt), **kw}
    opts = Options(format=fmt, tokenizer=str(tokenizer_dir), out=str(out), **kw)
    return run(opts)


@pytest.fixture(scope="session")
def datasets(samples, tokenizer_dir, tmp_path_factory):
    """``{format: (directory, summary)}`` for the five input formats."""
    logging.getLogger("megatron_emu").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("datasets")
    return {fmt: (root / fmt, preprocess(samples, tokenizer_dir, fmt, root / fmt, shard_size=16))
            for fmt in ("img2dataset", "mmc4", "jsonl", "laion", "obelics")}
