"""Crafted safetensors inputs are refused as the format requires, with one line at the CLI."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from megatron_emu.checkpoint.hf_reader import HFReader
from megatron_emu.checkpoint.safetensors_io import SafetensorsError, read_header
from tests.helpers.tiny import TINY


def _write(path, header: dict, data: bytes, header_len=None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def _two_tensors(a_offsets, b_offsets, data_len=32, a_shape=(2, 2), b_shape=(2, 2), dtype="F32") -> tuple:
    header = {"a": {"dtype": dtype, "shape": list(a_shape), "data_offsets": list(a_offsets)},
              "b": {"dtype": dtype, "shape": list(b_shape), "data_offsets": list(b_offsets)}}
    return header, bytes(range(data_len))


def test_a_valid_file_from_the_safetensors_library_is_accepted(tmp_path):
    from safetensors.torch import save_file

    tensors = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "empty": torch.zeros(0, 4),
               "y": torch.ones(3, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    reader = HFReader(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(reader.get(name), t), name


@pytest.mark.parametrize("header, data, match", [
    # A negative offset would read the JSON header as weights.
    pytest.param(*_two_tensors((-16, 0), (0, 16)), "outside the data section", id="negative_offset"),
    pytest.param(*_two_tensors((0, 16), (8, 24), data_len=24), "overlap", id="overlap"),
    pytest.param(*_two_tensors((0, 16), (20, 36), data_len=36), "overlap or leave a hole", id="hole"),
    pytest.param(*_two_tensors((0, 16), (16, 32), data_len=40), "cover 32 of the 40", id="trailing_bytes"),
    pytest.param(*_two_tensors((0, 16), (16, 48), data_len=32), "outside the data section", id="past_the_end"),
    pytest.param(*_two_tensors((0, 16), (16, 32), b_shape=(2, 3)), "need 24", id="size_not_numel"),
    pytest.param(*_two_tensors((0, 16), (16, 32), b_shape=(-2, -2)), "invalid shape", id="negative_shape"),
    pytest.param(*_two_tensors((0, 16), (16, 32), b_shape=(2, 2.0)), "invalid shape", id="float_shape"),
    pytest.param(*_two_tensors((0, 16), (16, 32), dtype="F13"), "unknown dtype", id="unknown_dtype"),
    pytest.param({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}, b"\0" * 4,
                 "exactly dtype", id="extra_field"),
    pytest.param([1, 2, 3], b"", "not a JSON object", id="not_an_object"),
    pytest.param({"__metadata__": {"format": 1}}, b"", "__metadata__", id="bad_metadata"),
])
def test_crafted_headers_are_refused(tmp_path, header, data, match):
    path = tmp_path / "model.safetensors"
    _write(path, header, data)
    with pytest.raises(SafetensorsError, match=match) as info:
        HFReader(tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_and_oversized_headers_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x10\x00")
    with pytest.raises(SafetensorsError, match="truncated"):
        read_header(path)
    _write(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, header_len=10**6)
    with pytest.raises(SafetensorsError, match="truncated"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(SafetensorsError, match="limit"):
        read_header(path)


def test_an_index_cannot_point_outside_its_directory(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(SafetensorsError, match="file names"):
        HFReader(tmp_path)


@pytest.mark.parametrize("case", ["truncated", "huge_header", "negative_shape"])
def test_converter_cli_reports_reader_errors_in_one_line(tmp_path, capsys, case):
    from megatron_emu.cli.convert import main

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text("{}")
    path = llama / "model.safetensors"
    if case == "truncated":
        _write(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    elif case == "huge_header":
        path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    else:
        _write(path, {"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16)
    code = main(["hf-to-mcore", "--llama", str(llama), "--config", str(TINY), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err
    assert not (tmp_path / "out").exists()
