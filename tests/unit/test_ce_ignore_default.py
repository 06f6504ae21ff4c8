"""The cross-entropy ignore set: labels at [PAD], [IMG], [/IMG] and <image> are excluded
(emu2_spec.md §2, Emu1 lineage). The layout tests' reference uses these ids as fixed numbers,
so this file pins what the configuration gives."""

from __future__ import annotations

from pathlib import Path

import yaml

from megatron_emu.config.io import from_dict, load_config
from megatron_emu.config.schema import LossConfig
from megatron_emu.contracts import vocab as special_tokens

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
EXPECTED = ["[PAD]", "[IMG]", "[/IMG]", "<image>"]


def test_default_ce_ignore_set_is_pad_and_the_image_tokens():
    """The schema default, a config that leaves the key out, and every shipped preset."""
    assert LossConfig().ce_ignore_tokens == EXPECTED
    data = yaml.safe_load((CONFIGS / "emu2_tiny.yaml").read_text())
    del data["model"]["loss"]["ce_ignore_tokens"]
    assert from_dict(data).model.loss.ce_ignore_tokens == EXPECTED
    presets = sorted(CONFIGS.glob("emu2_*.yaml"))
    assert len(presets) >= 4
    for preset in presets:
        assert load_config(preset).model.loss.ce_ignore_tokens == EXPECTED, preset.name
    assert [special_tokens.token_id(t) for t in EXPECTED] == [32000, 32001, 32002, 32003]
