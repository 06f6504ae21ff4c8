"""Every float of the configuration rejects NaN and infinity, naming the field."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from megatron_emu.cli.train import main as train_main
from megatron_emu.config import schema
from megatron_emu.config.io import load_config
from megatron_emu.config.validate import config_errors
from tests.helpers.tiny import TINY


def _float_fields(cls, prefix="") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
        if dataclasses.is_dataclass(inner):
            out += _float_fields(inner, path + ".")
        elif inner is float:
            out.append(path)
    return out


FLOATS = _float_fields(schema.EmuConfig)


def test_the_schema_has_the_floats_we_expect():
    assert {"train.lr", "train.clip_grad", "train.module_lr.lm", "model.loss.reg_weight",
            "parallel.collective_timeout_s", "train.exit_duration_mins"} <= set(FLOATS)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", FLOATS)
def test_non_finite_floats_are_refused(key, value):
    errors = config_errors(load_config(TINY, [f"{key}={value}"]))
    assert errors == [f"{key}: must be a finite number, got {float(yaml.safe_load(value))}"], errors


def test_the_cli_reports_a_nan_learning_rate_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    preset = yaml.safe_load(TINY.read_text())
    preset["train"]["lr"] = float("nan")
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(preset))
    assert train_main(["--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: must be a finite number, got nan" in err and "Traceback" not in err
