"""Video preprocessing on real mp4s (pans and zooms over the sample photos, H.264 via PyAV).

The oracle is an independent PyAV decode in the test: every frame of the file, the sampled
ones picked by hand-written indices, resized and JPEG-encoded as images are.
"""

from __future__ import annotations

import io
import logging
import shutil

import av
import numpy as np
import pytest
from PIL import Image

from data_tools.preprocess import Options, run
from megatron_emu.data import shard_format as sf
from tests.helpers.datasets import IMAGE_SIZE

FRAMES = 5
# Segment centres of a 16-frame clip cut in 5: floor((2i + 1) * 16 / 10).
EXPECTED_INDICES = [1, 4, 8, 11, 14]


def _run(samples, tokenizer_dir, out, inputs, images=None, fmt="webvid", **kw):
    opts = Options(format=fmt, tokenizer=str(tokenizer_dir), out=str(out), inputs=inputs, images=images,
                   image_size=IMAGE_SIZE, progress=False, video_frames=FRAMES, **kw)
    return run(opts)


def _documents(out):
    meta, index = sf.load_index(out)
    docs = []
    for row in index:
        path = out / meta["shards"][int(row[sf.COL_SHARD])]
        members = sf.read_span(path, int(row[sf.COL_OFFSET]), int(row[sf.COL_SIZE]))
        docs.append((row, sf.decode_document("k", members, keep_text=True)))
    return docs


def _oracle_frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC).save(
        out, format="JPEG", quality=95, subsampling=0)
    return out.getvalue()


def _pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int64)


@pytest.fixture(scope="module")
def webvid(samples, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("webvid")
    summary = _run(samples, tokenizer_dir, out, [str(samples / "webvid" / "results.csv")],
                   images=str(samples / "webvid" / "videos"))
    return out, summary


def test_frames_equal_an_independent_pyav_decode(webvid, samples):
    out, summary = webvid
    docs = _documents(out)
    assert summary["documents"] == summary["videos"] == len(docs) == 6
    assert summary["images"] == 6 * FRAMES and summary["skipped"] == {}
    for row, doc in docs:
        assert doc.kind == "pair" and [k for k, _ in doc.segments] == ["video", "text"]
        assert int(row[sf.COL_IMAGES]) == FRAMES and int(row[sf.COL_VIDEOS]) == 1
        frames = doc.segments[0][1]
        oracle = _oracle_frames(samples / "webvid" / "videos" / f"{doc.source['videoid']}.mp4")
        assert len(oracle) == 16 and len(frames) == FRAMES
        encoded = [_jpeg(f) for f in oracle]
        # pixels: the stored frame is the oracle's frame at the expected index, re-encoded alike
        assert frames == [encoded[i] for i in EXPECTED_INDICES]
        # order: each stored frame is nearest to its own oracle frame among all 16
        for frame, want in zip(frames, EXPECTED_INDICES):
            dist = [np.abs(_pixels(frame) - _pixels(e)).mean() for e in encoded]
            assert int(np.argmin(dist)) == want and sorted(dist)[1] > 1.0


def test_video2dataset_tars_and_jsonl_videos(samples, tokenizer_dir, webvid, tmp_path):
    tars = _run(samples, tokenizer_dir, tmp_path / "tars", [str(samples / "webvid_tars")])
    assert {k: tars[k] for k in ("documents", "videos", "images")} == {"documents": 6, "videos": 6,
                                                                       "images": 6 * FRAMES}
    by_csv = {d.segments[1][1][0]: d.segments[0][1] for _, d in _documents(webvid[0])}
    for _, doc in _documents(tmp_path / "tars"):
        assert doc.segments[0][1] == by_csv[doc.segments[1][1][0]]  # same frames from either layout
    jsonl = _run(samples, tokenizer_dir, tmp_path / "jsonl", [str(samples / "jsonl_video" / "docs.jsonl")],
                 images=str(samples / "jsonl_video"), fmt="jsonl")
    assert jsonl["documents"] == 3 and jsonl["videos"] == 6 and jsonl["interleaved"] == 3
    for _, doc in _documents(tmp_path / "jsonl"):
        assert [k for k, _ in doc.segments] == ["text", "video", "text", "video", "text"]
        assert doc.n_images == 2 * FRAMES and doc.n_videos == 2


def test_corrupt_and_missing_videos_are_counted_and_skipped(samples, tokenizer_dir, tmp_path, caplog):
    videos = tmp_path / "videos"
    shutil.copytree(samples / "webvid" / "videos", videos)
    good = (videos / "1000.mp4").read_bytes()
    (videos / "1001.mp4").write_bytes(good[: len(good) // 2])  # cut: no moov atom
    (videos / "1002.mp4").write_bytes(b"not a video " * 200)
    (videos / "1003.mp4").unlink()
    with caplog.at_level(logging.WARNING, logger="megatron_emu.data_tools"):
        summary = _run(samples, tokenizer_dir, tmp_path / "out", [str(samples / "webvid" / "results.csv")],
                       images=str(videos))
    assert summary["skipped"] == {"corrupt_video": 2, "missing_video": 1}
    assert summary["documents"] == summary["videos"] == 3
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any("results/000000001 (corrupt_video)" in m for m in lines)
    assert any("results/000000003 (missing_video)" in m for m in lines)
    assert all("\n" not in m for m in lines)


def test_version_one_datasets_are_still_read(tmp_path):
    """A dataset written before videos (index [N, 6], format_version 1) loads; its videos
    column reads as zeros."""
    (tmp_path / sf.DATASET_FILE).write_text('{"format_version": 1, "image_size": 56, "shards": []}')
    np.save(tmp_path / sf.INDEX_FILE, np.ones((3, 6), dtype=np.int64))
    meta, index = sf.load_index(tmp_path)
    assert index.shape == (3, 6) and sf.videos_column(index).tolist() == [0, 0, 0]
    np.save(tmp_path / sf.INDEX_FILE, np.ones((3, 7), dtype=np.int64))
    with pytest.raises(sf.ShardFormatError, match=r"expected shape \[N, 6\]"):
        sf.load_index(tmp_path)


def test_parquet_metadata_joined_with_video2dataset_tars_by_url(samples, tokenizer_dir, webvid, tmp_path):
    """WebVid metadata as parquet, without a path column: each row's contentUrl finds its video
    in video2dataset tars (their KEY.json url); the frames equal the mp4-folder run's."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(samples / "webvid" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows.append({**rows[0], "videoid": "999", "contentUrl": "https://videos.example.org/absent.mp4"})
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), tmp_path / "meta.parquet")
    summary = _run(samples, tokenizer_dir, tmp_path / "out", [str(tmp_path / "meta.parquet")],
                   images=str(samples / "webvid_tars"))
    assert summary["documents"] == 6 and summary["skipped"] == {"missing_video": 1}
    by_csv = {d.segments[1][1][0]: d.segments[0][1] for _, d in _documents(webvid[0])}
    for _, doc in _documents(tmp_path / "out"):
        assert doc.segments[0][1] == by_csv[doc.segments[1][1][0]]
