"""The batch scripts under a real SLURM controller: multi-node CPU training (with DataLoader
workers, as the presets use them), every stop signal ending in a checkpoint and a requeue with
exact resume, errors before any node starts, job chains, and the preprocessing array job."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from tests.helpers.training import TINY, metrics
from tests.slurm.conftest import ROOT

PRETRAIN = str(ROOT / "slurm" / "pretrain.sbatch")
CPU_NODES = ["--nodes=2", "--gpus-per-node=0"]
CPU_ENV = {"NPROC_PER_NODE": "2"}  # 2 nodes x 2 CPU processes = TP2 x PP2


def _train_args(data, tok, run, ckpt, *sets) -> list[str]:
    args = [str(TINY)]
    for s in (f"data.path={json.dumps(data)}", f"data.tokenizer={tok}", f"run.dir={run}",
              f"checkpoint.dir={ckpt}", "data.num_workers=1", "checkpoint.save_interval=100",
              "run.log_interval=1", *sets):
        args += ["--set", s]
    return args


def _losses(run) -> list[tuple]:
    return [(m["step"], m["loss"], m["lm_loss"], m["reg_loss"], m["grad_norm"]) for m in metrics(run)]


def test_pretrain_two_nodes_preemption_requeue_and_exact_resume(slurm, train_data, tmp_path):
    """One uninterrupted 2-node job (submitted with --ntasks-per-node=2: still one launcher per
    node, trained once); one that gets SIGUSR1 mid-run (SLURM's pre-timeout signal), saves, is
    requeued by the script and resumes: identical metrics."""
    data, tok = train_data
    straight = slurm.sbatch(*CPU_NODES, "--ntasks-per-node=2", PRETRAIN,
                            *_train_args(data, tok, tmp_path / "a", tmp_path / "ca", "train.train_iters=12"),
                            env=CPU_ENV)
    st = slurm.wait(straight, timeout=400)
    out = (tmp_path / f"emu2-pretrain-{straight}.out").read_text()
    assert st["JobState"] == "COMPLETED" and st["ExitCode"] == "0:0", out[-3000:]
    assert out.count("world 4 = TP 2 x PP 2 x DP 1") == 1 and "2 node(s) x 2 process(es)" in out
    assert [m["step"] for m in metrics(tmp_path / "a")] == list(range(1, 13))
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


def _out(tmp_path, job) -> str:
    path = tmp_path / f"emu2-pretrain-{job}.out"
    return path.read_text() if path.exists() else ""


def _until(slurm, job, predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        st = slurm.state(job)
        ended = st.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
        if (ended and not predicate()) or time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            raise AssertionError(f"waiting for {what}: job {st.get('JobState')}, restarts {st.get('Restarts')}"
                                 f"\n{_out(slurm.workdir, job)[-4000:]}")
        time.sleep(0.5)


def _steps(run) -> list[int]:
    return [m["step"] for m in metrics(run)] if (run / "metrics.jsonl").exists() else []


def test_every_sigterm_saves_the_current_step_and_the_job_resumes_at_the_next(slurm, train_data, tmp_path):
    """One 2-node job with DataLoader workers through four attempts: ``scancel --signal=TERM``
    (the script requeues), ``scontrol requeue`` (SLURM requeues), the time limit's SIGTERM (the
    script requeues) and a plain ``scancel`` (saved, not requeued). Each one saves the step it
    interrupts, and each attempt resumes at the next step: every step is trained once."""
    data, tok = train_data
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    job = slurm.sbatch(*CPU_NODES, "--time=10", "--signal=B:URG@1", PRETRAIN,
                       *_train_args(data, tok, run, ckpt, "train.train_iters=500"), env=CPU_ENV)
    stops = lambda: [int(k) for k in re.findall(r"stopping at iteration (\d+)", _out(tmp_path, job))]  # noqa: E731
    resumes = lambda: [int(k) for k in re.findall(r"resumed from \S+: iteration (\d+)", _out(tmp_path, job))]  # noqa: E731

    def interrupt(attempt: int, *command: str) -> None:
        """Once this attempt trained two steps, interrupt it; wait until the step is saved."""
        def trained_two_steps() -> bool:
            r, steps = resumes(), _steps(run)
            return len(r) == attempt and bool(steps) and steps[-1] >= (r[-1] if attempt else 0) + 2

        _until(slurm, job, trained_two_steps, f"attempt {attempt} training")
        subprocess.run(command, check=True)
        _until(slurm, job, lambda: len(stops()) == attempt + 1, f"attempt {attempt} saving", timeout=200)
        assert (ckpt / "latest").read_text().strip() == f"iter_{stops()[-1]:07d}"
        assert _steps(run)[-1] == stops()[-1]

    interrupt(0, "scancel", "--signal=TERM", job)
    interrupt(1, "scontrol", "requeue", job)
    interrupt(2, "scontrol", "update", f"JobId={job}", "TimeLimit=1")  # ends 1 min after the attempt began
    _until(slurm, job, lambda: len(resumes()) == 3, "the restart after the time limit")
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True)
    interrupt(3, "scancel", job)
    st = slurm.wait(job, timeout=120)
    out = _out(tmp_path, job)
    assert st["JobState"] == "CANCELLED" and st["Restarts"] == "3", st
    assert resumes() == stops()[:3], out[-4000:]  # each attempt resumed where the last one saved
    assert _steps(run) == list(range(1, stops()[-1] + 1))  # no step lost or trained twice
    assert "DUE TO TIME LIMIT" in out and out.count("requeueing job") == 2
    assert "was cancelled: not requeued" in out
    assert "DataLoader worker" not in out and "Traceback" not in out


def test_launch_errors_fail_before_any_node_starts(slurm, train_data, tmp_path):
    """A bad data.path, a --nodes count that does not fit the layout and a forgotten
    NPROC_PER_NODE on CPU nodes: the job fails at once with one line, srun never runs."""
    data, tok = train_data
    jobs = {
        "data.path": slurm.sbatch(*CPU_NODES, PRETRAIN, *_train_args(
            ["/nonexistent/dataset"], tok, tmp_path / "r1", tmp_path / "c1"), env=CPU_ENV),
        "1 node(s) x 2 process(es) per node = world size 2 does not fit": slurm.sbatch(
            "--nodes=1", "--gpus-per-node=0", PRETRAIN, *_train_args(data, tok, tmp_path / "r2", tmp_path / "c2"),
            env=CPU_ENV),
        "2 node(s) x 1 process(es) per node = world size 2 does not fit": slurm.sbatch(
            *CPU_NODES, PRETRAIN, *_train_args(data, tok, tmp_path / "r3", tmp_path / "c3")),
    }
    for message, job in jobs.items():
        st = slurm.wait(job, timeout=120)
        out = _out(tmp_path, job)
        assert st["JobState"] == "FAILED" and st["ExitCode"] == "2:0", out
        errors = [line for line in out.splitlines() if line.startswith("megatron-emu-train:")]
        assert len(errors) == 1 and message in errors[0], out
        assert "nothing was started" in out and "rendezvous" not in out and "Traceback" not in out


def test_a_failing_chain_stops_after_its_first_job(slurm, train_data, tmp_path):
    data, tok = train_data
    args = _train_args(["/nonexistent/dataset"], tok, tmp_path / "run", tmp_path / "ckpt")
    out = subprocess.run([str(ROOT / "slurm" / "submit_chain.sh"), "3", *CPU_NODES, f"--chdir={tmp_path}",
                          f"--export=ALL,NPROC_PER_NODE=2,PYTHON={sys.executable}", "--", *args],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    jobs = [line.split(": ")[1].split()[0] for line in out.splitlines()]
    slurm.wait_all(timeout=200)
    assert [slurm.state(j)["JobState"] for j in jobs] == ["FAILED", "CANCELLED", "CANCELLED"]
    assert not (tmp_path / f"emu2-pretrain-{jobs[1]}.out").exists()


def test_chain_of_jobs_resumes_in_turn(slurm, train_data, tmp_path):
    data, tok = train_data
    args = _train_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.train_iters=6",
                       "train.exit_interval=3")
    out = subprocess.run([str(ROOT / "slurm" / "submit_chain.sh"), "2", *CPU_NODES, f"--chdir={tmp_path}",
                          f"--export=ALL,NPROC_PER_NODE=2,PYTHON={sys.executable}", "--", *args],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    jobs = [line.split(": ")[1].split()[0] for line in out.splitlines()]
    assert len(jobs) == 2
    slurm.wait_all(timeout=500)
    assert [slurm.state(j)["JobState"] for j in jobs] == ["COMPLETED", "COMPLETED"]
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000006"
    assert "resumed from" in (tmp_path / f"emu2-pretrain-{jobs[1]}.out").read_text()


def test_the_last_job_of_a_chain_fails_unless_training_finished(slurm, train_data, tmp_path):
    """A chain too short for train_iters (its only job stops at exit_interval): FAILED, loudly."""
    data, tok = train_data
    args = _train_args(data, tok, tmp_path / "run", tmp_path / "ckpt", "train.train_iters=4",
                       "train.exit_interval=2")
    out = subprocess.run([str(ROOT / "slurm" / "submit_chain.sh"), "1", *CPU_NODES, f"--chdir={tmp_path}",
                          f"--export=ALL,NPROC_PER_NODE=2,PYTHON={sys.executable}", "--", *args],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    job = out.split(": ")[1].split()[0]
    st = slurm.wait(job, timeout=400)
    assert st["JobState"] == "FAILED", st
    assert "the last job of the chain ended with training stopped" in _out(tmp_path, job)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000002"


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
