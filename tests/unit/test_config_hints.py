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
