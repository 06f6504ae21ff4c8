"""``megatron-emu-generate --video``: the prompt's ``<video>`` becomes the training layout's
video block, and the frames the model sees are the ones preprocessing samples (an independent
PyAV decode is the oracle)."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_emu.checkpoint.convert import hf_to_mcore
from megatron_emu.data.decode import normalize
from megatron_emu.data.tokenizer import Emu2Tokenizer
from tests.conversion.test_convert import _save_llama
from tests.helpers.dist import run_ranks
from tests.helpers.tiny import TINY

BOS, IMG, END, GIMG, VIDEO = 1, 32001, 32002, 32004, 32007
N_QUERY, SIZE = 4, 56  # the tiny preset


def _oracle(path, picks: list[int]) -> torch.Tensor:
    with av.open(str(path)) as c:
        frames = [f.to_image() for f in c.decode(video=0)]
    arrays = [np.asarray(frames[i].resize((SIZE, SIZE), Image.BICUBIC)).transpose(2, 0, 1) for i in picks]
    return normalize(torch.from_numpy(np.stack(arrays)))


def test_video_frames_are_sampled_as_in_preprocessing(samples):
    from megatron_emu.inference.video import load_video

    path = samples / "webvid" / "videos" / "1001.mp4"  # 16 frames
    torch.testing.assert_close(load_video(str(path), 5, SIZE), _oracle(path, [1, 4, 8, 11, 14]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a readable video"):
        bad = samples / "corpus.txt"
        load_video(str(bad), 2, SIZE)


@pytest.fixture(scope="module")
def ckpt(tokenizer_dir, tmp_path_factory):
    llama = _save_llama(tmp_path_factory.mktemp("llama") / "llama", layers=2, kv_heads=4)
    out = tmp_path_factory.mktemp("conv") / "ckpt"
    hf_to_mcore(out, llama=str(llama), config=str(TINY), overrides=(f"data.tokenizer={tokenizer_dir}",),
                progress=False)
    return out


def _reference(rank, ckpt, ids, frames):
    from megatron_emu.inference.generate import generate, load_model

    model, _, _ = load_model(ckpt=ckpt)
    tokens = torch.tensor([ids])
    with_video = model.forward_logits(tokens, frames)[0, -1]
    black = model.forward_logits(tokens, torch.zeros_like(frames))[0, -1]
    return {"greedy": generate(model, ids, frames, 3, greedy=True),
            "frames_matter": float((with_video - black).abs().max())}


def test_generate_with_a_video_in_the_prompt(ckpt, samples, tokenizer_dir, capsys):
    from megatron_emu.cli.generate import main

    video = samples / "webvid" / "videos" / "1000.mp4"
    args = ["--ckpt", str(ckpt), "--prompt", "A clip:<video> It shows", "--video", str(video),
            "--video-frames", "2", "--max-new-tokens", "3", "--greedy", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = Emu2Tokenizer(str(tokenizer_dir))
    frame = [IMG] + [GIMG] * N_QUERY + [END]
    expected = [BOS, *tok.encode("A clip:"), VIDEO, *frame, *frame, *tok.encode(" It shows")]
    assert out["prompt_ids"] == expected
    (ref,) = run_ranks(1, _reference, str(ckpt), expected, _oracle(video, [4, 12]))  # centres of 2 halves of 16
    assert out["output_ids"] == ref["greedy"] and ref["frames_matter"] > 0
    # a placeholder without its file (and the reverse) is one clear error
    assert main(["--ckpt", str(ckpt), "--prompt", "<video><video>", "--video", str(video)]) == 2
    assert "2 <video> placeholder(s) but 1 --video" in capsys.readouterr().err
