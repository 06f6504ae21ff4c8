"""The README's main job, end to end: examples/quickstart_cpu.sh on a fresh directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_trains_saves_and_resumes(tmp_path):
    work = tmp_path / "qs"
    env = {**os.environ, "WORKDIR": str(work)}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "quickstart_cpu.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for sub in ("tokenizer", "data", "run", "checkpoints"):
        assert (work / sub).is_dir(), sub
    assert "resumed from" in out and "stopping at iteration 20" in out
    m = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == list(range(1, 41))
    for key in ("lm_loss", "reg_loss"):
        first = sum(r[key] for r in m[:5]) / 5
        last = sum(r[key] for r in m[-5:]) / 5
        assert last < 0.9 * first, (key, first, last)
    assert (work / "checkpoints" / "latest").read_text().strip() == "iter_0000040"
    assert list((work / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert str(work / "checkpoints" / "iter_0000040") in out
