"""Sample fine-tuning data made from the bundled photos and clips (``megatron-emu-data samples``):

    OUT/chat/conversations.json + OUT/chat/images/ + OUT/chat/videos/
                                 LLaVA-style conversations about the photos (one, two or three
                                 turns, some about two photos) and about the sample clips
    OUT/gen/gen.jsonl + OUT/gen/images/
                                 Emu2-Gen samples: grounded generation (a phrase, its box and a
                                 crop of the object, then the whole photo) and editing pairs
                                 (a photo, an instruction, the edited photo)

The formats are those of ``data_tools/sources/tuning.py`` (docs/tuning.md).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageOps

QUESTIONS = ["What is shown in this picture?", "Describe the image in one sentence.",
             "What do you see here?"]
FOLLOW_UP = ("Is it a photograph?", "Yes, it is a real photograph.")
VIDEO_QUESTION = "What happens in this clip?"
TWO_IMAGES = "What do these two pictures show?"
# (instruction, edit) pairs of the editing samples.
EDITS = [("Flip the picture from left to right.", ImageOps.mirror),
         ("Make the picture black and white.", lambda im: ImageOps.grayscale(im).convert("RGB")),
         ("Turn the picture upside down.", ImageOps.flip)]


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _conversations(photos: list, clips: list) -> list[dict]:
    records = []
    for i, (name, _, caption) in enumerate(photos):
        turns = [{"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
                 {"from": "gpt", "value": caption}]
        if i % 3 == 1:
            turns += [{"from": "human", "value": FOLLOW_UP[0]}, {"from": "gpt", "value": FOLLOW_UP[1]}]
        records.append({"id": f"chat{i:05d}", "image": f"images/{name}.jpg", "conversations": turns})
        if i % 4 == 3:
            prev_name, _, prev_caption = photos[i - 1]
            records.append({"id": f"pair{i:05d}", "image": [f"images/{prev_name}.jpg", f"images/{name}.jpg"],
                            "conversations": [
                                {"from": "human", "value": f"<image> <image>\n{TWO_IMAGES}"},
                                {"from": "gpt", "value": f"{prev_caption} {caption}"}]})
    for vid, caption in clips:
        records.append({"id": f"video{vid}", "video": f"videos/{vid}.mp4", "conversations": [
            {"from": "human", "value": f"<video>\n{VIDEO_QUESTION}"}, {"from": "gpt", "value": caption}]})
    return records


def _gen_samples(photos: list, images: Path) -> list[dict]:
    samples = []
    for i, (name, data, caption) in enumerate(photos):
        im = Image.open(io.BytesIO(data)).convert("RGB")
        (images / f"{name}.jpg").write_bytes(_jpeg(im))
        if i % 2 == 0:  # grounded: the middle of the photo is the object
            w, h = im.size
            box = [0.25, 0.25, 0.75, 0.75]
            (images / f"{name}_object.jpg").write_bytes(_jpeg(im.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))))
            samples.append({"kind": "grounded", "key": f"grounded{i:05d}", "segments": [
                {"text": "A photo of"}, {"phrase": caption.rstrip(".").split(",")[0], "box": box,
                                         "object": f"images/{name}_object.jpg"},
                {"text": "in the middle of the picture"}], "image": f"images/{name}.jpg"})
        else:
            instruction, edit = EDITS[(i // 2) % len(EDITS)]
            (images / f"{name}_edited.jpg").write_bytes(_jpeg(edit(im)))
            samples.append({"kind": "edit", "key": f"edit{i:05d}", "source": f"images/{name}.jpg",
                            "instruction": instruction, "target": f"images/{name}_edited.jpg"})
    return samples


def write_tuning(out: Path, photos: list, clips: list) -> dict:
    """``photos``: ``(name, encoded image, caption)``; ``clips``: ``(video id, caption)`` of the
    sample videos under ``OUT/webvid/videos``. Returns counts."""
    chat, gen = out / "chat", out / "gen"
    for d in (chat / "images", chat / "videos", gen / "images"):
        d.mkdir(parents=True, exist_ok=True)
    for name, data, _ in photos:
        (chat / "images" / f"{name}.jpg").write_bytes(_jpeg(Image.open(io.BytesIO(data))))
    for vid, _ in clips:
        (chat / "videos" / f"{vid}.mp4").write_bytes((out / "webvid" / "videos" / f"{vid}.mp4").read_bytes())
    conversations = _conversations(photos, clips)
    (chat / "conversations.json").write_text(json.dumps(conversations, indent=1) + "\n")
    samples = _gen_samples(photos, gen / "images")
    with open(gen / "gen.jsonl", "w") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    return {"conversations": len(conversations), "gen_samples": len(samples)}
