"""Every layout BAAI ships imports to the same checkpoint (HF or native keys, fused or separate
ViT q/v biases, safetensors or weights-only .bin, one file or shards with an index); a crafted
.bin runs nothing; ``--layout native`` writes what BAAI's GitHub ``EmuModel`` loads and round-
trips byte for byte."""

from __future__ import annotations

import json
import os
import pickle
from types import SimpleNamespace

import pytest
import torch

from megatron_emu.checkpoint.convert import ConversionError, hf_to_mcore, mcore_to_hf
from megatron_emu.checkpoint.hf_config import emu2_config
from megatron_emu.checkpoint.reader import CheckpointReader
from megatron_emu.contracts import vocab as st
from tests.helpers import reference as ref
from tests.helpers.dist import run_ranks
from tests.helpers.emu2_hf import native_state_dict, same_files, write_emu2_dir
from tests.helpers.tiny import TINY, ref_config, tiny_config


@pytest.fixture(scope="module")
def emu2(tokenizer_dir, tmp_path_factory):
    """The reference model's random weights in the HF layout (fused bias, safetensors) and the
    checkpoint hf-to-mcore makes of them."""
    cfg = tiny_config()
    params = ref.init_params(ref_config(cfg), seed=3)
    root = tmp_path_factory.mktemp("emu2")
    config = emu2_config(cfg, "fp32")
    hf = write_emu2_dir(root / "hf", params, config, tokenizer_dir)
    ckpt = root / "ckpt"
    hf_to_mcore(ckpt, hf=str(hf), progress=False)
    return SimpleNamespace(cfg=cfg, params=params, config=config, hf=hf, ckpt=ckpt)


def _tensors(ckpt) -> dict:
    reader = CheckpointReader(ckpt)
    return {name: reader.read(key, layer) for name, key, layer in reader.entries()}


def _logits(rank: int, ckpt: str, tokens, images) -> torch.Tensor:
    from megatron_emu.inference.generate import load_model

    model, _, _ = load_model(ckpt=ckpt)
    return model.forward_logits(tokens, images)


@pytest.mark.parametrize("layout, fmt, shards, heads, found", [
    # BAAI's Emu2_pytorch_model.bf16.bin: one native .bin, the heads inside decoder.lm
    ("native", "bin", 1, "lm", "torch .bin (weights-only load), one file"),
    ("native", "safetensors", 3, "top", "safetensors, 3 shards with an index"),
    ("native", "bin", 2, "lm", "torch .bin (weights-only load), 2 shards with an index"),
    # BAAI/Emu2 on the Hub: pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json
    ("hf", "bin", 2, None, "torch .bin (weights-only load), 2 shards with an index"),
], ids=["native_bin", "native_safetensors_sharded", "native_bin_sharded", "hf_bin_sharded"])
def test_every_baai_layout_imports_to_the_same_checkpoint(emu2, tmp_path, layout, fmt, shards, heads, found):
    stem = "pytorch_model" if fmt == "bin" else "model"
    if (layout, shards) == ("native", 1):
        stem = "Emu2_pytorch_model.bf16"
    src = write_emu2_dir(tmp_path / "in", emu2.params, emu2.config, layout=layout, fmt=fmt, shards=shards,
                         heads=heads, stem=stem)
    result = hf_to_mcore(tmp_path / "ckpt", hf=str(src), progress=False)
    info = result["input"]["hf"]
    assert info["files"] == found
    assert (info["layout"], info["qkv_bias"]) == (("BAAI native", "separate q_bias/v_bias") if layout == "native"
                                                 else ("Hugging Face", "fused qkv.bias"))
    expected, got = _tensors(emu2.ckpt), _tensors(tmp_path / "ckpt")
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name


def test_a_native_bin_without_config_gives_the_logits_of_the_fused_layout(emu2, tmp_path):
    """BAAI's native file alone (no config.json: --config gives the architecture), passed as a
    file: our logits on an image + text prompt equal those of the fused-layout import and the
    independent reference's."""
    src = write_emu2_dir(tmp_path / "in", emu2.params, emu2.config, layout="native", fmt="bin",
                         stem="Emu2_pytorch_model.bf16")
    (src / "config.json").unlink()
    weights = src / "Emu2_pytorch_model.bf16.bin"
    with pytest.raises(ConversionError, match="no config.json"):
        hf_to_mcore(tmp_path / "ckpt", hf=str(weights), progress=False)
    hf_to_mcore(tmp_path / "ckpt", hf=str(weights), config=str(TINY), progress=False)
    cfg = emu2.cfg
    n_query, size = cfg.model.adapter.n_query, cfg.model.vision.image_size
    tokens = torch.tensor([[1, st.IMG_ID] + [st.IMAGE_ID] * n_query + [st.IMG_END_ID, 319, 15373, 310]])
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(5))
    (native,) = run_ranks(1, _logits, str(tmp_path / "ckpt"), tokens, images)
    (fused,) = run_ranks(1, _logits, str(emu2.ckpt), tokens, images)
    assert torch.equal(native, fused)
    expected, _, _ = ref.forward(emu2.params, ref_config(cfg), tokens, images, st.IMAGE_ID)
    torch.testing.assert_close(native, expected, rtol=1e-4, atol=1e-4)


class _RunsCode:
    """A pickled object whose __reduce__ asks the unpickler to call os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("archive", ["zip", "legacy_pickle"])
def test_a_crafted_bin_runs_nothing_writes_nothing_and_is_refused_in_one_line(tmp_path, capsys, archive):
    from megatron_emu.cli.convert import main

    marker = tmp_path / "code_ran"
    src = tmp_path / "in"
    src.mkdir()
    payload = {"visual.cls_token": _RunsCode(marker), "visual.pos_embed": torch.zeros(2)}
    if archive == "zip":
        torch.save(payload, src / "pytorch_model.bin")
    else:
        with open(src / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f, protocol=2)  # what torch.save writes: no FRAME opcodes
    (src / "config.json").write_text(json.dumps(emu2_config(tiny_config(), "fp32")))
    code = main(["hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(src / "pytorch_model.bin") in err and "refused" in err and "posix.system" in err, err
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no staging directory


def test_native_export_is_what_baai_github_loads_and_round_trips_byte_for_byte(emu2, tmp_path):
    from safetensors.torch import load_file

    n1, c, n2 = tmp_path / "n1", tmp_path / "c", tmp_path / "n2"
    result = mcore_to_hf(emu2.ckpt, n1, layout="native", progress=False)
    assert result["layout"] == "native"
    got = {}
    for f in n1.glob("*.safetensors"):
        got.update(load_file(f))
    lm = emu2.cfg.model.lm
    expected = native_state_dict(emu2.params, heads="lm", head_dim=lm.hidden_size // lm.num_attention_heads,
                                 theta=lm.rope_theta)
    assert sorted(got) == sorted(expected)  # GitHub's EmuModel.load_state_dict(strict=True) keys
    for name, t in expected.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t), name
    config = json.loads((n1 / "config.json").read_text())
    assert "auto_map" not in config and not list(n1.glob("*.py"))
    hf_to_mcore(c, hf=str(n1), progress=False)
    mcore_to_hf(c, n2, layout="native", progress=False)
    same_files(n1, n2)


def test_weights_file_choice_is_explicit(emu2, tmp_path):
    from megatron_emu.checkpoint.hf_reader import HFReader

    src = write_emu2_dir(tmp_path / "in", emu2.params, emu2.config, layout="native", fmt="bin", stem="a")
    write_emu2_dir(src, emu2.params, emu2.config, layout="native", fmt="bin", stem="b")
    with pytest.raises(FileNotFoundError, match="several weights files .*a.bin, b.bin.*--hf FILE"):
        HFReader(src)
    assert HFReader(src / "b.bin").describe() == "torch .bin (weights-only load), one file"
