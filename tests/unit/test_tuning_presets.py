"""The fine-tuning presets (docs/tuning.md): ``--dry-run`` of Emu2-Chat and Emu2-Gen, and their
settings against the paper (emu2_spec.md §2, §3.3)."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_emu.cli.train import main as train_main
from megatron_emu.config.io import ConfigError, load_config
from megatron_emu.config.validate import config_errors

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
CHAT, GEN, STAGE2 = CONFIGS / "emu2_37b_chat.yaml", CONFIGS / "emu2_37b_gen.yaml", CONFIGS / "emu2_37b_stage2.yaml"


@pytest.mark.parametrize("preset", [CHAT, GEN], ids=["chat", "gen"])
def test_tuning_presets_dry_run(monkeypatch, capsys, preset):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_main(["--config", str(preset), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "total parameters" in out and "estimated peak memory per GPU" in out
    assert train_main(["--config", str(preset), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["params_per_stage"]) == 8 and report["memory_gib_per_gpu"] < 80 * 0.9
    vocab = 32274 if preset == CHAT else 32272
    # embedding and LM head padded to a multiple of 128 (32384 rows either way), project_up/down
    assert report["params_per_component"]["lm_head"] == 32384 * 6656
    assert config_errors(load_config(preset), world_size=256) == []
    assert load_config(preset).model.lm.vocab_size == vocab


def test_chat_preset_follows_the_paper():
    cfg, base = load_config(CHAT), load_config(STAGE2)
    assert cfg.model.model_version == "chat" and cfg.model.lm.vocab_size == 32274
    assert cfg.model.adapter.n_query == 256  # 16x16 pooling
    assert replace(cfg.model.lm, vocab_size=32272) == base.model.lm and cfg.model.vision == base.model.vision
    tr = cfg.train
    assert tr.regression == "none" and cfg.model.loss.lm_weight == 1.0 and tr.freeze == ["vision.*"]
    assert (tr.train_iters, tr.global_batch_size, tr.lr, tr.min_lr) == (8000, 768, 1e-5, 0.0)
    assert round(tr.lr_warmup_fraction * tr.train_iters) == 100
    assert (tr.adam_beta1, tr.adam_beta2, tr.adam_eps, tr.clip_grad) == (0.9, 0.98, 1e-6, 5.0)
    assert tr.seq_length == 2048


def test_gen_preset_follows_the_paper():
    cfg, base = load_config(GEN), load_config(STAGE2)
    assert cfg.model == base.model  # Emu2's architecture and vocabulary, 64 tokens per image
    tr = cfg.train
    assert tr.regression == "last_image" and tr.freeze == ["vision.*"] and cfg.model.loss.lm_weight == 1.0
    assert (tr.train_iters, tr.lr, tr.adam_beta2, tr.clip_grad) == (3000, 5e-5, 0.95, 1.0)
    # Table 9, stage 1: 4096 text-to-image + 3584 grounded + 2048 editing samples per step; the
    # preset's suggested blend is that mix
    assert tr.global_batch_size == 4096 + 3584 + 2048
    text = GEN.read_text()
    (blend,) = re.findall(r"data\.path=(\[.*?\])", text)
    weights = [float(entry.split(":")[0]) for entry in ast.literal_eval(blend)]
    assert weights == [4096, 3584, 2048]
    assert load_config(GEN, [f"data.path={blend}"]).data.path[1].startswith("3584:")
    for preset in (GEN, CHAT):  # what the paper does not give is labelled as the project's choice
        lines = {line.split(":")[0].strip(): line for line in preset.read_text().splitlines()}
        assert "project's choice" in lines["weight_decay"]
        assert "project's choice" in lines["lr_warmup_fraction"] or preset == CHAT  # Chat: Table 8's 100
    off = load_config(GEN, ["model.loss.lm_weight=0", "train.regression=all"])
    assert off.model.loss.lm_weight == 0.0 and off.train.regression == "all"
    with pytest.raises(ConfigError, match="train.regression"):
        load_config(GEN, ["train.regression=first_image"])


def test_chat_initialises_from_an_emu2_checkpoint_but_resumes_only_its_own(tmp_path):
    """checkpoint.load of a stage-2 (Emu2) checkpoint into the Chat preset: n_query 64 -> 256 (no
    parameters) and vocabulary 32272 -> 32274 (the same 32384 padded rows) are accepted; a resume
    (all fields must match) and a vocabulary past the padding are refused."""
    from dataclasses import asdict

    from megatron_emu.training.checkpointing import CheckpointError, check_model_matches

    emu2 = {"config": {"model": asdict(load_config(STAGE2).model)}}
    chat = load_config(CHAT)
    check_model_matches(emu2, chat, tmp_path, weights_only=True)
    with pytest.raises(CheckpointError, match="model.adapter.n_query: checkpoint 64, config 256"):
        check_model_matches(emu2, chat, tmp_path)
    with pytest.raises(CheckpointError, match="model.lm.vocab_size: checkpoint 32272, config 32400"):
        check_model_matches(emu2, load_config(CHAT, ["model.lm.vocab_size=32400"]), tmp_path, weights_only=True)
    back = {"config": {"model": asdict(chat.model)}}  # 32274 -> 32272 would drop [USER] / [ASSISTANT]
    with pytest.raises(CheckpointError, match="model.lm.vocab_size"):
        check_model_matches(back, load_config(STAGE2), tmp_path, weights_only=True)


def test_the_hf_export_declares_the_frame_tokens_the_model_was_trained_with():
    """A video frame has ``model.adapter.n_query`` tokens in training (image_layout.video_block):
    the exported config's ``v_query`` (the HF model's tokens per frame) is that number."""
    from megatron_emu.checkpoint.hf_config import emu2_config
    from megatron_emu.contracts import image_layout

    for preset, n in ((CHAT, 256), (GEN, 64)):
        vision = emu2_config(load_config(preset), "bf16")["vision_config"]
        assert vision["v_query"] == vision["n_query"] == n
        assert image_layout.video_block(1, vision["v_query"]).count(image_layout.VIDEO_SLOT_ID) == n
