"""Test tiers: ``gpu`` tests skip cleanly without CUDA; everything else runs on CPU/gloo.

Session fixtures build real sample data once (photos shipped in scikit-image / scikit-learn /
matplotlib with hand-written captions, a tiny trained tokenizer, preprocessed datasets)."""

import logging
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """Like every entry point: megatron-core's CPU layer on a machine without CUDA, before any
    test module imports megatron-core (the forked ranks inherit it)."""
    from megatron_emu.compat import setup_process

    setup_process()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def samples(tmp_path_factory):
    from data_tools.samples import write_samples

    out = tmp_path_factory.mktemp("samples")
    write_samples(out, copies=2)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(samples, tmp_path_factory):
    from data_tools.tokenizer import build

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    build(out, train_text=samples / "corpus.txt", vocab_size=800)
    return out


@pytest.fixture(scope="session")
def datasets(samples, tokenizer_dir, tmp_path_factory):
    """``{format: (directory, summary)}`` for the five input formats."""
    from tests.helpers.datasets import preprocess

    logging.getLogger("megatron_emu").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("datasets")
    out = {fmt: (root / fmt, preprocess(samples, tokenizer_dir, fmt, root / fmt, shard_size=16))
           for fmt in ("img2dataset", "mmc4", "jsonl", "laion", "obelics")}
    logging.getLogger("megatron_emu").setLevel(logging.NOTSET)
    return out


@pytest.fixture(scope="session")
def train_data(datasets, tokenizer_dir):
    """A 3:1 blend of pairs and MMC4 documents, and the tokenizer that made them."""
    return [f"3:{datasets['img2dataset'][0]}", f"1:{datasets['mmc4'][0]}"], tokenizer_dir
