"""Bad input is counted by reason, logged with its key and skipped; nothing valid is lost."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import pytest

from data_tools.cli import main as data_cli
from data_tools.samples import photos
from megatron_emu.data.shard_format import write_member
from tests.helpers.datasets import IMAGE_SIZE


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header announcing a gigantic image (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = photos(1)[:4]
    jpeg = good[0][1]
    (root / "tars").mkdir()
    with tarfile.open(root / "tars" / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        def add(key, **members):
            for ext, data in members.items():
                write_member(tar, f"{key}.{ext}", data if isinstance(data, bytes) else data.encode())
        add("000000000", jpg=good[0][1], txt=good[0][2])
        add("000000001", jpg=b"this is not a jpeg at all", txt="corrupt")
        add("000000002", jpg=jpeg[: len(jpeg) // 2], txt="truncated jpeg")
        add("000000003", txt="no image in this sample")
        add("000000004", jpg=good[1][1], txt="   ")
        add("000000005", png=huge_png(), txt="far too large")
        add("000000006", jpg=good[2][1], json="{not json")
        write_member(tar, "../escape.jpg", jpeg)
        write_member(tar, "/etc/absolute.jpg", jpeg)
        add("000000007", jpg=good[3][1], txt=good[3][2])
    # A second tar cut in the middle of its last image.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (_, data, caption) in enumerate(good[:3]):
            write_member(tar, f"{i:09d}.jpg", data)
            write_member(tar, f"{i:09d}.txt", caption.encode())
    raw = buf.getvalue()
    last_jpeg_start = raw.rfind(good[2][1][:64])
    (root / "tars" / "00001.tar").write_bytes(raw[: last_jpeg_start + 1000])
    # JSONL documents with a bad line, an empty document and a missing image.
    (root / "jsonl" / "images").mkdir(parents=True)
    (root / "jsonl" / "images" / "ok.jpg").write_bytes(jpeg)
    lines = [json.dumps({"segments": [{"text": "A good one."}, {"image": "images/ok.jpg"}]}),
             "{broken json",
             json.dumps([1, 2, 3]),
             json.dumps({"segments": []}),
             json.dumps({"segments": [{"text": "Keeps its text."}, {"image": "images/missing.jpg"},
                                     {"text": "And this."}]}),
             json.dumps({"segments": [{"image": "images/missing.jpg"}]})]
    (root / "jsonl" / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _run(args, capsys) -> tuple[int, dict]:
    rc = data_cli(args)
    out = capsys.readouterr().out
    return rc, json.loads(out[out.index("{"):])


def test_img2dataset_bad_samples_are_counted(bad_inputs, tokenizer_dir, tmp_path, capsys, caplog):
    caplog.set_level("WARNING", logger="megatron_emu")
    rc, summary = _run(["preprocess", "--format", "img2dataset", "--input", str(bad_inputs / "tars"),
                        "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out"),
                        "--image-size", str(IMAGE_SIZE), "--workers", "1", "--no-progress"], capsys)
    assert rc == 0
    assert summary["skipped"] == {"corrupt_image": 2, "empty_document": 1, "image_too_large": 1,
                                  "malformed_json": 1, "missing_image": 1, "truncated_tar": 1,
                                  "unsafe_path": 2}
    # 2 good samples of the first tar + the 2 complete ones before the cut in the second.
    assert summary["documents"] == 4 and summary["images"] == 4
    assert "00000/000000001 (corrupt_image)" in caplog.text
    assert "escape.jpg" in caplog.text and not (tmp_path / "escape.jpg").exists()
    assert data_cli(["inspect", str(tmp_path / "out")]) == 0


def test_jsonl_bad_documents_are_counted(bad_inputs, tokenizer_dir, tmp_path, capsys):
    rc, summary = _run(["preprocess", "--format", "jsonl", "--input", str(bad_inputs / "jsonl" / "docs.jsonl"),
                        "--images", str(bad_inputs / "jsonl"), "--tokenizer", str(tokenizer_dir),
                        "--out", str(tmp_path / "out"), "--image-size", str(IMAGE_SIZE), "--no-progress"], capsys)
    assert rc == 0
    assert summary["skipped"] == {"empty_document": 2, "malformed_json": 2, "missing_image": 2}
    assert summary["documents"] == 2 and summary["images"] == 1  # the text-only survivor keeps its text


def test_nothing_valid_exits_nonzero(bad_inputs, tokenizer_dir, tmp_path, capsys):
    bad_only = tmp_path / "in.jsonl"
    bad_only.write_text("{broken\n" + json.dumps({"segments": []}) + "\n")
    rc = data_cli(["preprocess", "--format", "jsonl", "--input", str(bad_only), "--tokenizer",
                   str(tokenizer_dir), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 1
    assert "no valid document" in capsys.readouterr().err


def test_unusable_arguments_fail_before_work(tokenizer_dir, tmp_path, capsys):
    rc = data_cli(["preprocess", "--format", "mmc4", "--input", str(tmp_path / "nope.jsonl"),
                   "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out")])
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err
    rc = data_cli(["preprocess", "--format", "mmc4", "--input", str(tmp_path), "--tokenizer",
                   str(tmp_path / "no_tokenizer"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inspect_finds_a_broken_shard(datasets, tmp_path, capsys):
    import shutil

    src, _ = datasets["img2dataset"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shard = broken / "shard-000001.tar"
    raw = bytearray(shard.read_bytes())
    start = raw.index(b"\xff\xd8\xff")  # first JPEG in the shard
    raw[start + 200: start + 600] = b"\x00" * 400
    raw[start: start + 2] = b"XX"
    shard.write_bytes(bytes(raw))
    assert data_cli(["inspect", str(src)]) == 0
    capsys.readouterr()
    assert data_cli(["inspect", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN shard-000001.tar" in out and "does not decode" in out
    # A shard cut short is found too.
    (broken / "shard-000002.tar").write_bytes((src / "shard-000002.tar").read_bytes()[:3000])
    assert data_cli(["inspect", str(broken)]) == 1
    assert "shard-000002.tar" in capsys.readouterr().out


# One crafted record per case, next to a good one: the bad one is counted under its reason and
# skipped, the good one is kept, the run succeeds.
def _jsonl(root, samples, bad_lines: list[str]) -> list[str]:
    good = json.dumps({"segments": [{"text": "A good one."}, {"image": "astronaut_0.jpg"}]})
    (root / "docs.jsonl").write_text("\n".join([good, *bad_lines]) + "\n")
    return ["--format", "jsonl", "--input", str(root / "docs.jsonl"), "--images", str(samples / "jsonl" / "images")]


def lone_surrogate(root, samples):
    # json.dumps writes a lone surrogate as the escape \ud800, which json.loads turns back into one.
    return _jsonl(root, samples, [json.dumps({"segments": [{"text": "broken \ud800 text"}]}),
                                  json.dumps({"key": "k\udfff", "segments": [{"text": "fine text"}]})])


def infinite_index(root, samples):
    good = {"text_list": ["A cat.", "The end."], "image_info": [
        {"image_name": "chelsea_0.jpg", "matched_text_index": 0}]}
    bad = {"text_list": ["A cat."], "image_info": [{"image_name": "chelsea_0.jpg", "matched_text_index": float("inf")}]}
    assert "Infinity" in json.dumps(bad)
    (root / "docs.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    return ["--format", "mmc4", "--input", str(root / "docs.jsonl"), "--images", str(samples / "mmc4" / "images")]


def deep_nesting(root, samples):
    return _jsonl(root, samples, ['{"segments": ' + "[" * 200_000 + "]" * 200_000 + "}"])


def img2dataset_json_array(root, samples):
    name, data, caption = photos(1)[0]
    (root / "tars").mkdir()
    with tarfile.open(root / "tars" / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        write_member(tar, "000000000.jpg", data)
        write_member(tar, "000000000.txt", caption.encode())
        write_member(tar, "000000001.jpg", data)
        write_member(tar, "000000001.json", b'["an", "array"]')
    return ["--format", "img2dataset", "--input", str(root / "tars")]


def obelics_metadata_not_object(root, samples):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.samples import url_of

    (root / "obelics").mkdir()
    url = url_of(photos(1)[0][0])
    pq.write_table(pa.table({"images": [[url, None], [url, None]], "texts": [[None, "Fine."], [None, "Bad."]],
                             "metadata": ["[null, null]"] * 2,
                             "general_metadata": ['{"url": "https://a.example.org"}', '["not", "an object"]']}),
                   root / "obelics" / "part.parquet")
    return ["--format", "obelics", "--input", str(root / "obelics"), "--images", str(samples / "img2dataset")]


@pytest.mark.parametrize("make, reason, skipped", [
    (lone_surrogate, "malformed_text", 2), (infinite_index, "malformed_json", 1),
    (deep_nesting, "malformed_json", 1), (img2dataset_json_array, "malformed_json", 1),
    (obelics_metadata_not_object, "malformed_json", 1)], ids=lambda x: getattr(x, "__name__", str(x)))
def test_a_crafted_record_is_counted_and_skipped(make, reason, skipped, samples, tokenizer_dir, tmp_path,
                                                 capsys, caplog):
    caplog.set_level("WARNING", logger="megatron_emu")
    (tmp_path / "in").mkdir()
    args = make(tmp_path / "in", samples)
    rc, summary = _run(["preprocess", *args, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out"),
                        "--image-size", str(IMAGE_SIZE), "--workers", "1", "--no-progress"], capsys)
    assert rc == 0
    assert summary["skipped"] == {reason: skipped}
    assert summary["documents"] == 1 and summary["images"] == 1
    assert f"({reason})" in caplog.text
    assert data_cli(["inspect", str(tmp_path / "out")]) == 0
