"""The loader skips a bad document (corrupt JPEG, truncated shard, special ids in text) the same
way on every rank, layout and resume; counts it, logs shard and key once, and stops only after
``max_consecutive_bad`` in a row. An image whose header is fine but whose pixels do not decode
becomes black (tokens unchanged), in the PIL and the DALI paths."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_emu.data import shard_format as sf
from megatron_emu.data.bad_samples import BadDataError
from megatron_emu.data.decode import dali_available
from megatron_emu.data.loader import EmuDataLoader
from tests.data.test_loader import spec_for, take


def copy_dataset(datasets, name, tmp_path) -> tuple[dict, object]:
    """A copy of a sample dataset, as a ``datasets``-like dict for ``spec_for``."""
    src = datasets[name][0]
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return {name: (dst, None)}, dst


def jpeg_of_doc(directory, doc: int, which: int = 0) -> tuple[object, int]:
    """(shard path, byte position) of the ``which``-th JPEG of document ``doc``."""
    meta, index = sf.load_index(directory)
    row = index[doc]
    path = directory / meta["shards"][int(row[sf.COL_SHARD])]
    raw = path.read_bytes()
    start = int(row[sf.COL_OFFSET])
    pos = start
    for _ in range(which + 1):
        pos = raw.index(b"\xff\xd8\xff", pos + 1 if pos > start else pos)
    assert pos < start + int(row[sf.COL_SIZE])
    return path, pos


def patch(path, pos: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos:pos + len(data)] = data
    path.write_bytes(bytes(raw))


def bogus_huffman(path, pos: int) -> None:
    """A JPEG whose header parses but whose pixels do not decode (a Huffman table with
    impossible code counts; same length, so the tar stays valid)."""
    raw = path.read_bytes()
    dht = raw.index(b"\xff\xc4", pos)
    patch(path, dht + 5, b"\x7f" * 16)


def stream(loader, n):
    """``[(document keys, tokens, images)]`` of the sequences of ``n`` micro-batches, in order."""
    out = []
    for batch in take(loader, n):
        start = 0
        for i, keys in enumerate(batch.keys):
            k = int((batch.tokens[i] == 32001).sum())
            out.append((tuple(keys), batch.tokens[i], batch.images[start:start + k]))
            start += k
    return out


def test_a_corrupt_jpeg_is_skipped_alike_everywhere(datasets, tmp_path, caplog):
    bad_sets, directory = copy_dataset(datasets, "img2dataset", tmp_path)
    path, pos = jpeg_of_doc(directory, doc=5)
    patch(path, pos, b"XX")  # the JPEG start marker is gone
    caplog.set_level("WARNING", logger="megatron_emu")
    clean = EmuDataLoader(spec_for(datasets, "img2dataset", micro_batch_size=4))
    loader = EmuDataLoader(spec_for(bad_sets, "img2dataset", micro_batch_size=4))
    n = 12  # two epochs of the 42 pairs
    good, bad = stream(clean, n), stream(loader, n)
    # The plan is the same; the sequences holding document 5 lack it, the others are identical.
    assert loader.bad_samples == 2 and clean.bad_samples == 0
    changed = 0
    for (keys, tokens, images), (bad_keys, bad_tokens, bad_images) in zip(good, bad):
        assert bad_keys == tuple(k for k in keys if k != "0:5")
        if bad_keys != keys:
            changed += 1
            assert not torch.equal(bad_tokens, tokens)
        else:
            assert torch.equal(bad_tokens, tokens) and torch.equal(bad_images, images)
    assert changed == 2
    # Logged once, with the shard path and the sample key (0000000000005: shard 0, row 5).
    lines = [r.getMessage() for r in caplog.records if "bad sample" in r.getMessage()]
    assert len(lines) == 1 and str(path) in lines[0] and "key 0000000000005" in lines[0]
    # The same position gives the same sequences on another DP size (rank 1 of 2 takes the second
    # half of every global micro-step), without decoding (later pipeline stages), with workers,
    # and after a resume.
    rank1 = stream(EmuDataLoader(spec_for(bad_sets, "img2dataset", micro_batch_size=2, dp_rank=1, dp_size=2)), n)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(rank1, [x for i, x in enumerate(bad) if i % 4 >= 2]))
    for kw in (dict(decode_images=False), dict(num_workers=2)):
        other = stream(EmuDataLoader(spec_for(bad_sets, "img2dataset", micro_batch_size=4, **kw)), n)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(other, bad))
    first = EmuDataLoader(spec_for(bad_sets, "img2dataset", micro_batch_size=4))
    take(first, 3)
    resumed = EmuDataLoader(spec_for(bad_sets, "img2dataset", micro_batch_size=4))
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a[1], b[1]) for a, b in zip(stream(resumed, n - 3), bad[12:]))


def test_a_truncated_shard_is_skipped(datasets, tmp_path, caplog):
    bad_sets, directory = copy_dataset(datasets, "mmc4", tmp_path)
    meta, index = sf.load_index(directory)
    last = directory / meta["shards"][-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    in_last = index[:, sf.COL_SHARD] == len(meta["shards"]) - 1
    end = index[:, sf.COL_OFFSET] + index[:, sf.COL_SIZE]
    lost = int((in_last & (end > last.stat().st_size)).sum())
    assert lost >= 1
    caplog.set_level("WARNING", logger="megatron_emu")
    loader = EmuDataLoader(spec_for(bad_sets, "mmc4", micro_batch_size=4, seq_length=128))
    seen = set()
    while not all(f"0:{d}" in seen for d in range(len(index)) if not (in_last[d] and end[d] > last.stat().st_size)):
        for row in next(loader).keys:
            seen.update(row)
        assert loader.consumed_sequences < 400
    assert loader.bad_samples >= lost
    assert str(last) in caplog.text and "truncated" in caplog.text


def test_special_ids_in_stored_text_are_a_bad_sample(datasets, tmp_path):
    """A crafted shard whose text ids hold <image> ids: skipped, never turned into a batch with
    <image> tokens and no pixels."""
    bad_sets, directory = copy_dataset(datasets, "img2dataset", tmp_path)
    meta, index = sf.load_index(directory)
    path = directory / meta["shards"][0]
    raw = path.read_bytes()
    start, size = int(index[3, sf.COL_OFFSET]), int(index[3, sf.COL_SIZE])
    members = sf.read_span(path, start, size)
    doc = json.loads(members["json"])
    text = next(s for s in doc["segments"] if "ids" in s)
    old = json.dumps(text["ids"], separators=(",", ":")).encode()
    ids = text["ids"]
    while len(json.dumps([32003] + ids[1:], separators=(",", ":"))) > len(old):
        ids = ids[1:]
    new = json.dumps([32003] + ids[1:], separators=(",", ":")).encode().ljust(len(old), b" ")
    at = raw.index(old, start)
    patch(path, at, new)
    loader = EmuDataLoader(spec_for(bad_sets, "img2dataset", micro_batch_size=4))
    for batch in take(loader, 12):
        assert int((batch.tokens == 32003).sum()) == 4 * batch.images.shape[0]  # n_query per image
        assert not any("0:3" in keys for keys in batch.keys)
    assert loader.bad_samples >= 2
    from data_tools.inspect import inspect

    assert any("special token id in a text segment" in b for b in inspect(directory)["broken"])


@pytest.mark.parametrize("decoder", ["pil", "dali_cpu", pytest.param("dali", marks=pytest.mark.gpu)])
def test_pixels_that_do_not_decode_become_black(decoder, datasets, tmp_path):
    if decoder.startswith("dali") and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    bad_sets, directory = copy_dataset(datasets, "img2dataset", tmp_path)
    path, pos = jpeg_of_doc(directory, doc=5)
    bogus_huffman(path, pos)
    clean = stream(EmuDataLoader(spec_for(datasets, "img2dataset", micro_batch_size=4, decoder=decoder)), 6)
    loader = EmuDataLoader(spec_for(bad_sets, "img2dataset", micro_batch_size=4, decoder=decoder))
    black = 0
    for (keys, tokens, images), (bad_keys, bad_tokens, bad_images) in zip(clean, stream(loader, 6)):
        assert bad_keys == keys and torch.equal(bad_tokens, tokens)  # every stage agrees
        for a, b in zip(bad_images, images):
            if not torch.equal(a, b):
                assert int(a.max()) == 0 and "0:5" in keys
                black += 1
    assert black >= 1 and loader.bad_samples == black


def test_too_many_bad_samples_in_a_row_stop_with_one_line(datasets, tmp_path):
    bad_sets, directory = copy_dataset(datasets, "img2dataset", tmp_path)
    for shard in directory.glob("shard-*.tar"):
        shard.write_bytes(b"")
    loader = EmuDataLoader(spec_for(bad_sets, "img2dataset", micro_batch_size=4, max_consecutive_bad=5))
    with pytest.raises(BadDataError) as e:
        take(loader, 3)
    message = str(e.value)
    assert "\n" not in message and "5 bad samples in a row" in message
    assert "data.max_consecutive_bad_samples=5" in message and "shard-00000" in message
    assert loader.bad_samples == 5
    # Fewer in a row than the limit: counted, and training data keeps coming.
    sets, directory = copy_dataset(datasets, "mmc4", tmp_path / "one")
    path, pos = jpeg_of_doc(directory, doc=1)
    patch(path, pos, b"XX")
    loader = EmuDataLoader(spec_for(sets, "mmc4", micro_batch_size=4, max_consecutive_bad=2, seq_length=512))
    take(loader, 10)
    assert loader.bad_samples >= 2
