"""bench/stage_wheels.py: wheels split for 64 MiB transfers come back byte for byte, and a
corrupted or missing part is named, never installed."""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers.tiny import ROOT

sys.path.insert(0, str(ROOT))
from bench import stage_wheels as sw  # noqa: E402


def test_pack_and_assemble_round_trip(tmp_path):
    stage = tmp_path / "stage"
    (stage / "wheels").mkdir(parents=True)
    big = os.urandom(int(2.5 * sw.MiB))
    small = os.urandom(1000)
    (stage / "wheels" / "big-1.0-py3-none-any.whl").write_bytes(big)
    (stage / "wheels" / "small-1.0-py3-none-any.whl").write_bytes(small)
    manifest = sw.pack(stage, part_mib=1, call_mib=2)
    groups = sorted((stage / "send").iterdir())
    assert [len(g) for g in manifest["groups"]] == [2, 2]  # 1 + 1 MiB, then 0.5 MiB + 1000 B
    for g in groups:
        assert sum(p.stat().st_size for p in g.glob("*.part*")) <= 2 * sw.MiB
    out = sw.assemble(groups[0] / "manifest.json", groups, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in out} == {"big-1.0-py3-none-any.whl": big,
                                                    "small-1.0-py3-none-any.whl": small}
    with pytest.raises(SystemExit, match="parts not transferred yet"):
        sw.assemble(groups[0] / "manifest.json", groups[:1], tmp_path / "out2")
    part = next(groups[1].glob("*.part*"))
    data = bytearray(part.read_bytes())
    data[10] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=f"{part.name}: sha256 mismatch"):
        sw.assemble(groups[0] / "manifest.json", groups, tmp_path / "out3")
