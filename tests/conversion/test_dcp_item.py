"""The converter's zero-copy load of a DCP tensor item: the same tensor as torch.load, its data a
view of the mapped bytes, and a crafted item still refused by the weights-only unpickler."""

from __future__ import annotations

import io
import os

import pytest
import torch

from megatron_emu.checkpoint.dcp_item import load_item, map_range
from megatron_emu.checkpoint.safe_pickle import CheckpointFileError


def _archive(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("tensor", [torch.randn(3, 5), torch.arange(7, dtype=torch.bfloat16), torch.zeros(0, 4),
                                    torch.randn(4, 6)[:, 1:3]], ids=["fp32", "bf16", "empty", "strided_view"])
def test_an_item_loads_as_torch_load_does_without_a_copy(tmp_path, tensor):
    data = _archive(tensor)
    path = tmp_path / "__0_0.distcp"
    path.write_bytes(b"x" * 100 + data + b"y" * 10)  # an item somewhere inside a data file
    with open(path, "rb") as f:
        view = map_range(f.fileno(), 100, len(data))
    got = load_item(view, "item")
    expected = torch.load(io.BytesIO(data), weights_only=True)
    assert torch.equal(got, expected) and got.dtype == expected.dtype and got.stride() == expected.stride()
    if got.numel():
        base = torch.frombuffer(view, dtype=torch.uint8)
        assert base.data_ptr() <= got.data_ptr() < base.data_ptr() + len(view)  # a view, not a copy
        got.add_(1)  # writable, copy-on-write: the file is unchanged
    assert path.read_bytes()[100:100 + len(data)] == data


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_item_runs_nothing_and_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "code_ran"
    data = bytearray(_archive({"t": torch.zeros(2), "x": _RunsCode(marker)}))
    with pytest.raises(CheckpointFileError, match="posix.system") as info:
        load_item(memoryview(data), "ckpt/__0_0.distcp (decoder.layers.self_attention.linear_qkv.weight)")
    assert "\n" not in str(info.value) and "__0_0.distcp" in str(info.value)
    assert not marker.exists()
