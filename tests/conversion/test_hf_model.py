"""The exported Emu2 directory loads in transformers (our configuration_emu.py / modeling_emu.py,
trust_remote_code, offline) and agrees with our model; a checkpoint keeps its tokenizer, so the
round trip needs no --tokenizer from any directory; the Emu2-Chat layout converts both ways."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_emu.checkpoint.convert import hf_to_mcore, mcore_to_hf
from megatron_emu.checkpoint.hf_config import emu2_config
from megatron_emu.contracts import vocab as st
from tests.helpers import reference as ref
from tests.helpers.dist import run_ranks
from tests.helpers.emu2_hf import TOKENIZER_FILES, same_files, write_emu2_dir
from tests.helpers.hf_oracle import emu2_logits_and_greedy
from tests.helpers.tiny import ref_config, tiny_config


def _ours(rank: int, ckpt: str, tokens, images, prompt_len: int, steps: int) -> dict:
    from megatron_emu.inference.generate import generate, load_model

    model, _, tokenizer = load_model(ckpt=ckpt)
    return {"logits": model.forward_logits(tokens, images), "tokenizer": tokenizer,
            "greedy": generate(model, tokens[0, :prompt_len].tolist(), images, steps, greedy=True)}


def _prompt(cfg, n_images: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``<s>`` text ([IMG] <image> x n_query [/IMG] text) x n_images, and the images."""
    ids = [st.BOS_ID, 319, 15373]
    for i in range(n_images):
        ids += [st.IMG_ID] + [st.IMAGE_ID] * cfg.model.adapter.n_query + [st.IMG_END_ID, 310 + i, 263]
    ids += [29871, 3186, 727]
    size = cfg.model.vision.image_size
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return torch.tensor([ids]), images


@pytest.fixture(scope="module")
def base(tokenizer_dir, tmp_path_factory):
    """The reference's random weights (larger than the default init, so that greedy tokens are
    decisive) -> hf-to-mcore -> mcore-to-hf."""
    cfg = tiny_config()
    params = ref.init_params(ref_config(cfg), seed=11)
    params = {k: v * 5 if v.dim() > 1 else v for k, v in params.items()}
    root = tmp_path_factory.mktemp("base")
    src = write_emu2_dir(root / "src", params, emu2_config(cfg, "fp32"), tokenizer_dir)
    hf_to_mcore(root / "ckpt", hf=str(src), progress=False)
    mcore_to_hf(root / "ckpt", root / "hf", progress=False)
    return cfg, root


def test_transformers_loads_the_export_offline_and_agrees_with_ours(base):
    cfg, root = base
    hf = root / "hf"
    for f in ("configuration_emu.py", "modeling_emu.py", "visual.py", *TOKENIZER_FILES):
        assert (hf / f).is_file(), f
    config = json.loads((hf / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_emu.EmuForCausalLM"
    tokens, images = _prompt(cfg, n_images=2)
    prompt_len, steps = tokens.shape[1] - 3, 8
    oracle = emu2_logits_and_greedy(hf, tokens, images, prompt_len, steps)
    (ours,) = run_ranks(1, _ours, str(root / "ckpt"), tokens, images, prompt_len, steps)
    assert oracle["class"] == "EmuForCausalLM"
    torch.testing.assert_close(oracle["logits"], ours["logits"], rtol=1e-5, atol=1e-5)
    assert oracle["greedy"] == ours["greedy"] and len(ours["greedy"]) == steps


def test_round_trip_needs_no_tokenizer_from_another_directory(base, tmp_path, monkeypatch, capsys):
    """hf-to-mcore (relative paths) copies the HF directory's tokenizer into the checkpoint and
    stores its absolute path; mcore-to-hf and megatron-emu-generate, run elsewhere without
    --tokenizer, use the checkpoint's copy; the HF directory comes back byte for byte."""
    from megatron_emu.checkpoint.integrity import Manifest
    from megatron_emu.cli.generate import main as generate_main

    _, root = base
    monkeypatch.chdir(root)
    hf_to_mcore(tmp_path / "ckpt", hf="hf", progress=False)
    ckpt = tmp_path / "ckpt"
    meta = json.loads((ckpt / "megatron_emu.json").read_text())
    assert meta["config"]["data"]["tokenizer"] == str(root / "hf")
    assert all(f"tokenizer/{f}" in Manifest(ckpt).files for f in TOKENIZER_FILES)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    os.rename(root / "hf", root / "hf_moved")  # the stored path is gone too: the copy is used
    try:
        mcore_to_hf(Path("..") / "ckpt", Path("..") / "back", progress=False)
        assert generate_main(["--ckpt", "../ckpt", "--prompt", "A photo", "--max-new-tokens", "2", "--greedy",
                              "--json"]) == 0
    finally:
        os.rename(root / "hf_moved", root / "hf")
    same_files(root / "hf", tmp_path / "back")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt_ids"][0] == st.BOS_ID and len(out["output_ids"]) == 2


def test_chat_layout_round_trips(samples, tmp_path):
    """Emu2-Chat (model_version chat, vocabulary 32274 with [USER]/[ASSISTANT], 256 visual tokens
    per image from a 32x32 patch grid pooled 2x2): HF -> checkpoint -> HF is byte-identical, and
    the checkpoint's logits on a chat prompt with an image equal the reference's."""
    from data_tools.tokenizer import build

    from megatron_emu.data.tokenizer import Emu2Tokenizer

    tok = build(tmp_path / "tok", train_text=samples / "corpus.txt", vocab_size=800, chat=True)
    assert tok.vocab_size == st.CHAT_VOCAB_SIZE and tok.decode([st.USER_ID, st.ASSISTANT_ID]) == "[USER][ASSISTANT]"
    cfg = tiny_config(extra=("model.model_version=chat", f"model.lm.vocab_size={st.CHAT_VOCAB_SIZE}",
                             "model.vision.image_size=448", "model.adapter.n_query=256",
                             "model.lm.max_position_embeddings=512", "train.seq_length=512"))
    params = ref.init_params(ref_config(cfg), seed=7)
    config = emu2_config(cfg, "fp32")
    assert (config["model_version"], config["vocab_size"], config["vision_config"]["n_query"],
            config["vision_config"]["xattn"]) == ("chat", 32274, 256, False)
    h0 = write_emu2_dir(tmp_path / "h0", params, config, tmp_path / "tok")
    hf_to_mcore(tmp_path / "c1", hf=str(h0), progress=False)
    meta = json.loads((tmp_path / "c1" / "megatron_emu.json").read_text())["config"]
    assert (meta["model"]["model_version"], meta["model"]["lm"]["vocab_size"]) == ("chat", 32274)
    mcore_to_hf(tmp_path / "c1", tmp_path / "h1", progress=False)
    hf_to_mcore(tmp_path / "c2", hf=str(tmp_path / "h1"), progress=False)
    mcore_to_hf(tmp_path / "c2", tmp_path / "h2", progress=False)
    same_files(tmp_path / "h1", tmp_path / "h2")
    assert json.loads((tmp_path / "h1" / "config.json").read_text()) == config
    assert Emu2Tokenizer(tmp_path / "h1").chat
    ids = ([st.BOS_ID, st.USER_ID, 29901, 29871, st.IMG_ID] + [st.IMAGE_ID] * 256 +
           [st.IMG_END_ID, 319, st.ASSISTANT_ID, 29901])
    tokens = torch.tensor([ids])
    images = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    (ours,) = run_ranks(1, _ours, str(tmp_path / "c2"), tokens, images, len(ids), 1)
    expected, _, _ = ref.forward(params, ref_config(cfg), tokens, images, st.IMAGE_ID)
    torch.testing.assert_close(ours["logits"], expected, rtol=1e-4, atol=1e-4)


def test_the_model_code_is_shipped_with_the_package(tmp_path):
    """setup.py's package data carries hf_model/*.py, which mcore-to-hf copies from the installed
    package (built from a clean copy of the tracked files: no earlier build's file list)."""
    import shutil
    import subprocess
    import sys

    from megatron_emu.checkpoint.convert import HF_MODEL_FILES

    root = Path(__file__).resolve().parents[2]
    tracked = subprocess.run(["git", "ls-files", "setup.py", "pyproject.toml", "megatron_emu", "data_tools"],
                             cwd=root, check=True, capture_output=True, text=True).stdout.split()
    src = tmp_path / "src"
    for name in tracked:
        if (root / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, src / name)
    env = {**os.environ, "MEGATRON_EMU_BUILD_CUDA": "0"}
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path / "out")], cwd=src, check=True,
                   capture_output=True, env=env)
    shipped = tmp_path / "out" / "megatron_emu" / "checkpoint" / "hf_model"
    assert sorted(p.name for p in shipped.glob("*.py")) == sorted(HF_MODEL_FILES)
