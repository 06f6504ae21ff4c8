"""Hostile and damaged checkpoint files: nothing crafted runs, a flipped byte is caught, every
reader (resume, checkpoint.load, the converter, generation) says which file in one line."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from megatron_emu.checkpoint import integrity
from megatron_emu.checkpoint.safe_pickle import read_dcp_metadata
from tests.helpers.dist import run_ranks
from tests.helpers.training import tiny_args, train


class _Crafted:
    """What a crafted pickle holds: unpickling it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def saved(train_data, tmp_path_factory):
    """A one-step TP1 PP1 checkpoint; tests work on copies."""
    data, tok = train_data
    root = tmp_path_factory.mktemp("saved")
    assert train(1, tiny_args(data, tok, root / "run", root / "ckpt", "train.train_iters=1", tp=1, pp=1)) == [0]
    return root / "ckpt"


def _copy(saved: Path, tmp_path: Path) -> tuple[Path, Path]:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)
    return ckpt, ckpt / "iter_0000001"


def _reseal(it: Path, metadata) -> None:
    """checksums.json for the directory as it now is (whoever crafts a checkpoint can do this)."""
    files = integrity.checkpoint_files(it)
    integrity.write(it, integrity.hash_files(it, files, integrity.dcp_ranges(metadata)))


def _craft(it: Path, which: str, marker: Path) -> None:
    metadata = read_dcp_metadata(it / ".metadata")
    if which == ".metadata":
        (it / ".metadata").write_bytes(pickle.dumps(_Crafted(marker)))
    elif which == "common.pt":
        torch.save({"x": _Crafted(marker)}, it / "common.pt")
    else:  # the RNG state: a sharded object stored as bytes inside a .distcp file
        index = next(k for k in metadata.storage_data if k.fqn.startswith("rng_state"))
        info = metadata.storage_data[index]
        buf = io.BytesIO()
        torch.save([_Crafted(marker)], buf)
        data_file = it / info.relative_path
        offset = data_file.stat().st_size
        with open(data_file, "ab") as f:
            f.write(buf.getvalue())
        metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(buf.getvalue()))
        with open(it / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
    _reseal(it, metadata)


def _status(run: Path) -> dict:
    return json.loads((run / "exit_status.json").read_text())


def _one_line(text: str) -> str:
    text = text.strip()
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("which", [".metadata", "common.pt", "rng_state"])
def test_crafted_pickles_run_nothing_at_resume(saved, train_data, tmp_path, monkeypatch, capfd, which):
    # torch.load's weights_only default can be switched off from the environment: ours cannot.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ckpt, it = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    _craft(it, which, marker)
    data, tok = train_data
    assert train(1, tiny_args(data, tok, tmp_path / "run", ckpt, "train.train_iters=1", tp=1, pp=1)) == [1]
    assert not marker.exists(), "the checkpoint ran code"
    reason = _status(tmp_path / "run")["reason"]
    assert "refused" in reason and str(it) in reason, reason
    assert "Traceback" not in capfd.readouterr().err


def test_crafted_metadata_runs_nothing_at_convert_and_generate(saved, tmp_path, capsys):
    from megatron_emu.cli.convert import main as convert
    from megatron_emu.cli.generate import main as generate

    ckpt, it = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    _craft(it, ".metadata", marker)
    assert convert(["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--no-progress"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(it / ".metadata") in err and "refused" in err
    assert generate(["--ckpt", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "1"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(it / ".metadata") in err and "refused" in err
    assert not marker.exists() and not (tmp_path / "hf").exists()


def _flip_a_weight_byte(it: Path) -> str:
    metadata = read_dcp_metadata(it / ".metadata")
    index = next(k for k in metadata.storage_data if k.fqn == "decoder.layers.mlp.linear_fc1.weight")
    info = metadata.storage_data[index]
    with open(it / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    return info.relative_path


def test_a_flipped_byte_is_detected_on_resume(saved, train_data, tmp_path, capfd):
    ckpt, it = _copy(saved, tmp_path)
    name = _flip_a_weight_byte(it)
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", ckpt, "train.train_iters=1", tp=1, pp=1)
    assert train(1, args) == [1]
    reason = _status(tmp_path / "run")["reason"]
    assert str(it / name) in reason and "checksum mismatch" in reason, reason
    assert "Traceback" not in capfd.readouterr().err
    # checkpoint.verify=false loads it anyway (the user's call).
    assert train(1, args + ["--set", "checkpoint.verify=false"]) == [0]


def test_a_flipped_byte_is_detected_by_every_other_reader(saved, train_data, tmp_path, capsys):
    from megatron_emu.cli.convert import main as convert
    from megatron_emu.cli.generate import main as generate

    ckpt, it = _copy(saved, tmp_path)
    name = _flip_a_weight_byte(it)
    assert convert(["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--no-progress"]) == 2
    assert str(it / name) in _one_line(capsys.readouterr().err)
    assert generate(["--ckpt", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "1"]) == 2
    assert str(it / name) in _one_line(capsys.readouterr().err)
    data, tok = train_data
    args = tiny_args(data, tok, tmp_path / "run", tmp_path / "new", f"checkpoint.load={ckpt}",
                     "train.train_iters=1", tp=1, pp=1)
    assert train(1, args) == [1]
    assert str(it / name) in _status(tmp_path / "run")["reason"]


def test_a_checkpoint_without_checksums_loads_with_one_log_line(saved, tmp_path, caplog, tokenizer_dir):
    from megatron_emu.checkpoint.convert import mcore_to_hf

    ckpt, it = _copy(saved, tmp_path)
    (it / integrity.MANIFEST).unlink()
    with caplog.at_level(logging.INFO, logger="megatron_emu"):
        mcore_to_hf(ckpt, tmp_path / "hf", progress=False, tokenizer=str(tokenizer_dir))
    notes = [r for r in caplog.records if "without checksum verification" in r.getMessage()]
    assert len(notes) == 1 and str(it) in notes[0].getMessage()
    assert (tmp_path / "hf" / "config.json").is_file()


def test_every_saved_file_is_listed_and_verifies(saved):
    it = saved / "iter_0000001"
    manifest = integrity.Manifest(it)
    assert sorted(manifest.files) == integrity.checkpoint_files(it)
    for name, entry in manifest.files.items():
        assert sum(length for _, length, _ in entry["blocks"]) == entry["size"] == (it / name).stat().st_size
        with open(it / name, "rb") as f:
            manifest.check_range(name, f, 0, entry["size"])


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_file_is_named_even_without_checksums(saved, train_data, tmp_path, capfd, damage):
    """An older checkpoint (no checksums.json) whose data file lost its tail, or that lost its
    common.pt: one line naming the file."""
    ckpt, it = _copy(saved, tmp_path)
    (it / integrity.MANIFEST).unlink()
    if damage == "truncated":
        victim = it / "__0_0.distcp"
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    else:
        victim = it / "common.pt"
        victim.unlink()
    data, tok = train_data
    assert train(1, tiny_args(data, tok, tmp_path / "run", ckpt, "train.train_iters=1", tp=1, pp=1)) == [1]
    reason = _status(tmp_path / "run")["reason"]
    assert str(victim) in reason and ("truncated" in reason or "does not exist" in reason), reason
    assert "Traceback" not in capfd.readouterr().err


def _save_recording_syncs(rank: int, argv: list[str]) -> list:
    """One training run that records, in order, every fsync (by path) and rename."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, **kw)

    os.fsync, os.replace = fsync, replace  # this forked rank only; the real calls still run
    try:
        from megatron_emu.cli.train import main

        assert main(argv) == 0
    finally:
        os.fsync, os.replace = real_fsync, real_replace
    return events


def test_a_save_is_durable_before_it_is_published(train_data, tmp_path):
    data, tok = train_data
    ckpt = tmp_path / "ckpt"
    (events,) = run_ranks(1, _save_recording_syncs,
                          tiny_args(data, tok, tmp_path / "run", ckpt, "train.train_iters=1", tp=1, pp=1))
    final, tmp = ckpt / "iter_0000001", ckpt / "iter_0000001.tmp"
    publish = events.index(("replace", str(tmp), str(final)))
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    for name in integrity.checkpoint_files(final) + [integrity.MANIFEST]:
        # the file itself, or the temporary it was written as (renamed before the directory's fsync)
        assert {str(tmp / name), str(tmp / f".{name}.tmp")} & synced_before, name
    assert events[publish - 1] == ("fsync", str(tmp)), "the directory itself, last"
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(ckpt / "latest"))
    between = [e[1] for e in events[publish:latest] if e[0] == "fsync"]
    assert str(ckpt) in between and str(ckpt / ".latest.tmp") in between
    assert ("fsync", str(ckpt)) in events[latest:]
