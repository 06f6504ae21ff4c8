"""``run.dir/exit_status.json``: why a run ended, for people and batch scripts.

``{"status": "finished" | "stopped" | "failed", "reason": ..., ...}``: "finished" once
``train.train_iters`` is reached, "stopped" after a signal / time budget / exit interval with a
checkpoint saved (SLURM scripts requeue on it), "failed" on every error, expected or not.
Global rank 0 writes the first two; a failure is written by the rank it happened on, unless
another rank already recorded one for this run (the first failure is the cause, the later ones
are usually its echo on the ranks that lost their peer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NAME = "exit_status.json"


def write(run_dir: str | Path, record: dict) -> None:
    """Atomically replace ``run_dir/exit_status.json`` with ``record``."""
    path = Path(run_dir) / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def _this_process_started() -> float:
    import psutil

    return psutil.Process().create_time()


def write_failure(run_dir: str | Path, reason: str, rank: int, **extra) -> None:
    """Record a failure of this run (never raises: it runs while an error is propagating)."""
    try:
        path = Path(run_dir) / NAME
        try:
            old = json.loads(path.read_text())
            if old.get("status") == "failed" and path.stat().st_mtime >= _this_process_started() - 1:
                return  # another rank of this run failed first
        except (OSError, ValueError, AttributeError):
            pass
        write(run_dir, {"status": "failed", "reason": reason, "rank": rank, **extra})
    except Exception:  # noqa: BLE001 - the original error matters more than this record
        pass
