"""What the user sees: one log line per interval, ``metrics.jsonl`` and TensorBoard events.

Only global rank 0 writes; every value it writes has already been reduced over the ranks that
hold it (losses from the last pipeline stage, averaged over data-parallel ranks).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

from megatron_emu.utils import device, units

log = logging.getLogger("megatron_emu.train")


class MetricsWriter:
    """Appends one JSON object per optimizer step; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool, log_interval: int = 1, sinks: tuple = ()):
        """``sinks``: more destinations with ``log(record, prefix)`` and ``close()`` (W&B)."""
        self.enabled, self.log_interval, self.sinks = enabled, max(1, log_interval), sinks
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self._open_tensorboard()

    def _open_tensorboard(self, purge_step: Optional[int] = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"), purge_step=purge_step)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            log.warning("tensorboard is not installed: no event files (metrics.jsonl still written)")

    def resume_at(self, step: int) -> None:
        """The run resumed from the checkpoint of ``step``: the steps after it are done again, so
        their old records (written before the stop or crash) are dropped from metrics.jsonl, as
        is an unfinished last line, and TensorBoard hides its events after ``step``."""
        if not self.enabled:
            return
        self._file.close()
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                record_step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                record_step = None
            if not line.endswith("\n") or (isinstance(record_step, int) and record_step > step):
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.path)
            log.info("metrics.jsonl: dropped %d record(s) after step %d (they are trained again)", dropped, step)
        self._file = open(self.path, "a", buffering=1)
        if self._tb is not None:
            self._tb.close()
            self._open_tensorboard(purge_step=step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        # Keep non-finite losses visible in the JSON as strings ("nan"), not as invalid JSON.
        for k, v in record.items():
            if isinstance(v, float) and not math.isfinite(v):
                clean[k] = str(v)
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) \
                        and math.isfinite(float(v)):
                    self._tb.add_scalar(f"train/{k}", v, step)
        for sink in self.sinks:
            sink.log(record, "train")
        if record["step"] % self.log_interval == 0 or record.get("skipped"):
            log.info(format_line(record))

    def write_validation(self, record: dict) -> None:
        """A validation record ``{"step", "valid_loss", "valid_lm_loss", "valid_reg_loss",
        "valid_ppl"}``: a line of metrics.jsonl (no ``loss`` key: training records have one),
        TensorBoard under ``valid/``."""
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"valid/{k.removeprefix('valid_')}", v, record["step"])
        for sink in self.sinks:
            sink.log({k.removeprefix("valid_") if k != "step" else k: v for k, v in record.items()}, "valid")

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def memory_gib() -> float | None:
    """Peak allocated device memory in GiB on a GPU; this process's resident memory on a CPU."""
    gib = device.max_memory_gib()
    if gib is not None:
        return gib
    try:
        import psutil
        return psutil.Process(os.getpid()).memory_info().rss / 2**30
    except ImportError:  # pragma: no cover
        return None


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_line(r: dict) -> str:
    mem = r.get("memory_gib")
    parts = [f"step {r['step']:>6d}/{r['train_iters']}",
             f"loss {_fmt(r['loss'], '.4f')}", f"lm {_fmt(r['lm_loss'], '.4f')}",
             f"reg {_fmt(r['reg_loss'], '.4f')}", f"lr {r['lr']:.2e}",
             *(f"{k} {v:.2e}" for k, v in r.items() if k.startswith("lr_")),
             f"gnorm {_fmt(r['grad_norm'], '.3f')}", f"{r['tokens_per_s']:.0f} tok/s",
             f"{r['images_per_s']:.1f} img/s", f"{r['tflops_per_gpu']:.3g} TFLOP/s/GPU"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if mem is not None:
        parts.append(f"mem {units.size_gib(mem)}")
    parts.append(f"{r['step_time_s']:.2f} s/step")
    if r.get("elapsed_s") is not None:
        parts.append(f"elapsed {units.duration(r['elapsed_s'])}")
    if r.get("eta_s") is not None and r["step"] < r["train_iters"]:
        parts.append(f"ETA {units.duration(r['eta_s'])}")
    if r.get("skipped"):
        parts.append("SKIPPED (non-finite loss or gradient)")
    return " | ".join(parts)
