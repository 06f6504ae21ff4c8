"""The training CLI's config handling (``--set``, ``--dry-run``, the import order), freeze and
data-path rules, and the paper's stage presets (the rest of the config tests: test_config.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_emu.cli.train import main as train_main
from megatron_emu.config.io import ConfigError, load_config
from megatron_emu.config.validate import config_errors

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples/configs/emu2_tiny.yaml"
BIG = REPO / "examples/configs/emu2_37b.yaml"
TINY_WORLD = 4  # TP2 x PP2 x DP1


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def no_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("bad, key", [
    ("train.lr=abc", "train.lr"),
    ("train.nope=1", "train.nope"),
    ("parallel.tensor_model_parallel_size=3", "parallel.tensor_model_parallel_size"),
])
def test_cli_bad_set_returns_2(no_world, capsys, bad, key):
    assert train_main(["--config", str(TINY), "--set", bad, "--dry-run"]) == 2
    out = capsys.readouterr()
    assert key in out.err and out.out == ""


def test_cli_missing_config_returns_2(no_world, capsys, tmp_path):
    assert train_main(["--config", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize("preset", [TINY, BIG], ids=["tiny", "37b"])
def test_cli_dry_run(no_world, capsys, preset):
    assert train_main(["--config", str(preset), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "total parameters" in out and ("GiB" in out or "MiB" in out)


@pytest.mark.parametrize("preset", [TINY, BIG], ids=["tiny", "37b"])
def test_cli_dry_run_json(no_world, capsys, preset):
    assert train_main(["--config", str(preset), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    pp = load_config(preset).parallel.pipeline_model_parallel_size
    assert isinstance(report["total_params"], int) and report["total_params"] > 0
    assert len(report["params_per_stage"]) == pp
    assert sum(report["params_per_stage"]) == report["total_params"]
    assert sum(report["params_per_component"].values()) == report["total_params"]
    assert report["memory_gib_per_gpu"] > 0


def test_cli_dry_run_37b_parameter_counts(no_world, capsys):
    assert train_main(["--config", str(BIG), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    vocab_padding = 2 * (32384 - 32272) * 6656  # embedding + LM head rows beyond 32272
    inv_freq = 60 * 64  # rotary buffers stored in the HF checkpoint, not parameters
    assert report["total_params"] - vocab_padding == 36_906_627_840 == 36_906_631_680 - inv_freq
    comp = report["params_per_component"]
    assert comp["vision"] == 4_350_208_256
    assert comp["adapter"] + comp["regression_head"] == 23_855_104
    assert report["lm_layers_per_stage"] == [4] + [8] * 7


def test_cli_rejects_config_error_before_importing_megatron():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "megatron_emu.train", "--config", str(TINY),
         "--set", "parallel.tensor_model_parallel_size=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "parallel.tensor_model_parallel_size" in proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    heavy = {m for m in imported if m.split(".")[0] in ("megatron", "torch", "transformer_engine")}
    assert not heavy, sorted(heavy)


@pytest.mark.parametrize("pattern, fragment", [
    ("vison.*", "matches no parameter"),
    ("decoder.layers.3.*", "local to a pipeline stage"),
])
def test_freeze_patterns_are_checked(pattern, fragment):
    errors = config_errors(load_config(TINY, [f"train.freeze=['{pattern}']"]), world_size=TINY_WORLD)
    assert len(errors) == 1 and "train.freeze[0]" in errors[0] and fragment in errors[0], errors
    assert config_errors(load_config(TINY, ["train.freeze=['vision.*', 'heads.project_down.*']"]),
                         world_size=TINY_WORLD) == []


def test_data_path_accepts_one_directory_or_a_blend():
    assert load_config(TINY, ["data.path=/d/laion"]).data.path == ["/d/laion"]
    assert load_config(TINY, ["data.path=['3:/d/a', '1:/d/b']"]).data.path == ["3:/d/a", "1:/d/b"]
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["data.decoder=turbo"])
    assert any("data.decoder" in e for e in info.value.errors)


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_presets_follow_the_paper_and_fit_the_recommended_cluster(stage):
    from dataclasses import replace

    from megatron_emu.planner import plan
    from megatron_emu.training.build import plan_spec

    cfg = load_config(BIG.parent / f"emu2_37b_stage{stage}.yaml")
    assert config_errors(cfg, world_size=256) == []  # 32 nodes x 8 GPUs
    big = load_config(BIG)
    assert replace(cfg.model, loss=big.model.loss) == big.model  # the same Emu2-37B
    tr = cfg.train
    assert (tr.adam_beta1, tr.adam_beta2, tr.adam_eps, tr.clip_grad) == (0.9, 0.95, 1e-6, 5.0)
    if stage == 1:
        assert cfg.model.loss.reg_weight == 0.0 and tr.freeze == []
        assert (tr.module_lr.adapter, tr.module_lr.lm, tr.module_lr.vision) == (1e-4, 3e-5, 5e-5)
        assert tr.lr_warmup_fraction == 0.02 and cfg.data.pair_image_first_prob == 1.0
    else:
        assert cfg.model.loss.reg_weight == 1.0 and tr.freeze == ["vision.*"]
        assert tr.lr == 1e-5 and tr.lr_warmup_fraction == 0.1 and cfg.data.pair_image_first_prob == 0.5
    report = plan(plan_spec(cfg))
    assert report["memory_gib_per_gpu"] < 80 * 0.9, report["memory_per_stage"]
