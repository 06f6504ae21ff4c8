"""``dist_checkpointing.load`` through load strategies that unpickle nothing outside an allow-list
and verify every file against the checkpoint's ``checksums.json``.

megatron-core's ``torch_dist`` strategies read ``.metadata`` with ``pickle.load`` (torch DCP's
``FileSystemReader``) and sharded objects with ``torch.load(weights_only=False)`` (DCP's
``DefaultLoadPlanner.load_bytes``). ``SafeTorchDistLoadStrategy`` is megatron-core's strategy
with the reader replaced by ``dcp_reader.SafeFileSystemReader`` and the planner by
``SafeLoadPlanner``; ``SafeCommonLoadStrategy`` reads ``common.pt`` (and object files of other
backends) with ``torch.load(weights_only=True)``. They are passed to ``dist_checkpointing.load``
explicitly: nothing in megatron-core or torch is patched. ``load`` turns any refusal into one
``CheckpointFileError`` line naming the file, on every rank (DCP gathers the failures of a
collective read onto all ranks).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional

from megatron.core.dist_checkpointing import ShardedObject, dict_utils
from megatron.core.dist_checkpointing.mapping import CheckpointingException, ShardedTensor
from megatron.core.dist_checkpointing.strategies import torch as mtorch
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.api import CheckpointException

from megatron_emu.checkpoint import safe_pickle
from megatron_emu.checkpoint.dcp_reader import SafeFileSystemReader
from megatron_emu.checkpoint.integrity import Manifest
from megatron_emu.contracts.checkpoint_format import CheckpointFileError

CONFIG_FILE = "metadata.json"  # megatron-core's backend description (JSON)


class SafeLoadPlanner(mtorch.MCoreLoadPlanner):
    """Byte items (sharded objects such as the RNG state) via ``torch.load(weights_only=True)``."""

    def __init__(self, *args, checkpoint_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = checkpoint_dir

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        info = self.metadata.storage_data.get(read_item.storage_index) if self.metadata else None
        where = f"{self.checkpoint_dir / info.relative_path if info else self.checkpoint_dir} (object {fqn})"
        obj = safe_pickle.torch_load(value, where)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeTorchDistLoadStrategy(mtorch.TorchDistLoadShardedStrategy):
    def __init__(self, manifest: Manifest):
        super().__init__()
        self.manifest = manifest
        self._readers: dict[str, SafeFileSystemReader] = {}

    def reader(self, checkpoint_dir) -> SafeFileSystemReader:
        key = str(checkpoint_dir)
        if key not in self._readers:  # one read (and check) of .metadata per load
            self._readers[key] = SafeFileSystemReader(checkpoint_dir, self.manifest)
        return self._readers[key]

    def load(self, sharded_state_dict, checkpoint_dir):
        """megatron-core's ``TorchDistLoadShardedStrategy.load`` with the safe reader and planner."""
        flexible = [t for t in dict_utils.nested_values(sharded_state_dict)
                    if isinstance(t, ShardedTensor) and not t.allow_shape_mismatch]
        mismatch_ok = {t.key: t for t in dict_utils.nested_values(sharded_state_dict)
                       if isinstance(t, ShardedTensor) and t.allow_shape_mismatch}
        original = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = mtorch._replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict)
        pyt_state_dict = mtorch.mcore_to_pyt_state_dict(sharded_state_dict, True)
        reader = self.reader(checkpoint_dir)
        reader.read_metadata()  # here, not inside DCP (which logs a traceback and retries rank files)
        dcp.load_state_dict(pyt_state_dict, reader, planner=SafeLoadPlanner(
            shapes_validation_sharded_tensors=flexible, allow_shape_mismatch_sharded_tensors=mismatch_ok,
            checkpoint_dir=Path(checkpoint_dir)))
        self.cached_global_metadata = reader.read_metadata()
        state = {k: mtorch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        state = mtorch._replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
        mtorch._restore_dict_types(state, original)
        return state

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        return super().load_tensors_metadata(checkpoint_dir, metadata or self.reader(checkpoint_dir).read_metadata())

    def load_sharded_metadata(self, checkpoint_dir):
        metadata = self.reader(checkpoint_dir).read_metadata()
        out = {}
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):
                obj = ShardedObject.empty_from_unique_key(key)
                out[obj.unique_key] = obj
        out.update(self.load_tensors_metadata(checkpoint_dir, metadata))
        return out


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` and per-object ``.pt`` files: verified, then ``weights_only``."""

    def __init__(self, manifest: Manifest):
        super().__init__()
        self.manifest = manifest

    def _load(self, checkpoint_dir, name: str):
        path = Path(checkpoint_dir) / name
        if not path.is_file():
            raise CheckpointingException(f"{path} does not exist")
        return safe_pickle.torch_load(io.BytesIO(self.manifest.read_bytes(name)), path)

    def load_common(self, checkpoint_dir):
        return self._load(checkpoint_dir, COMMON_STATE_FNAME)

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        def one(sh_obj):
            return self._load(checkpoint_dir, f"{sh_obj.unique_key}.pt")

        return dict_utils.dict_list_map_inplace(one, sharded_objects_state_dict)


def _first_failure(e: CheckpointException, checkpoint_dir) -> Exception:
    """The error a user can act on among the per-rank failures DCP gathered."""
    errors = [exc for exc, _ in e.failures.values()]
    for exc in errors:
        if isinstance(exc, CheckpointFileError):
            return exc
    first = errors[0] if errors else e
    text = str(first).splitlines()[0] if str(first) else type(first).__name__
    return CheckpointFileError(f"{checkpoint_dir}: cannot be loaded ({type(first).__name__}: {text})")


def load(sharded_state_dict, checkpoint_dir: str | Path, *, verify: bool = True,
         manifest: Optional[Manifest] = None, **kwargs):
    """``dist_checkpointing.load`` with the safe strategies (``kwargs``: e.g. ``strict``)."""
    from megatron.core import dist_checkpointing

    checkpoint_dir = Path(checkpoint_dir)
    manifest = manifest or Manifest(checkpoint_dir, verify=verify)
    if (checkpoint_dir / CONFIG_FILE).is_file():  # megatron-core parses it itself (JSON)
        manifest.read_bytes(CONFIG_FILE)
    try:
        return dist_checkpointing.load(sharded_state_dict, os.fspath(checkpoint_dir),
                                       sharded_strategy=SafeTorchDistLoadStrategy(manifest),
                                       common_strategy=SafeCommonLoadStrategy(manifest), **kwargs)
    except CheckpointException as e:
        raise _first_failure(e, checkpoint_dir) from None
    except CheckpointingException as e:  # megatron-core's own checks (missing files, bad metadata.json)
        raise CheckpointFileError(f"{checkpoint_dir}: cannot be loaded ({str(e).splitlines()[0]}); restore the "
                                  f"file from a copy or resume from an earlier iteration") from None
