"""The preprocess output directory: another dataset is not overwritten without --overwrite, an
edited input is redone, temporary files never outlive a run, and a dataset that is not complete
is marked so and refused by the loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_tools.cli import main as data_cli
from megatron_emu.data import shard_format as sf
from tests.helpers.datasets import IMAGE_SIZE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def inputs(samples, tmp_path):
    """Two JSONL inputs (the sample documents split in halves) and the arguments to preprocess them."""
    lines = (samples / "jsonl" / "docs.jsonl").read_text().splitlines()
    half = len(lines) // 2
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines[:half]) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(lines[half:]) + "\n")
    return tmp_path / "in"


def run_args(samples, inputs, tokenizer_dir, out, *extra) -> list[str]:
    return ["preprocess", "--format", "jsonl", "--input", str(inputs / "a.jsonl"), str(inputs / "b.jsonl"),
            "--images", str(samples / "jsonl"), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--shard-size", "2", "--workers", "1", "--no-progress", *extra]


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def texts(directory: Path) -> list[str]:
    meta, index = sf.load_index(directory)
    out = []
    for row in index:
        members = sf.read_span(directory / meta["shards"][int(row[sf.COL_SHARD])], int(row[sf.COL_OFFSET]),
                               int(row[sf.COL_SIZE]))
        doc = sf.decode_document("k", members, keep_text=True)
        out += [v[0] for k, v in doc.segments if k == "text"]
    return out


def test_out_holding_another_dataset_is_refused(samples, inputs, tokenizer_dir, datasets, tmp_path, capsys):
    out = tmp_path / "out"
    assert data_cli(run_args(samples, inputs, tokenizer_dir, out)) == 0
    before = snapshot(out)
    capsys.readouterr()
    mmc4 = ["preprocess", "--format", "mmc4", "--input", str(samples / "mmc4" / "docs.jsonl"), "--images",
            str(samples / "mmc4" / "images"), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--no-progress"]
    assert data_cli(mmc4) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"--out {out} holds another dataset" in err and "--overwrite" in err
    assert snapshot(out) == before  # nothing touched
    # Another input file with the same options is another dataset too.
    other = ["preprocess", "--format", "jsonl", "--input", str(inputs / "a.jsonl"), "--images",
             str(samples / "jsonl"), "--tokenizer", str(tokenizer_dir), "--out", str(out),
             "--image-size", str(IMAGE_SIZE), "--shard-size", "2", "--no-progress"]
    (inputs / "a.jsonl").rename(inputs / "c.jsonl")
    other[4] = str(inputs / "c.jsonl")
    assert data_cli(other) == 2 and "not an input of this run" in capsys.readouterr().err
    assert snapshot(out) == before
    # --overwrite replaces it, and no shard of the old dataset is left.
    assert data_cli([*mmc4, "--overwrite"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["source_format"] == "mmc4"
    assert sorted(p.name for p in out.glob("shard-*.tar")) == meta["shards"]
    assert texts(out) == texts(datasets["mmc4"][0])


def test_rerun_of_the_same_dataset_is_not_refused(samples, inputs, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    assert data_cli(run_args(samples, inputs, tokenizer_dir, out)) == 0
    before = snapshot(out)
    assert data_cli(run_args(samples, inputs, tokenizer_dir, out)) == 0
    assert snapshot(out) == before


def test_an_edited_input_is_reprocessed(samples, inputs, tokenizer_dir, tmp_path, caplog):
    out = tmp_path / "out"
    assert data_cli(run_args(samples, inputs, tokenizer_dir, out)) == 0
    first = texts(out)
    records = {p.name: json.loads(p.read_text()) for p in out.glob("shard-*.json")}
    a_shards = sorted(n for n, r in records.items() if r["unit"]["path"].endswith("a.jsonl"))
    b_mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar") if
                records[p.name.replace(".tar", ".json")]["unit"]["path"].endswith("b.jsonl")}
    assert a_shards and b_mtimes
    # Same length, other text: only size and mtime could tell (the record keeps both).
    a = inputs / "a.jsonl"
    text = a.read_text()
    old = json.loads(text.splitlines()[0])["segments"][-1]["text"]
    new = old[::-1]
    a.write_text(text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1], 1))
    assert a.stat().st_size == len(text.encode())
    caplog.set_level("INFO", logger="megatron_emu")
    assert data_cli(run_args(samples, inputs, tokenizer_dir, out)) == 0
    second = texts(out)
    joined, before = "\n".join(second), "\n".join(first)
    assert new in joined and joined.count(old) == before.count(old) - 1 and len(second) == len(first)
    assert f"{len(a_shards)} to process" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar") if p.name in b_mtimes} == b_mtimes


FULL_DISK = textwrap.dedent("""
    import json, os, resource, subprocess, sys
    out, mode, argv = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    os.makedirs(out, exist_ok=True)
    if mode == "tmpfs":  # a real 64 KiB filesystem (in a private mount namespace)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", out], check=True)
    else:  # no namespace here: files over 64 KiB fail to write (EFBIG), as a full disk would
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    from data_tools.cli import main
    rc = main(argv)
    print("RESULT " + json.dumps({"rc": rc, "files": sorted(os.listdir(out))}))
""")


def _tiny_filesystem() -> list[str] | None:
    """``unshare`` arguments for a private mount namespace, when this machine allows one."""
    cmd = ["unshare", "--user", "--map-root-user", "--mount"]
    try:
        ok = subprocess.run([*cmd, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return cmd if ok else None


@pytest.mark.parametrize("workers", [1, 3])
def test_a_full_disk_leaves_no_temporary_files(workers, samples, inputs, tokenizer_dir, tmp_path):
    """One unit outgrows the filesystem (1 worker), or three workers write at once and the first
    failure stops the others mid-write (their files are removed too)."""
    out = tmp_path / "out"
    argv = run_args(samples, inputs, tokenizer_dir, out)
    argv[argv.index("--shard-size") + 1] = "100" if workers == 1 else "3"
    argv[argv.index("--workers") + 1] = str(workers)
    unshare = _tiny_filesystem()
    cmd = [*(unshare or []), sys.executable, "-c", FULL_DISK, str(out), "tmpfs" if unshare else "fsize",
           json.dumps(argv)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["rc"] == 2, proc.stderr
    error = [x for x in proc.stderr.splitlines() if "megatron-emu-data preprocess: error" in x]
    assert len(error) == 1 and ("No space left" in error[0] or "File too large" in error[0]), proc.stderr
    assert "shard-0000" in error[0] and ".tar" in error[0]  # names the file
    assert not [f for f in result["files"] if f.endswith((".tmp", ".tmp.npy"))], result["files"]


def test_temporary_files_of_a_killed_run_are_removed(samples, inputs, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    left = [".shard-000001.tar.4242.tmp", ".shard-000001.json.4242.tmp", ".index.npy.4242.tmp.npy",
            ".dataset.json.4242.tmp", ".summary.json.4242.tmp"]
    for name in left:  # what a SIGKILLed run leaves (outdir.temp_path)
        (out / name).write_bytes(b"partial")
    assert data_cli(run_args(samples, inputs, tokenizer_dir, out)) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_array_task_of_another_unit_keeps_others_temporary_files(samples, inputs, tokenizer_dir, tmp_path):
    """An array task removes only the leftovers of its own units: another task may be writing."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".shard-000001.tar.4242.tmp").write_bytes(b"task 1 is writing this")
    (out / ".shard-000002.tar.4242.tmp").write_bytes(b"left by task 0")
    assert data_cli([*run_args(samples, inputs, tokenizer_dir, out), "--num-tasks", "2", "--task-index", "0"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".shard-000001.tar.4242.tmp"]


def test_an_incomplete_dataset_is_marked_and_refused(samples, inputs, tokenizer_dir, tmp_path, capsys):
    """A re-run of an array job where one task failed: the old index is not left beside new
    shards; the merge verifies every unit and marks the dataset incomplete; the loader and the
    training job refuse it with one line; the missing task and a new merge complete it."""
    from megatron_emu.config.validate import data_path_errors
    from tests.helpers.tiny import tiny_config

    out = tmp_path / "out"
    assert data_cli(run_args(samples, inputs, tokenizer_dir, out)) == 0
    sf.load_index(out)
    (inputs / "a.jsonl").write_text((inputs / "a.jsonl").read_text() + (inputs / "b.jsonl").read_text())
    task = [*run_args(samples, inputs, tokenizer_dir, out), "--num-tasks", "2"]
    assert data_cli([*task, "--task-index", "0"]) == 0  # task 1 "failed": it never ran
    assert not (out / sf.INDEX_FILE).exists()
    assert data_cli([*task, "--merge-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is incomplete" in err and "shard(s) not done" in err
    meta = json.loads((out / "dataset.json").read_text())
    assert "not done" in meta["incomplete"]
    with pytest.raises(sf.ShardFormatError, match="incomplete dataset"):
        sf.load_index(out)
    cfg = tiny_config()
    cfg.data.path, cfg.model.vision.image_size = [str(out)], IMAGE_SIZE
    assert any("incomplete dataset" in e for e in data_path_errors(cfg))
    assert data_cli([*task, "--task-index", "1"]) == 0
    assert data_cli([*task, "--merge-only"]) == 0
    meta, index = sf.load_index(out)
    lines = sum(len((inputs / f).read_text().splitlines()) for f in ("a.jsonl", "b.jsonl"))
    assert "incomplete" not in meta and len(index) == lines
