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
        try:
            self._run = wandb.init(project=project, name=name, mode=mode, dir=str(run_dir), id=run_id,
                                   resume="allow", config=config)
            # Our step is a logged value, not W&B's own step counter: a resumed job logs the
            # steps after its checkpoint again, which W&B's monotonic step would drop.
            self._run.define_metric("train/step")
            for prefix in ("train", "valid"):
                self._run.define_metric(f"{prefix}/*", step_metric="train/step")
        except Exception as e:  # noqa: BLE001 - W&B raises its own error types (network, usage)
            raise RuntimeError(f"run.wandb: W&B did not start ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'no message'}); check "
                               f"the project and your login, or use mode: offline") from None

    def log(self, record: dict, prefix: str = "train") -> None:
        values = {f"{prefix}/{k}": v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(float(v))}
        values["train/step"] = int(record["step"])
        self._run.log(values)

    def close(self) -> None:
        self._run.finish()
