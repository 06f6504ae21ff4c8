"""Real sample datasets for tests: photos + captions in every input format, preprocessed."""

from __future__ import annotations

from data_tools.preprocess import Options, run

IMAGE_SIZE = 56


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
