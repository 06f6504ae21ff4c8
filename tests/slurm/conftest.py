"""A real SLURM cluster on this machine: slurmctld + two emulated slurmd nodes + munged from
Debian's packages (tests/slurm/cluster.sh installs them when missing, as root).

Skipped, with the reason, only when the scheduler cannot be installed (not root, no apt)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NODES = 2


def _can_install() -> str | None:
    if os.geteuid() != 0:
        return "the SLURM tests start slurmctld/slurmd/munged and need root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is not available to install it"
    return None


@pytest.fixture(scope="session")
def cluster():
    reason = _can_install()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "SLURM_CI_NODES": str(NODES), "SLURM_CI_TIMEOUT": "120"}
    # A cluster that is already up (CI's, or another checkout's test run) is left running.
    was_up = subprocess.run(["bash", str(HERE / "cluster.sh"), "status"], env=env, capture_output=True,
                            timeout=60).returncode == 0
    proc = subprocess.run(["bash", str(HERE / "cluster.sh"), "start"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"could not start SLURM:\n{proc.stderr[-3000:]}"
    yield
    if not was_up:
        subprocess.run(["scancel", "--user", "root"], capture_output=True)
        subprocess.run(["bash", str(HERE / "cluster.sh"), "stop"], env=env, capture_output=True, timeout=120)


class Slurm:
    """Submit jobs and wait for them by polling (``sbatch --wait`` polls slowly)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        import sys

        export = {"MEGATRON_EMU_ROOT": str(ROOT), "PYTHON": sys.executable, **(env or {})}
        exports = "ALL," + ",".join(f"{k}={v}" for k, v in export.items())
        out = subprocess.run(["sbatch", "--parsable", f"--chdir={self.workdir}", f"--export={exports}", *args],
                             capture_output=True, text=True, check=True, cwd=self.workdir)
        return out.stdout.strip().split(";")[0]

    def state(self, job: str) -> dict:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
        return fields

    def wait(self, job: str, timeout: float = 300, until=None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until():
                return self.state(job)
            if not until and not subprocess.run(["squeue", "-h", "-j", job], capture_output=True,
                                                text=True).stdout.strip():
                time.sleep(0.5)
                return self.state(job)
            time.sleep(0.5)
        subprocess.run(["scancel", job])
        raise TimeoutError(f"job {job} still running after {timeout} s: {self.state(job).get('JobState')}")

    def wait_all(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            if time.monotonic() > deadline:
                raise TimeoutError("jobs still queued")
            time.sleep(0.5)


@pytest.fixture
def slurm(cluster, tmp_path):
    return Slurm(tmp_path)
