"""Optional Weights & Biases logging (``run.wandb``): the metrics.jsonl records, mirrored.

Never required: without ``run.wandb`` nothing here is imported. The run keeps one W&B id across
restarts (stored in ``run.dir/wandb_run_id``), so a resumed job continues the same W&B run;
``mode: offline`` writes under ``run.dir/wandb/`` for a later ``wandb sync``.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path


class WandbSink:
    def __init__(self, project: str, name: str | None, mode: str, run_dir: str | Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("run.wandb is set but the wandb package is not installed: "
                               "`pip install wandb`, or remove run.wandb") from None
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self._wandb = wandb
        self._run = wandb.init(project=project, name=name, mode=mode, dir=str(run_dir), id=run_id,
                               resume="allow", config=config)

    def log(self, record: dict, prefix: str = "train") -> None:
        values = {f"{prefix}/{k}": v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(float(v))}
        self._run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self._run.finish()
