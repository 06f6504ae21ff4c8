"""torch DCP's ``FileSystemReader`` without ``pickle.load`` and with checksum verification.

``SafeFileSystemReader`` reads ``.metadata`` once, checks it against the checkpoint's
``checksums.json`` and unpickles it with the allow-list unpickler (``safe_pickle``); before
each stored item is parsed, its bytes are checked against the manifest (and against
truncation). Tensor items are then read by DCP itself with ``torch.load(weights_only=True)``;
byte items (sharded objects) go through the load planner (``mcore_load.SafeLoadPlanner``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from megatron_emu.checkpoint import safe_pickle
from megatron_emu.checkpoint.integrity import Manifest

METADATA = ".metadata"


class SafeFileSystemReader(FileSystemReader):
    def __init__(self, path: str | Path, manifest: Optional[Manifest] = None):
        super().__init__(str(path))
        self.manifest = manifest if manifest is not None else Manifest(path, verify=False)
        self._metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        """The global ``.metadata`` (read and verified once; rank-local metadata files, a DCP
        fallback megatron-core never writes, are not read)."""
        if self._metadata is None:
            data = self.manifest.read_bytes(METADATA)
            metadata = safe_pickle.load_dcp_metadata(data, Path(self.path) / METADATA)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata

    def _slice_file(self, file, sinfo):
        # DCP calls this for every item it reads, right before parsing the item's bytes.
        self.manifest.check_range(sinfo.relative_path, file, sinfo.offset, sinfo.length)
        return super()._slice_file(file, sinfo)
