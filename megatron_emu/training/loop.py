"""The training job: ``train(cfg)`` runs on every rank under torchrun / srun.

Per optimizer step: this rank's ``global_batch / (micro_batch x DP)`` micro-batches from the
loader -> megatron-core's schedule (no pipelining, 1F1B or interleaved) -> grads reduced by
megatron-core's DDP -> a finiteness check of loss and gradient norm (all ranks agree) -> clip +
(distributed) Adam step + LR schedule, or a skipped update. Then metrics, periodic and final
checkpoints, and the stop checks (signals, wall-clock budget).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_emu.config import derived
from megatron_emu.config.schema import EmuConfig
from megatron_emu.data.bad_samples import BadDataError
from megatron_emu.data.batch_source import BatchSource, cpu_tp_groups, stage_fields
from megatron_emu.data.loader import EmuDataLoader
from megatron_emu.parallel import agree
from megatron_emu.parallel.groups import destroy, init_distributed
from megatron_emu.parallel.sizes import ParallelSizes
from megatron_emu.training import build
from megatron_emu.training import checkpointing as ckpt
from megatron_emu.training import dir_lock, exit_status, logs, startup
from megatron_emu.training.evaluate import Evaluator, validation_due
from megatron_emu.training.flops import step_flops
from megatron_emu.training.metrics import MetricsWriter, memory_gib
from megatron_emu.training.optimizer import module_lrs
from megatron_emu.training.schedule import forward_backward, zero_grads
from megatron_emu.training.signals import URGENT, StopRequest
from megatron_emu.training.update import apply_update
from megatron_emu.utils import device
from megatron_emu.utils.stop_signals import StopSignals

log = logging.getLogger("megatron_emu.train")


class TrainingError(RuntimeError):
    """The job cannot continue (message says why); the process exits non-zero."""


@dataclass
class Progress:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_total: int = 0
    consecutive_skips: int = 0


class Trainer:
    """The job on this rank; its parts come from the composition root (``training/build.py``)."""

    def __init__(self, cfg: EmuConfig, lock: dir_lock.DirLock | None = None, signals: StopSignals | None = None):
        self.cfg, self.lock = cfg, lock
        self.pgs = build.process_groups(cfg)
        self.rank = torch.distributed.get_rank()
        self.sizes = ParallelSizes.from_groups(self.pgs)  # the one source of TP/PP/DP from here on
        self.dev = device.device()
        self.dp = self.sizes.dp
        self.num_micro = derived.num_microbatches(cfg, self.dp)
        self.dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
        self.layout = {"tp": self.sizes.tp, "pp": self.sizes.pp,
                       "vpp": cfg.parallel.virtual_pipeline_model_parallel_size, "dp": self.dp}
        if self.rank == 0:
            startup.summary(cfg, self.layout, self.num_micro, self.dev)
        self.model, self.optimizer, self.scheduler = build.model_and_optimizer(cfg, self.pgs)
        self.step_spec, self.optimizer_spec = build.step_spec(cfg, self.sizes), build.optimizer_spec(cfg)
        self.source = self._batch_source()
        self.evaluator = self._evaluator()
        self.progress = Progress()
        self.metrics = MetricsWriter(cfg.run.dir, enabled=self.rank == 0, log_interval=cfg.run.log_interval,
                                     sinks=self._sinks())
        self.started = time.monotonic()
        self._mean_step_s: Optional[float] = None
        self.stop = StopRequest(cfg.train.exit_duration_mins, signals)
        self.async_queue = None
        if cfg.checkpoint.async_save:
            if not device.has_cuda():
                raise TrainingError("checkpoint.async_save needs a GPU (CPU runs save synchronously)")
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
            self.async_queue = AsyncCallsQueue()

    # -- startup ---------------------------------------------------------------------------
    def _batch_source(self, validation: bool = False) -> BatchSource:
        """One loader per TP group (on its first rank) for the stages that need data: the
        training data, or the validation data from its start."""
        fields = stage_fields(self.sizes.first_stage, self.sizes.last_stage)
        tp_ranks = torch.distributed.get_process_group_ranks(self.pgs.tp)
        loader = None
        spec = build.loader_spec(self.cfg, self.sizes, validation=validation)
        if fields and torch.distributed.get_rank() == tp_ranks[0]:
            try:
                loader = EmuDataLoader(spec)
            except ValueError as e:  # bad dataset directory, image size, decoder choice
                raise TrainingError(f"data{' (validation)' if validation else ''}: {e}") from None
        if not hasattr(self, "_cpu_tp_group"):
            self._cpu_tp_group = cpu_tp_groups(self.pgs.tp, self.cfg.parallel.collective_timeout_s)
        return BatchSource(loader, spec.ce_ignore_ids, fields, cpu_group=self._cpu_tp_group,
                           device_group=self.pgs.tp, src=tp_ranks[0], pin=device.has_cuda())

    def _sinks(self) -> tuple:
        """W&B on rank 0 (when configured). Every rank learns whether it started, so a failure
        there ends all ranks with one line instead of leaving the others in a collective."""
        wb = self.cfg.run.wandb
        if wb is None:
            return ()
        sinks, problem = (), None
        if self.rank == 0:
            from megatron_emu.training.wandb_sink import WandbSink

            try:
                sinks = (WandbSink(wb.project, wb.name, wb.mode, self.cfg.run.dir, _config_dict(self.cfg)),)
            except RuntimeError as e:
                problem = str(e)
        if agree.any_rank(problem is not None, self.dev):
            raise TrainingError(problem or "run.wandb: W&B did not start on rank 0 (its log says why)")
        return sinks

    def _eta(self, step_s: float) -> float:
        """Seconds to train_iters from a running mean of the step time (the first step, with
        its start-up work, only seeds it)."""
        m = self._mean_step_s
        self._mean_step_s = step_s if m is None else 0.9 * m + 0.1 * step_s
        return self._mean_step_s * (self.cfg.train.train_iters - self.progress.iteration)

    def _evaluator(self) -> Optional[Evaluator]:
        d = self.cfg.data
        if not (d.valid_path or d.valid_fraction):
            return None
        run = functools.partial(forward_backward, self.step_spec, self.model, dev=self.dev, dtype=self.dtype,
                                forward_only=True)
        return Evaluator(self.model, functools.partial(self._batch_source, validation=True),
                         self.num_micro, self.cfg.train.eval_iters, run, self._reduce_losses)

    def validate(self) -> None:
        """Validation losses at this iteration: logged, metrics.jsonl and TensorBoard."""
        if self.evaluator is None:
            return
        t0 = time.perf_counter()
        result = self.evaluator.evaluate()
        self.metrics.write_validation({"step": self.progress.iteration, **result})
        log.info("validation at step %d: loss %.4f | lm %.4f (ppl %.2f) | reg %.4f | %.1f s",
                 self.progress.iteration, result["valid_loss"], result["valid_lm_loss"],
                 result["valid_ppl"], result["valid_reg_loss"], time.perf_counter() - t0)

    def resume_or_init(self) -> None:
        ck = self.cfg.checkpoint
        if ck.dir:
            ckpt.cleanup_partial(ck.dir)
            found = self._agreed_checkpoint(ck.dir)
            if found is not None:
                meta = ckpt.read_meta(found, ck.verify)
                ckpt.check_model_matches(meta, self.cfg, found)
                ckpt.load_full(found, self.model, self.optimizer, self.pgs, self.layout, ck.verify)
                self.scheduler.load_state_dict(meta["scheduler"])
                self.source.load_state_dict(meta["data"])
                self.progress.__dict__.update(Progress(**meta["progress"]).__dict__)
                self.metrics.resume_at(self.progress.iteration)
                log.info("resumed from %s: iteration %d, %d samples consumed", found,
                         self.progress.iteration, self.progress.consumed_samples)
                return
        if ck.load:
            found = self._agreed_checkpoint(ck.load)
            if found is None:
                raise TrainingError(f"checkpoint.load: no checkpoint at {ck.load}")
            ckpt.check_model_matches(ckpt.read_meta(found, ck.verify), self.cfg, found, weights_only=True)
            ckpt.load_weights(found, self.model, self.optimizer, ck.verify, self.cfg.model.lm.vocab_size)
            log.info("initialised weights from %s (optimizer, schedule and data start fresh)", found)

    def _agreed_checkpoint(self, path: str) -> Optional[Path]:
        """The checkpoint ``path`` resolves to, as rank 0 sees it (one answer for all ranks,
        whatever their view of a network filesystem)."""
        found = agree.decided_by_rank0(lambda: (lambda p: None if p is None else str(p))(ckpt.resolve(path)),
                                       self.dev, ckpt.CheckpointError)
        return None if found is None else Path(found)

    # -- one step --------------------------------------------------------------------------
    def _microbatches(self) -> tuple[list, int]:
        """The step's micro-batches as host tensors (each is copied to the device just before
        its forward) and the number of images among them. A data error on any rank stops every
        rank here, before any of them enters the step's collectives."""
        batches, error = [], None
        try:
            batches = [next(self.source) for _ in range(self.num_micro)]
        except Exception as e:  # noqa: BLE001 - agreed on below, then re-raised
            error = e
        if agree.any_rank(error is not None, self.dev):
            if error is not None:
                raise error
            raise BadDataError("the data loader of another rank failed; that rank's log names the "
                               "shard, key or error")
        return batches, sum(b.num_images for b in batches if b is not None)

    def _reduce_losses(self, reports: list[dict]) -> torch.Tensor:
        """``[3]`` float64 device tensor: mean loss, lm_loss, reg_loss of the global batch, on
        every rank (no host sync)."""
        vals = torch.zeros(3, dtype=torch.float64, device=self.dev)
        if reports:
            vals = torch.stack([torch.stack([r[k].double() for r in reports]).mean()
                                for k in ("loss", "lm_loss", "reg_loss")])
        torch.distributed.all_reduce(vals, group=self.pgs.pp)  # only the last stage has them
        torch.distributed.all_reduce(vals, group=self.pgs.dp)
        return vals / self.dp

    def step(self) -> dict:
        cfg, p = self.cfg, self.progress
        t0 = time.perf_counter()
        bad_before = self.source.bad_samples
        batches, images = self._microbatches()
        data_wait = time.perf_counter() - t0  # the loader is host work: wall time is the wait
        bad = self.source.bad_samples - bad_before
        zero_grads(self.model)
        self.optimizer.zero_grad()
        poison = (p.iteration + 1) in cfg.train.inject_nan_iterations
        reports = forward_backward(self.step_spec, self.model, batches, self.dev, self.dtype, poison=poison)
        losses = self._reduce_losses(reports)
        ok, (loss, lm_loss, reg_loss, grad_norm) = apply_update(
            self.optimizer, self.scheduler, cfg.train.clip_grad, losses, self.dev)
        if ok:
            p.consecutive_skips = 0
        else:
            p.skipped_total += 1
            p.consecutive_skips += 1
        lr = self.optimizer.param_groups[0]["lr"]
        device.synchronize()
        dt = time.perf_counter() - t0
        p.iteration += 1
        p.consumed_samples += cfg.train.global_batch_size
        n_img = torch.tensor([images, bad], dtype=torch.float64, device=self.dev)
        torch.distributed.all_reduce(n_img, group=self.pgs.dp)
        n_img, n_bad = n_img[:1], int(n_img[1].item())
        world = torch.distributed.get_world_size()
        flops = step_flops(cfg, cfg.train.global_batch_size, int(n_img.item()))
        tflops = flops / dt / world / 1e12
        peak = device.peak_tflops(cfg.model.params_dtype, fp8=cfg.train.fp8 is not None)
        record = {
            "step": p.iteration, "train_iters": cfg.train.train_iters, "loss": loss, "lm_loss": lm_loss,
            "reg_loss": reg_loss, "grad_norm": grad_norm, "lr": lr,
            **module_lrs(self.optimizer, self.optimizer_spec),  # lr_<module>: modules with their own peak
            "consumed_samples": p.consumed_samples,
            "tokens_per_s": cfg.train.global_batch_size * cfg.train.seq_length / dt,
            "images_per_s": n_img.item() / dt, "tflops_per_gpu": tflops,
            "mfu": None if peak is None else tflops / peak, "memory_gib": memory_gib(),
            "step_time_s": dt, "data_wait_s": data_wait, "skipped": not ok,
            "elapsed_s": time.monotonic() - self.started, "eta_s": self._eta(dt),
            "skipped_total": p.skipped_total,
            "bad_samples": n_bad,  # skipped by the loader this step, all DP ranks
        }
        self.metrics.write(record)
        if p.consecutive_skips >= cfg.train.max_consecutive_skips:
            raise TrainingError(
                f"{p.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                f"(train.max_consecutive_skips={cfg.train.max_consecutive_skips}); stopping without "
                f"saving. The last good checkpoint is in {cfg.checkpoint.dir}; lower train.lr or "
                f"inspect the data around consumed sample {p.consumed_samples}")
        return record

    # -- checkpoints -----------------------------------------------------------------------
    def save(self) -> bool:
        """Write a checkpoint of this iteration (all ranks); False when there is nowhere to save."""
        cfg = self.cfg
        if not cfg.checkpoint.dir:
            return False
        if cfg.parallel.use_distributed_optimizer and cfg.parallel.overlap_param_gather:
            # The step updated only this rank's shard; the other shards arrive with the next
            # forward's pre-hooks. Gather them now, or the checkpoint holds stale weights.
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)
        if not ckpt.all_finite(self.model):
            raise TrainingError("the model has non-finite parameters; refusing to checkpoint it")
        meta = {"iteration": self.progress.iteration, "progress": asdict(self.progress),
                "consumed_samples": self.progress.consumed_samples,
                "scheduler": self.scheduler.state_dict(), "data": self.source.state_dict(),
                "layout": self.layout, "config": _config_dict(cfg)}
        t0 = time.perf_counter()
        path = ckpt.save(cfg.checkpoint.dir, self.model, self.optimizer, self.pgs, meta,
                         cfg.checkpoint.keep_last, async_queue=self.async_queue, lock=self.lock)
        log.info("%s checkpoint %s (%.1f s)", "scheduled" if self.async_queue else "saved", path,
                 time.perf_counter() - t0)
        return True

    def _published(self) -> None:
        """Wait until every scheduled (asynchronous) save is on disk and published."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        self.resume_or_init()
        cfg, p = self.cfg, self.progress
        if p.iteration >= cfg.train.train_iters:
            log.info("already trained %d of %d iterations; nothing to do", p.iteration, cfg.train.train_iters)
            self._exit_status("finished", "train.train_iters reached")
            return 0
        saved_at = p.iteration
        while p.iteration < cfg.train.train_iters:
            self.step()
            if self.async_queue is not None:
                self.async_queue.maybe_finalize_async_calls(blocking=False)
            reason = self.stop.should_stop(self.dev)
            if not reason and cfg.train.exit_interval and p.iteration % cfg.train.exit_interval == 0 \
                    and p.iteration < cfg.train.train_iters:
                reason = f"train.exit_interval ({cfg.train.exit_interval}) reached"
            finished = p.iteration == cfg.train.train_iters
            # Before a save on a stop, validate, except after SIGTERM (its grace is for the save).
            if validation_due(p.iteration, cfg.train.eval_interval, finished, bool(reason) and reason != URGENT):
                self.validate()
            due = p.iteration % cfg.checkpoint.save_interval == 0
            last = finished and cfg.checkpoint.save_at_end
            if (due or last or reason) and self.save():
                saved_at = p.iteration
            if reason:
                self._published()  # "stopped" means a checkpoint of this step is on disk
                if saved_at != p.iteration:  # no checkpoint.dir: a requeue would start over
                    log.warning("stopping at iteration %d: %s, without a checkpoint (checkpoint.dir "
                                "is not set): a restart starts from the beginning", p.iteration, reason)
                    self._exit_status("stopped_unsaved", reason)
                    return 0
                log.info("stopping at iteration %d: %s; resume by re-running the same command",
                         p.iteration, reason)
                self._exit_status("stopped", reason)
                return 0
        if saved_at != p.iteration:
            log.info("finished without a final checkpoint (checkpoint.save_at_end is false)")
        self._published()
        log.info("training finished: %d iterations, %d skipped; metrics in %s",
                 p.iteration, p.skipped_total, self.metrics.path)
        self._exit_status("finished", "train.train_iters reached")
        return 0

    def _exit_status(self, status: str, reason: str) -> None:
        """``run.dir/exit_status.json``: why the job ended (batch scripts requeue on "stopped"
        by a signal or time budget, not on "finished")."""
        if self.rank == 0:
            exit_status.write(self.cfg.run.dir, {"status": status, "reason": reason,
                                                 "iteration": self.progress.iteration,
                                                 "train_iters": self.cfg.train.train_iters})

    def close(self) -> None:
        if self.async_queue is not None:  # publish what is still being written
            self.async_queue.maybe_finalize_async_calls(blocking=True)
            self.async_queue.close()
        self.metrics.close()
        self.source.close()
        self.stop.restore()


def _config_dict(cfg: EmuConfig) -> dict:
    return asdict(cfg)


def train(cfg: EmuConfig, signals: StopSignals | None = None, verbose: bool = False) -> int:
    """Run the job on this rank; returns the exit code. Every failure leaves
    ``run.dir/exit_status.json`` with its reason (unexpected errors are then re-raised).
    ``verbose``: every library notice as printed (default: known ones said once,
    ``training/logs.py``)."""
    trainer = lock = None
    try:
        init_distributed(cfg.parallel.collective_timeout_s)
        logs.setup(torch.distributed.get_rank(), verbose)
        if cfg.checkpoint.dir:  # before anything is written: one job per checkpoint.dir
            lock = dir_lock.acquire(cfg.checkpoint.dir)
        trainer = Trainer(cfg, lock, signals)
        return trainer.run()
    except dir_lock.DirLockError as e:  # run.dir belongs to the job that holds the lock
        log.error("%s", e)
        return 1
    except (TrainingError, ckpt.CheckpointError, ckpt.CheckpointFileError, BadDataError) as e:
        log.error("%s", e)
        _record_failure(cfg, trainer, str(e))
        return 1
    except BaseException as e:
        _record_failure(cfg, trainer, f"{type(e).__name__}: {e}")
        raise
    finally:
        if trainer is not None:
            trainer.close()
        if lock is not None:
            lock.release()
        destroy()


def _record_failure(cfg: EmuConfig, trainer: Trainer | None, reason: str) -> None:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))
    extra = {} if trainer is None else {"iteration": trainer.progress.iteration}
    exit_status.write_failure(cfg.run.dir, (reason.strip().splitlines() or [""])[0], rank,
                              train_iters=cfg.train.train_iters, **extra)
