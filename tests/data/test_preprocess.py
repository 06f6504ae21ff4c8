"""Preprocessing real photos + captions from every input format into shards."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_tools.inspect import inspect
from data_tools.samples import CAPTIONS, STORY
from megatron_emu.data import shard_format as sf
from megatron_emu.data.tokenizer import Emu2Tokenizer
from tests.helpers.datasets import IMAGE_SIZE, preprocess

FORMATS = ["img2dataset", "mmc4", "jsonl", "laion", "obelics"]


def read_all(directory) -> list[sf.Document]:
    meta, index = sf.load_index(directory)
    docs = []
    for row in index:
        path = directory / meta["shards"][int(row[sf.COL_SHARD])]
        members = sf.read_span(path, int(row[sf.COL_OFFSET]), int(row[sf.COL_SIZE]))
        docs.append(sf.decode_document("k", members, keep_text=True))
    return docs


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(fmt, datasets, tokenizer_dir, samples):
    directory, summary = datasets[fmt]
    tok = Emu2Tokenizer(tokenizer_dir)
    n_photos = 2 * len(CAPTIONS)
    docs = read_all(directory)
    assert summary["skipped"] == {}
    assert summary["documents"] == len(docs) > 0
    assert summary["images"] == sum(d.n_images for d in docs) == n_photos
    assert summary["text_tokens"] == sum(len(v[1]) for d in docs for k, v in d.segments if k == "text")
    captions = set(CAPTIONS.values())
    for doc in docs:
        for kind, value in doc.segments:
            if kind == "image":
                im = Image.open(io.BytesIO(value))
                assert im.format == "JPEG" and im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode == "RGB"
            else:
                text, ids = value
                assert ids == tok.encode(text)
        if fmt in ("img2dataset", "laion"):
            assert doc.kind == "pair" and [k for k, _ in doc.segments] == ["image", "text"]
            assert doc.segments[1][1][0] in captions
        else:
            assert doc.kind == "interleaved"
            # Each photo sits right before its caption (MMC4: before the matched sentence).
            kinds = [k for k, _ in doc.segments]
            for i, k in enumerate(kinds):
                if k == "image":
                    following = doc.segments[i + 1][1][0]
                    assert any(following.startswith(c) for c in captions), following
            assert doc.segments[0][1][0] in STORY
    report = inspect(directory, tokenizer=str(tokenizer_dir))
    assert report["broken"] == [] and report["documents"] == len(docs)


def test_pairs_keep_the_photo_pixels(datasets, samples):
    """The stored image is the source photo resized (bicubic) to the model size."""
    from data_tools.samples import photos

    directory, _ = datasets["img2dataset"]
    name, data, caption = photos(1)[0]  # astronaut
    doc = read_all(directory)[0]
    assert doc.segments[1][1][0] == caption
    stored = np.asarray(Image.open(io.BytesIO(doc.segments[0][1])), dtype=np.float32)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32)
    assert np.abs(stored - expected).mean() < 3.0  # JPEG q95 re-encoding


def test_output_is_deterministic_and_independent_of_workers(samples, tokenizer_dir, tmp_path):
    a = preprocess(samples, tokenizer_dir, "img2dataset", tmp_path / "a", shard_size=10, workers=1)
    b = preprocess(samples, tokenizer_dir, "img2dataset", tmp_path / "b", shard_size=10, workers=2)
    assert a == b and a["shards"] == 5
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_rerun_skips_finished_shards(samples, tokenizer_dir, tmp_path, caplog):
    out = tmp_path / "out"
    first = preprocess(samples, tokenizer_dir, "mmc4", out, shard_size=4)
    shard0 = out / "shard-000000.tar"
    shard3 = out / "shard-000003.json"
    before = shard0.stat().st_mtime_ns
    shard3.unlink()  # as if the run was killed before the last shard finished
    caplog.set_level("INFO", logger="megatron_emu")
    second = preprocess(samples, tokenizer_dir, "mmc4", out, shard_size=4)
    assert second == first
    assert shard0.stat().st_mtime_ns == before
    assert "3 already done, 1 to process" in caplog.text
    # Other options make another dataset: refused without --overwrite, then everything is redone
    # (the shard json records what it was made with).
    with pytest.raises(ValueError, match="holds another dataset.*other options.*--overwrite"):
        preprocess(samples, tokenizer_dir, "mmc4", out, shard_size=4, image_size=28)
    assert shard0.stat().st_mtime_ns == before
    third = preprocess(samples, tokenizer_dir, "mmc4", out, shard_size=4, image_size=28, overwrite=True)
    assert shard0.stat().st_mtime_ns != before and third["documents"] == first["documents"]
    assert json.loads((out / "dataset.json").read_text())["image_size"] == 28


def test_shards_are_plain_webdataset(datasets):
    import webdataset as wds

    directory, summary = datasets["mmc4"]
    urls = [str(directory / s) for s in json.loads((directory / "dataset.json").read_text())["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == summary["documents"]
    first = samples[0]
    meta = json.loads(first["json"])
    assert sum("image" in s for s in meta["segments"]) == sum(k.endswith(".jpg") for k in first)


def test_text_whitespace_is_normalised():
    from megatron_emu.contracts.chat_template import normalize_text

    assert normalize_text("  two  spaces\tand\t\ttabs \n\n next  line ") == "two spaces and tabs\n\nnext line"
