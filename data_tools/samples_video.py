"""Short real videos for the sample data: pans and zooms over the bundled photos, H.264 mp4.

Each video is ``FRAMES`` frames of ``SIZE x SIZE`` at 8 fps (a few kB), written as WebVid-style
metadata + mp4 files, as video2dataset tars, and as video items of interleaved JSONL documents.
"""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

from PIL import Image

from data_tools.samples import CAPTIONS, load_photo
from data_tools.video import encode_video
from megatron_emu.data.shard_format import write_member

SIZE = 64
FRAMES = 16
# (photo, motion, caption)
VIDEOS = [
    ("astronaut", "pan", "The camera pans across an astronaut in her flight suit."),
    ("chelsea", "zoom", "Zooming in on Chelsea the tabby cat."),
    ("coffee", "pan", "A slow pan over a cup of coffee on a saucer."),
    ("rocket", "zoom", "Zooming in on a rocket on the launch pad."),
    ("sklearn:china.jpg", "pan", "The camera pans along a Chinese temple among the trees."),
    ("sklearn:flower.jpg", "zoom", "Zooming in on a pink flower."),
]


def clip(photo: Image.Image, motion: str, frames: int = FRAMES, size: int = SIZE) -> list[Image.Image]:
    """``frames`` RGB frames: a window sliding left to right ("pan") or shrinking to the centre
    ("zoom")."""
    im = photo.convert("RGB")
    w, h = im.size
    out = []
    for i in range(frames):
        t = i / max(frames - 1, 1)
        if motion == "pan":
            side = min(w, h) * 3 // 5
            x = int(t * (w - side))
            box = (x, (h - side) // 2, x + side, (h - side) // 2 + side)
        else:
            side = int(min(w, h) * (1.0 - 0.6 * t))
            box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
        out.append(im.crop(box).resize((size, size), Image.BICUBIC))
    return out


def write_videos(out: Path) -> int:
    """Write the sample videos in every video layout under ``out``; returns their number."""
    videos = []
    for n, (name, motion, caption) in enumerate(VIDEOS):
        assert name in CAPTIONS
        videos.append((f"{1000 + n}", encode_video(clip(load_photo(name), motion)), caption))
    for sub in ("webvid/videos", "webvid_tars", "jsonl_video/videos"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    with open(out / "webvid" / "results.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for vid, data, caption in videos:
            (out / "webvid" / "videos" / f"{vid}.mp4").write_bytes(data)
            (out / "jsonl_video" / "videos" / f"{vid}.mp4").write_bytes(data)
            rows.writerow([vid, f"https://videos.example.org/{vid}.mp4", "PT00H00M02S", "samples", caption])
    with tarfile.open(out / "webvid_tars" / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (vid, data, caption) in enumerate(videos):
            key = f"00000{i:04d}"
            write_member(tar, f"{key}.mp4", data)
            write_member(tar, f"{key}.txt", caption.encode())
            write_member(tar, f"{key}.json", json.dumps({"url": f"https://videos.example.org/{vid}.mp4",
                                                         "videoid": vid, "caption": caption}).encode())
    with open(out / "jsonl_video" / "docs.jsonl", "w") as f:
        for i in range(0, len(videos), 2):
            (a, _, cap_a), (b, _, cap_b) = videos[i], videos[i + 1]
            segs = [{"text": "Two clips from our trip."}, {"video": f"videos/{a}.mp4"}, {"text": cap_a},
                    {"text": "And then:"}, {"video": f"videos/{b}.mp4"}, {"text": cap_b}]
            f.write(json.dumps({"key": f"vdoc{i // 2:05d}", "segments": segs}) + "\n")
    return len(videos)
