"""The batch scripts under a real SLURM controller: multi-node CPU training, preemption with
requeue and exact resume, job chains, and the preprocessing array job."""

from __future__ import annotations

import json
import subprocess

from tests.helpers.training import TINY, metrics
from tests.slurm.conftest import ROOT

PRETRAIN = str(ROOT / "slurm" / "pretrain.sbatch")
CPU_NODES = ["--nodes=2", "--gpus-per-node=0"]
CPU_ENV = {"NPROC_PER_NODE": "2"}  # 2 nodes x 2 CPU processes = TP2 x PP2


def _train_args(data, tok, run, ckpt, *sets) -> list[str]:
    args = [str(TINY)]
    for s in (f"data.path={json.dumps(data)}", f"data.tokenizer={tok}", f"run.dir={run}",
              f"checkpoint.dir={ckpt}", "data.num_workers=0", "checkpoint.save_interval=100",
              "run.log_interval=1", *sets):
        args += ["--set", s]
    return args


def _losses(run) -> list[tuple]:
    return [(m["step"], m["loss"], m["lm_loss"], m["reg_loss"], m["grad_norm"]) for m in metrics(run)]


def test_pretrain_two_nodes_preemption_requeue_and_exact_resume(slurm, train_data, tmp_path):
    """One uninterrupted 2-node job; one that gets SIGUSR1 mid-run (SLURM's pre-timeout signal),
    saves, is requeued by the script and resumes: identical metrics."""
    data, tok = train_data
    straight = slurm.sbatch(*CPU_NODES, PRETRAIN, *_train_args(data, tok, tmp_path / "a", tmp_path / "ca",
                                                               "train.train_iters=12"), env=CPU_ENV)
    st = slurm.wait(straight, timeout=400)
    assert st["JobState"] == "COMPLETED" and st["ExitCode"] == "0:0", st
    out = (tmp_path / f"emu2-pretrain-{straight}.out").read_text()
    assert "world 4 = TP 2 x PP 2 x DP 1" in out and "2 node(s) x 2 process(es)" in out
    assert (tmp_path / "a" / "logs" / f"slurm-{straight}.log").is_file()

    job = slurm.sbatch(*CPU_NODES, PRETRAIN, *_train_args(data, tok, tmp_path / "b", tmp_path / "cb",
                                                          "train.train_iters=12"), env=CPU_ENV)
    run_b = tmp_path / "b"
    slurm.wait(job, timeout=300, until=lambda: (run_b / "metrics.jsonl").exists() and len(metrics(run_b)) >= 3)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    st = slurm.wait(job, timeout=400)
    assert st["JobState"] == "COMPLETED" and st["Restarts"] == "1", st
    log = (tmp_path / f"emu2-pretrain-{job}.out").read_text()
    assert "requeueing job" in log and "resumed from" in log and "restart 1" in log
    assert _losses(run_b) == _losses(tmp_path / "a")
    assert (tmp_path / "cb" / "latest").read_text().strip() == "iter_0000012"


def test_chain_of_jobs_resumes_in_turn(slurm, train_data, tmp_path):
    data, tok = train_data
    args = _train_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.train_iters=6",
                       "train.exit_interval=3")
    out = subprocess.run([str(ROOT / "slurm" / "submit_chain.sh"), "2", *CPU_NODES, f"--chdir={tmp_path}",
                          f"--export=ALL,NPROC_PER_NODE=2,PYTHON={__import__('sys').executable}", "--", *args],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    jobs = [line.split(": ")[1].split()[0] for line in out.splitlines()]
    assert len(jobs) == 2
    slurm.wait_all(timeout=500)
    assert [slurm.state(j)["JobState"] for j in jobs] == ["COMPLETED", "COMPLETED"]
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000006"
    assert "resumed from" in (tmp_path / f"emu2-pretrain-{jobs[1]}.out").read_text()


def test_preprocess_array_job_matches_a_single_process_run(slurm, samples, tokenizer_dir, tmp_path):
    from tests.helpers.datasets import IMAGE_SIZE, preprocess

    single = tmp_path / "single"
    preprocess(samples, tokenizer_dir, "mmc4", single, shard_size=3)
    args = ["--format", "mmc4", "--input", str(samples / "mmc4" / "docs.jsonl"), "--images",
            str(samples / "mmc4" / "images"), "--tokenizer", str(tokenizer_dir), "--out",
            str(tmp_path / "array"), "--image-size", str(IMAGE_SIZE), "--shard-size", "3"]
    slurm.sbatch("--array=0-2", "--cpus-per-task=1", str(ROOT / "slurm" / "preprocess.sbatch"), *args)
    slurm.wait_all(timeout=300)
    names = sorted(p.name for p in single.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "array").iterdir())
    for name in names:
        assert (single / name).read_bytes() == (tmp_path / "array" / name).read_bytes(), name
    merge_logs = list(tmp_path.glob("emu2-preprocess-merge-*.out"))
    assert merge_logs and '"documents"' in merge_logs[0].read_text()


def test_convert_job_writes_the_hugging_face_directory(slurm, train_data, tmp_path):
    """convert.sbatch on a training checkpoint (made by a short 4-rank run) -> HF Emu2 directory."""
    from tests.helpers.training import tiny_args, train

    data, tok = train_data
    assert train(4, tiny_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.train_iters=1")) == [0] * 4
    job = slurm.sbatch("--cpus-per-task=1", str(ROOT / "slurm" / "convert.sbatch"), "mcore-to-hf",
                       "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--no-progress")
    st = slurm.wait(job, timeout=300)
    assert st["JobState"] == "COMPLETED", (tmp_path / f"emu2-convert-{job}.out").read_text()[-2000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["EmuForCausalLM"]
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
