"""slurm/preprocess.sbatch on the real scheduler: strided arrays, a cancelled task 0 (still one
merge, which marks the re-run dataset incomplete; the loader refuses it), and the re-submission
that completes it. Waits only for its own jobs (other tests may share the cluster)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from megatron_emu.data import shard_format as sf
from tests.helpers.datasets import IMAGE_SIZE, preprocess
from tests.slurm.conftest import ROOT

SCRIPT = str(ROOT / "slurm" / "preprocess.sbatch")


def args(samples, tokenizer_dir, out, docs=None) -> list[str]:
    return ["--format", "mmc4", "--input", str(docs or samples / "mmc4" / "docs.jsonl"), "--images",
            str(samples / "mmc4" / "images"), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--shard-size", "3"]


def merge_jobs(workdir: Path, array: str) -> list[str]:
    """Merge jobs the tasks of ``array`` submitted (from their logs)."""
    jobs = []
    for log in workdir.glob(f"emu2-preprocess-{array}_*.out"):
        jobs += re.findall(r"submitted merge job (\d+)", log.read_text())
    return jobs


def wait_gone(job: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            raise TimeoutError(f"job {job} still queued after {timeout} s")
        time.sleep(0.5)


def run_array(slurm, array_args: list[str], job_args: list[str], workdir: Path, before_release=None) -> tuple[str, str]:
    """Submit the array held, optionally act on it (cancel a task), release it, wait for the array
    and its merge; returns (array job, merge job)."""
    array = slurm.sbatch("--hold", *array_args, "--cpus-per-task=1", SCRIPT, *job_args)
    if before_release is not None:
        before_release(array)
    subprocess.run(["scontrol", "release", array], check=True, capture_output=True)
    wait_gone(array)
    merges = merge_jobs(workdir, array)
    assert len(merges) == 1, merges  # every task tried; exactly one submitted it
    wait_gone(merges[0])
    return array, merges[0]


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_strided_array_makes_the_whole_dataset(slurm, samples, tokenizer_dir, tmp_path):
    """--array=0-6:2 is 4 tasks (ids 0, 2, 4, 6): every unit is made once, the merge runs, and
    the result is byte-identical to a single run."""
    single = tmp_path / "single"
    preprocess(samples, tokenizer_dir, "mmc4", single, shard_size=3)
    array, merge = run_array(slurm, ["--array=0-6:2"], args(samples, tokenizer_dir, tmp_path / "array"), tmp_path)
    same_files(single, tmp_path / "array")
    assert slurm.state(merge)["JobState"] == "COMPLETED"
    logs = "".join(p.read_text() for p in tmp_path.glob(f"emu2-preprocess-{array}_*.out"))
    assert sorted(re.findall(r"array task (\d) of 4 \(id (\d)\)", logs)) == [("0", "0"), ("1", "2"), ("2", "4"), ("3", "6")]


def test_irregular_array_is_refused_before_any_work(slurm, samples, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    array = slurm.sbatch("--array=0,1,5", "--cpus-per-task=1", SCRIPT, *args(samples, tokenizer_dir, out))
    wait_gone(array)
    logs = "".join(p.read_text() for p in tmp_path.glob(f"emu2-preprocess-{array}_*.out"))
    assert logs.count("--array must be a range") == 3
    assert not out.exists() and not merge_jobs(tmp_path, array)


def test_cancelled_task_zero_leaves_a_dataset_the_loader_refuses(slurm, samples, tokenizer_dir, tmp_path):
    """A re-run into an existing dataset (its input was edited) whose task 0 is cancelled: the
    other tasks submit the merge, the merge finds units missing and marks the dataset incomplete
    (no old index beside the new shards); training refuses it with one line. Re-submitting the
    same array completes it, identical to a single run."""
    from megatron_emu.config.validate import data_path_errors
    from megatron_emu.data.loader import EmuDataLoader, LoaderSpec
    from tests.helpers.tiny import tiny_config

    docs = tmp_path / "docs.jsonl"
    lines = (samples / "mmc4" / "docs.jsonl").read_text().splitlines()
    docs.write_text("\n".join(lines[:-2]) + "\n")
    out = tmp_path / "out"
    preprocess(samples, tokenizer_dir, "mmc4", out, shard_size=3, inputs=[str(docs)])
    sf.load_index(out)
    docs.write_text("\n".join(lines) + "\n")  # edited: every unit is to be redone
    job_args = args(samples, tokenizer_dir, out, docs)
    array, merge = run_array(slurm, ["--array=0-2"], job_args, tmp_path,
                             before_release=lambda a: subprocess.run(["scancel", f"{a}_0"], check=True))
    assert slurm.state(merge)["JobState"] == "FAILED"
    merge_log = (tmp_path / f"emu2-preprocess-merge-{merge}.out").read_text()
    assert "is incomplete" in merge_log and "shard(s) not done" in merge_log
    assert not (out / sf.INDEX_FILE).exists()
    assert "not done" in json.loads((out / sf.DATASET_FILE).read_text())["incomplete"]
    with pytest.raises(sf.ShardFormatError) as e:
        EmuDataLoader(LoaderSpec(paths=((1.0, str(out)),), seq_length=64, n_query=4, image_size=IMAGE_SIZE,
                                 micro_batch_size=1, num_workers=0, decoder="pil"))
    assert "incomplete dataset" in str(e.value) and "\n" not in str(e.value)
    cfg = tiny_config()
    cfg.data.path, cfg.model.vision.image_size = [str(out)], IMAGE_SIZE
    assert any("incomplete dataset" in x for x in data_path_errors(cfg))
    assert not list(out.glob(".merge-*"))
    # The same submission again finishes it.
    array, merge = run_array(slurm, ["--array=0-2"], job_args, tmp_path)
    assert slurm.state(merge)["JobState"] == "COMPLETED"
    single = tmp_path / "single"
    preprocess(samples, tokenizer_dir, "mmc4", single, shard_size=3, inputs=[str(docs)])
    same_files(single, out)
