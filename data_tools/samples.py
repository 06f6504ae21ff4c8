"""Real sample data for tiny runs, tests and benchmarks, with no network.

Photos shipped in the scikit-image, scikit-learn and matplotlib wheels, with hand-written
captions, written in every input format ``preprocess`` reads:

    OUT/corpus.txt               text to train a tiny tokenizer on
    OUT/img2dataset/00000.tar    pairs as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json)
    OUT/laion/part-00000.parquet LAION-style rows (URL, TEXT, WIDTH, HEIGHT) joined by URL
    OUT/obelics/part-00000.parquet  OBELICS rows (images/texts/metadata/general_metadata)
    OUT/mmc4/docs.jsonl + OUT/mmc4/images/   MMC4 documents and their image files
    OUT/jsonl/docs.jsonl + OUT/jsonl/images/ our interleaved JSONL
    OUT/webvid/results.csv + OUT/webvid/videos/  WebVid-style metadata and short H.264 mp4s
                                 (pans and zooms over the photos, ``samples_video.py``)
    OUT/webvid_tars/00000.tar    the same videos as video2dataset writes them (KEY.mp4, .txt, .json)
    OUT/jsonl_video/docs.jsonl + OUT/jsonl_video/videos/  interleaved JSONL with video items
    OUT/chat/conversations.json, OUT/gen/gen.jsonl (+ their images and videos)
                                 fine-tuning data (``samples_tuning.py``, docs/tuning.md)

``copies`` > 1 adds flipped/cropped variants of each photo (still real pixels) for volume.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from megatron_emu.data.shard_format import write_member

# (loader, caption): skimage.data names, then sklearn / matplotlib files.
CAPTIONS = {
    "astronaut": "Eileen Collins, an American astronaut, in her flight suit in front of the flag.",
    "chelsea": "Chelsea the cat, a tabby, looking to the side.",
    "coffee": "A cup of coffee on a saucer, seen from above.",
    "rocket": "A Falcon 9 rocket on the launch pad before lift-off.",
    "hubble_deep_field": "The Hubble deep field: thousands of distant galaxies on black sky.",
    "immunohistochemistry": "A microscope image of stained tissue in brown and blue.",
    "camera": "A man with a camera on a tripod, in black and white.",
    "coins": "Old Greek coins laid out in rows on a dark background.",
    "moon": "The cratered surface of the moon in grey tones.",
    "retina": "A photograph of the back of a human eye, the retina.",
    "stereo_motorcycle": "A red motorcycle parked in a workshop.",
    "colorwheel": "A color wheel with every hue around a white centre.",
    "logo": "The scikit-image logo, a snake drawn in a few colours.",
    "page": "A scanned page of printed text.",
    "clock": "A round wall clock with black hands.",
    "brick": "A wall of grey bricks.",
    "grass": "A close-up of green grass.",
    "text": "Handwritten and printed words on a sheet of paper.",
    "sklearn:china.jpg": "A Chinese temple with a curved roof among the trees.",
    "sklearn:flower.jpg": "A pink flower in close-up with a blurred background.",
    "mpl:grace_hopper.jpg": "Rear admiral Grace Hopper in her navy uniform.",
}
STORY = [
    "Here is what we saw on our trip.",
    "It was a long day with many things to look at.",
    "Later that evening we wrote down what we remembered.",
    "The next picture surprised everyone.",
]


def load_photo(name: str) -> Image.Image:
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image
        return Image.fromarray(load_sample_image(name.split(":", 1)[1]))
    if name.startswith("mpl:"):
        import matplotlib.cbook as cbook
        with cbook.get_sample_data(name.split(":", 1)[1]) as f:
            return Image.open(io.BytesIO(f.read())).convert("RGB")
    import skimage.data
    arr = getattr(skimage.data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr
    return Image.fromarray(np.asarray(arr))


def photos(copies: int = 1) -> list[tuple[str, bytes, str]]:
    """``(name, encoded image, caption)``: PNG for the RGBA logo (exercises conversion), JPEG else."""
    out = []
    for name, caption in CAPTIONS.items():
        im = load_photo(name)
        for c in range(copies):
            variant = im
            if c % 2 == 1:
                variant = ImageOps.mirror(variant)
            if c >= 2:
                w, h = variant.size
                k = c // 2
                variant = variant.crop((k * w // 16, k * h // 16, w - k * w // 32, h - k * h // 32))
            buf = io.BytesIO()
            if variant.mode == "RGBA":
                variant.save(buf, format="PNG")
            else:
                variant.convert("RGB" if variant.mode not in ("L",) else "L").save(buf, format="JPEG", quality=90)
            tag = name.replace(":", "_").replace(".jpg", "")
            out.append((f"{tag}_{c}", buf.getvalue(), caption))
    return out


def url_of(name: str) -> str:
    return f"https://images.example.org/{name}.jpg"


def write_img2dataset(out: Path, items, per_tar: int = 10_000) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for t in range(0, len(items), per_tar):
        with tarfile.open(out / f"{t // per_tar:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (name, data, caption) in enumerate(items[t:t + per_tar]):
                key = f"{t // per_tar:05d}{i:04d}"
                w, h = Image.open(io.BytesIO(data)).size
                meta = {"url": url_of(name), "caption": caption, "key": key, "status": "success",
                        "error_message": None, "width": w, "height": h, "original_width": w,
                        "original_height": h, "sha256": hashlib.sha256(data).hexdigest()}
                ext = "png" if data[:4] == b"\x89PNG" else "jpg"
                write_member(tar, f"{key}.{ext}", data)
                write_member(tar, f"{key}.txt", caption.encode())
                write_member(tar, f"{key}.json", json.dumps(meta).encode())


def _documents(items, per_doc: int = 3):
    """Interleaved documents: story sentences with photos and their captions."""
    docs = []
    for d in range(0, len(items), per_doc):
        group = items[d:d + per_doc]
        texts, images = [STORY[(d // per_doc) % len(STORY)]], []
        for j, (name, _data, caption) in enumerate(group):
            images.append((name, len(texts)))
            texts.append(caption)
            texts.append(STORY[(d + j + 1) % len(STORY)])
        docs.append((texts, images))
    return docs


def write_samples(out: str | Path, copies: int = 1) -> dict:
    """Write every format under ``out``; returns counts."""
    out = Path(out)
    items = photos(copies)
    (out).mkdir(parents=True, exist_ok=True)
    from data_tools.samples_tuning import write_tuning
    corpus = [c for _, _, c in items] + STORY
    import skimage.data
    for name in CAPTIONS:
        doc = getattr(getattr(skimage.data, name, None), "__doc__", None)
        if doc:
            corpus.append(" ".join(doc.split()))
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n")
    write_img2dataset(out / "img2dataset", items)
    docs = _documents(items)
    for fmt in ("mmc4", "jsonl"):
        img_dir = out / fmt / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        for name, data, _ in items:
            (img_dir / f"{name}.jpg").write_bytes(data)
    with open(out / "mmc4" / "docs.jsonl", "w") as f:
        for i, (texts, images) in enumerate(docs):
            f.write(json.dumps({
                "url": f"https://blog.example.org/post/{i}", "text_list": texts,
                "image_info": [{"image_name": f"{n}.jpg", "raw_url": url_of(n), "matched_text_index": t,
                                "matched_sim": 0.3} for n, t in images],
                "similarity_matrix": [[0.0] * len(texts) for _ in images]}) + "\n")
    with open(out / "jsonl" / "docs.jsonl", "w") as f:
        for i, (texts, images) in enumerate(docs):
            at = {t: n for n, t in images}
            segs = []
            for t, text in enumerate(texts):
                if t in at:
                    segs.append({"image": f"images/{at[t]}.jpg"})
                segs.append({"text": text})
            f.write(json.dumps({"key": f"doc{i:05d}", "segments": segs}) + "\n")
    _write_parquets(out, items, docs)
    from data_tools.samples_video import VIDEOS, write_videos
    counts = {"photos": len(items), "documents": len(docs), "videos": write_videos(out)}
    clips = [(f"{1000 + n}", caption) for n, (_, _, caption) in enumerate(VIDEOS)]
    return {**counts, **write_tuning(out, items, clips)}


def _write_parquets(out: Path, items, docs) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "laion").mkdir(parents=True, exist_ok=True)
    (out / "obelics").mkdir(parents=True, exist_ok=True)
    sizes = [Image.open(io.BytesIO(d)).size for _, d, _ in items]
    pq.write_table(pa.table({
        "URL": [url_of(n) for n, _, _ in items], "TEXT": [c for _, _, c in items],
        "WIDTH": [w for w, _ in sizes], "HEIGHT": [h for _, h in sizes],
        "similarity": [0.33] * len(items)}), out / "laion" / "part-00000.parquet")
    images, texts, metadata, general = [], [], [], []
    for i, (t_list, imgs) in enumerate(docs):
        at = {t: n for n, t in imgs}
        row_i, row_t, row_m = [], [], []
        for t, text in enumerate(t_list):
            if t in at:
                row_i.append(url_of(at[t]))
                row_t.append(None)
                row_m.append(json.dumps({"src": url_of(at[t])}))
            row_i.append(None)
            row_t.append(text)
            row_m.append(None)
        images.append(row_i)
        texts.append(row_t)
        metadata.append(json.dumps(row_m))
        general.append(json.dumps({"url": f"https://news.example.org/{i}"}))
    pq.write_table(pa.table({"images": images, "texts": texts, "metadata": metadata,
                             "general_metadata": general}), out / "obelics" / "part-00000.parquet")
