"""Conversion and generation against independent oracles: transformers' LlamaForCausalLM, the
plain-PyTorch Emu2 reference (tests/helpers/reference.py), and byte-exact round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_emu.checkpoint.convert import ConversionError, hf_to_mcore, mcore_to_hf
from megatron_emu.checkpoint.hf_config import emu2_config
from megatron_emu.contracts import vocab as st
from tests.helpers import reference as ref
from tests.helpers.dist import run_ranks
from tests.helpers.hf_oracle import llama_logits_and_greedy
from tests.helpers.tiny import TINY, ref_config, tiny_config

TOKENS = [1, 319, 15373, 310, 263, 5434, 29871, 3186, 727, 2]


def _save_llama(out: Path, layers: int, kv_heads: int) -> Path:
    """A small random transformers LLaMA with the Emu2 vocabulary, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=st.EMU2_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=st.PAD_ID)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # larger than the default init, so logits are decisive
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("llama") / "llama", layers=4, kv_heads=4)


@pytest.fixture(scope="module")
def from_llama(llama_dir, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "from_llama"
    hf_to_mcore(out, llama=str(llama_dir), config=str(TINY), overrides=(f"data.tokenizer={tokenizer_dir}",))
    return out


def _our_logits_and_greedy(rank: int, ckpt: str, tokens: list[int], steps: int) -> dict:
    from megatron_emu.inference.generate import generate, load_model

    model, _, _ = load_model(ckpt=ckpt)
    logits = model.forward_logits(torch.tensor([tokens]))[0]
    return {"logits": logits, "greedy": generate(model, tokens[:4], None, steps, greedy=True)}


def test_llama_in_gives_the_same_logits_and_greedy_tokens(llama_dir, from_llama):
    oracle = llama_logits_and_greedy(llama_dir, TOKENS, 12)
    (ours,) = run_ranks(1, _our_logits_and_greedy, str(from_llama), TOKENS, 12)
    torch.testing.assert_close(ours["logits"], oracle["logits"], rtol=1e-4, atol=1e-4)
    assert len(ours["greedy"]) >= 1
    assert ours["greedy"] == oracle["greedy"][: len(ours["greedy"])]


def test_lm_only_out_loads_in_transformers_and_agrees(llama_dir, from_llama, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lm"
    mcore_to_hf(from_llama, out, lm_only=True, progress=False)
    original = load_file(llama_dir / "model.safetensors")
    back = {}
    for f in out.glob("*.safetensors"):
        back.update(load_file(f))
    assert set(back) == set(original)
    for k, v in original.items():
        assert torch.equal(back[k], v), k
    a, b = llama_logits_and_greedy(llama_dir, TOKENS, 4), llama_logits_and_greedy(out, TOKENS, 4)
    torch.testing.assert_close(b["logits"], a["logits"], rtol=0, atol=0)
    assert b["greedy"] == a["greedy"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    """A LLaMA with grouped-query attention (4 query heads share 2 key/value heads) and its
    transformers logits and greedy tokens."""
    path = _save_llama(tmp_path_factory.mktemp("llama_gqa") / "llama", layers=2, kv_heads=2)
    return path, llama_logits_and_greedy(path, TOKENS, 8)


@pytest.mark.parametrize("tp", [1, 2])
def test_gqa_llama_in_and_out_agrees_with_transformers(gqa_llama, tokenizer_dir, tmp_path, tp):
    """hf-to-mcore at TP1 and TP2 (one key/value head per rank) -> our logits and greedy tokens
    equal transformers'; mcore-to-hf gives back the same tensors and ``num_key_value_heads``."""
    from safetensors.torch import load_file

    llama, oracle = gqa_llama
    ckpt = tmp_path / "ckpt"
    hf_to_mcore(ckpt, llama=str(llama), config=str(TINY), tp=tp, overrides=(f"data.tokenizer={tokenizer_dir}",),
                progress=False)
    meta = json.loads((ckpt / "megatron_emu.json").read_text())
    assert (meta["config"]["model"]["lm"]["num_query_groups"], meta["layout"]["tp"]) == (2, tp)
    (ours,) = run_ranks(1, _our_logits_and_greedy, str(ckpt), TOKENS, 8)
    torch.testing.assert_close(ours["logits"], oracle["logits"], rtol=1e-4, atol=1e-4)
    assert ours["greedy"] == oracle["greedy"][: len(ours["greedy"])] and ours["greedy"]
    out = tmp_path / "lm"
    mcore_to_hf(ckpt, out, lm_only=True, progress=False)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    original, back = load_file(llama / "model.safetensors"), {}
    for f in out.glob("*.safetensors"):
        back.update(load_file(f))
    assert set(back) == set(original)
    for k, v in original.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
def test_hf_to_mcore_to_hf_is_byte_identical(from_llama, tmp_path, tp, pp, tokenizer_dir):
    h1, c, h2 = tmp_path / "h1", tmp_path / "c", tmp_path / "h2"
    mcore_to_hf(from_llama, h1, progress=False)
    config = json.loads((h1 / "config.json").read_text())
    assert config["vocab_size"] == 32272 and config["vision_config"]["n_query"] == 4 and "model_type" not in config
    index = json.loads((h1 / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] > 0
    hf_to_mcore(c, hf=str(h1), tp=tp, pp=pp, overrides=(f"data.tokenizer={tokenizer_dir}",))
    assert json.loads((c / "megatron_emu.json").read_text())["layout"]["tp"] == tp
    mcore_to_hf(c, h2, progress=False)
    names = sorted(p.name for p in h1.iterdir())
    assert names == sorted(p.name for p in h2.iterdir())
    for name in names:
        assert (h1 / name).read_bytes() == (h2 / name).read_bytes(), name


def _write_reference_hf(directory: Path, params: dict, cfg, tokenizer_dir: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in params.items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(emu2_config(cfg, "fp32")))
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copyfile(tokenizer_dir / f, directory / f)


def _our_vision_and_logits(rank: int, hf_dir: str, tokens, images) -> dict:
    from megatron_emu.inference.generate import load_model

    model, _, _ = load_model(hf=hf_dir)
    with torch.no_grad():
        feats = model.encode_images(images)
        logits = model.forward_logits(tokens, images)
    return {"feats": feats, "logits": logits}


def test_single_rank_hf_to_mcore_imports_no_megatron_core(from_llama, tmp_path, tokenizer_dir):
    """TP 1 x PP 1: the layout comes from the config (``layout.py``), ``.metadata`` is pickled
    from stand-ins (``dcp_metadata.py``) and the rank runs in the caller's process: neither
    megatron-core, torch DCP nor a launcher process is needed."""
    import subprocess
    import sys

    mcore_to_hf(from_llama, tmp_path / "h1", progress=False)
    code = ("import sys; from megatron_emu.checkpoint.convert import hf_to_mcore; "
            f"hf_to_mcore({str(tmp_path / 'c')!r}, hf={str(tmp_path / 'h1')!r}, progress=False, "
            f"overrides=('data.tokenizer={tokenizer_dir}',)); "
            "import multiprocessing; print(sorted(m for m in sys.modules if m.startswith(('megatron.', "
            "'torch.distributed.checkpoint'))), multiprocessing.active_children())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[] []", out.stdout + out.stderr
    assert (tmp_path / "c" / "checksums.json").is_file()


def test_emu2_hf_in_agrees_with_the_independent_reference(tokenizer_dir, tmp_path):
    """The reference's random weights (HF names) -> hf-to-mcore -> our ViT features and
    logits on an image + text sequence equal the reference's."""
    cfg = tiny_config()
    rcfg = ref_config(cfg)
    params = ref.init_params(rcfg, seed=3)
    hf = tmp_path / "emu2_hf"
    _write_reference_hf(hf, params, cfg, tokenizer_dir)
    ckpt = tmp_path / "ckpt"
    hf_to_mcore(ckpt, hf=str(hf), overrides=(f"data.tokenizer={tokenizer_dir}",))
    n_query = cfg.model.adapter.n_query
    tokens = torch.tensor([[1, st.IMG_ID] + [st.IMAGE_ID] * n_query + [st.IMG_END_ID, 319, 15373, 2]])
    images = torch.randn(1, 3, cfg.model.vision.image_size, cfg.model.vision.image_size,
                         generator=torch.Generator().manual_seed(5))
    exp_logits, _, exp_vis = ref.forward(params, rcfg, tokens, images, st.IMAGE_ID)
    for fn, source in ((_our_vision_and_logits, str(hf)), (_via_ckpt, str(ckpt))):
        (ours,) = run_ranks(1, fn, source, tokens, images)
        torch.testing.assert_close(ours["feats"], exp_vis.reshape(-1, exp_vis.shape[-1]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours["logits"], exp_logits, rtol=1e-4, atol=1e-4)


def _via_ckpt(rank: int, ckpt: str, tokens, images) -> dict:
    from megatron_emu.inference.generate import load_model

    model, _, _ = load_model(ckpt=ckpt)
    with torch.no_grad():
        return {"feats": model.encode_images(images), "logits": model.forward_logits(tokens, images)}


def test_bad_inputs_fail_clearly_and_write_nothing(llama_dir, from_llama, tmp_path):
    # A missing shard.
    sharded = tmp_path / "sharded"
    mcore_to_hf(from_llama, sharded, max_shard_gb=0.002, progress=False)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    shards_b = sorted(broken.glob("model-*.safetensors"))
    shards_b[1].unlink()
    with pytest.raises(FileNotFoundError, match="missing shard"):
        hf_to_mcore(tmp_path / "out1", hf=str(broken))
    assert not (tmp_path / "out1").exists()
    # A shape mismatch: the config says another hidden size than the LLaMA weights.
    with pytest.raises(ConversionError, match="shape"):
        hf_to_mcore(tmp_path / "out2", llama=str(llama_dir), config=str(TINY),
                    overrides=("model.lm.ffn_hidden_size=96",))
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))
    # An unknown key.
    from safetensors.torch import load_file, save_file
    odd = tmp_path / "odd"
    shutil.copytree(llama_dir, odd)
    tensors = load_file(odd / "model.safetensors")
    tensors["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(tensors, odd / "model.safetensors")
    with pytest.raises(ConversionError, match="mystery"):
        hf_to_mcore(tmp_path / "out3", llama=str(odd), config=str(TINY))
    assert not (tmp_path / "out3").exists()
    # Parts of one tensor that disagree beyond their rows (fused QKV: k with other columns).
    tensors.pop("model.layers.0.self_attn.mystery.weight")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, odd / "model.safetensors")
    with pytest.raises(ConversionError, match="disagree"):
        hf_to_mcore(tmp_path / "out5", llama=str(odd), config=str(TINY))
    assert not (tmp_path / "out5").exists() and not list(tmp_path.glob(".out5*"))
    # Not a checkpoint; an output that already has files.
    with pytest.raises(ConversionError, match="no checkpoint"):
        mcore_to_hf(tmp_path, tmp_path / "out4", progress=False)
    with pytest.raises(ConversionError, match="not empty"):
        mcore_to_hf(from_llama, sharded, progress=False)


def test_converter_outputs_have_checksums_and_normal_permissions(from_llama, tmp_path):
    import os

    from megatron_emu.checkpoint import integrity

    manifest = integrity.Manifest(from_llama)
    assert manifest.active and sorted(manifest.files) == integrity.checkpoint_files(from_llama)
    for name, entry in manifest.files.items():
        with open(from_llama / name, "rb") as f:
            manifest.check_range(name, f, 0, entry["size"])
    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "hf"
    mcore_to_hf(from_llama, out, progress=False)
    for directory in (from_llama, out):  # as mkdir would make them, not mkdtemp's 0700
        assert directory.stat().st_mode & 0o777 == 0o777 & ~umask, directory


def test_converted_checkpoint_initialises_training(from_llama, train_data, tmp_path, monkeypatch):
    """checkpoint.load: the converted weights start a TP2 x PP2 run (resharded). The run's
    checkpoint keeps its tokenizer (given as a relative path): a copy listed in checksums.json
    and the absolute path, so mcore-to-hf from another directory needs no --tokenizer."""
    import os

    from megatron_emu.checkpoint.integrity import Manifest
    from tests.helpers.training import metrics, tiny_args, train

    data, tok = train_data
    monkeypatch.chdir(tmp_path)
    args = tiny_args(data, os.path.relpath(tok, tmp_path), "run", "ckpt", f"checkpoint.load={from_llama}",
                     "train.train_iters=2")
    assert train(4, args) == [0] * 4
    assert len(metrics(tmp_path / "run")) == 2
    saved = tmp_path / "ckpt" / "iter_0000002"
    assert json.loads((saved / "megatron_emu.json").read_text())["config"]["data"]["tokenizer"] == str(tok)
    files = Manifest(saved).files
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        assert (saved / "tokenizer" / name).read_bytes() == (tok / name).read_bytes()
        assert f"tokenizer/{name}" in files
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert mcore_to_hf("../ckpt", "../hf", lm_only=True, progress=False)["tokenizer"] == str(saved / "tokenizer")


def test_llama_missing_a_layer_tensor_is_refused(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(llama_dir, partial)
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, partial / "model.safetensors")
    with pytest.raises(ConversionError, match="lacks 1 model tensor"):
        hf_to_mcore(tmp_path / "out", llama=str(partial), config=str(TINY))
    assert not (tmp_path / "out").exists()
