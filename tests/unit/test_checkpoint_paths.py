"""A checkpoint names only files in its own directory: a crafted ``.metadata`` or ``latest``
that points elsewhere (``../``, an absolute path) is refused in one line, before any read."""

from __future__ import annotations

import pickle

import pytest
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

from megatron_emu.contracts.checkpoint_format import resolve
from megatron_emu.checkpoint.safe_pickle import CheckpointFileError, load_dcp_metadata


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/__0_0.distcp", ".hidden", ""])
def test_metadata_naming_a_file_elsewhere_is_refused(name, tmp_path):
    md = Metadata(state_dict_metadata={},
                  storage_data={MetadataIndex("w", (0,)): _StorageInfo(relative_path=name, offset=0, length=4)})
    with pytest.raises(CheckpointFileError, match="outside its directory"):
        load_dcp_metadata(pickle.dumps(md), tmp_path / ".metadata")
    ok = Metadata(state_dict_metadata={},
                  storage_data={MetadataIndex("w", (0,)): _StorageInfo("__0_0.distcp", 0, 4)})
    assert load_dcp_metadata(pickle.dumps(ok), tmp_path / ".metadata").storage_data


@pytest.mark.parametrize("text", ["../elsewhere", "/abs/iter_0000002", "iter_2", "iter_0000002/.."])
def test_latest_pointing_elsewhere_is_refused(text, tmp_path):
    (tmp_path / "latest").write_text(text + "\n")
    with pytest.raises(CheckpointFileError, match="not an iter_NNNNNNN name"):
        resolve(tmp_path)
