"""What the config tells a user who got something wrong: the likely intended key, and the
settings training cannot run without, before any process starts."""

from __future__ import annotations

import pytest

from megatron_emu.config.io import ConfigError, load_config
from megatron_emu.config.validate import data_path_errors
from tests.unit.test_config import TINY, tiny_dict, write_yaml


@pytest.mark.parametrize("typo,intended", [("train.lrr", "train.lr"), ("trian.lr", "train.lr"),
                                           ("model.lm.num_layer", "model.lm.num_layers"),
                                           ("data.tokeniser", "data.tokenizer"),
                                           ("model.attention_backed", "model.attention_backend")])
def test_set_typo_names_the_intended_key(typo, intended):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [f"{typo}=1"])
    assert f"did you mean `{intended}`?" in str(info.value)


def test_yaml_typo_names_the_intended_key(tmp_path):
    data = tiny_dict()
    data["train"]["lrr"] = data["train"].pop("lr")
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, data))
    assert "train.lrr: unknown key (did you mean `train.lr`?)" in str(info.value)


def test_far_off_key_gets_no_guess():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["train.qqqqqq=1"])
    assert "did you mean" not in str(info.value)


def test_training_requires_a_tokenizer(train_data):
    data, tok = train_data
    cfg = load_config(TINY, [f"data.path={data!r}"])
    assert cfg.data.tokenizer is None
    assert any(e.startswith("data.tokenizer: required for training") for e in data_path_errors(cfg))
    cfg = load_config(TINY, [f"data.path={data!r}", f"data.tokenizer={tok}"])
    assert data_path_errors(cfg) == []


def test_sizes_print_in_adaptive_units():
    from megatron_emu.utils import units

    assert [units.count(n) for n in (950, 12_345, 2_264_640, 1.67e9, 36.9e9)] == \
        ["950", "12.3 K", "2.26 M", "1.67 B", "36.9 B"]
    assert [units.size_gib(g) for g in (0.5 / 2**20, 37.2 / 1024, 1010 / 1024, 91.24)] == \
        ["512 B", "37.2 MiB", "1010 MiB", "91.2 GiB"]
    assert [units.duration(s) for s in (4.21, 75, 3725, 200_000)] == ["4.2s", "1m15s", "1h02m", "2d07h"]


def test_tiny_plan_prints_no_zero_sizes(capsys):
    from megatron_emu.cli.train import main

    assert main(["--config", str(TINY), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0.00 B" not in out and " 0.0 " not in out and "MiB" in out and "(4.42 M)" in out


def test_the_validator_and_the_loader_read_a_blend_alike(train_data):
    from megatron_emu.config.validate import config_errors
    from megatron_emu.data.loader import parse_paths

    data, tok = train_data
    directory = data[0].split(":", 1)[1]
    entries = [f"1e-1:{directory}", f"2.5:{directory}", directory]
    assert parse_paths(entries) == [(0.1, directory), (2.5, directory), (1.0, directory)]
    cfg = load_config(TINY, [f"data.path={entries!r}", f"data.tokenizer={tok}"])
    assert data_path_errors(cfg) == [] and not [e for e in config_errors(cfg) if "data.path" in e]
    bad = load_config(TINY, [f"data.path=['0:{directory}', '-1:{directory}']"])
    assert sum("WEIGHT > 0" in e for e in config_errors(bad)) == 2
