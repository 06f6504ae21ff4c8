"""``megatron-emu-train --config FILE.yaml [--set dotted.key=value ...] [--dry-run [--json]]``.

The config is loaded strictly and validated (every problem at once, each naming its field)
before any process group starts (and the data directories are checked). Without
``--dry-run`` it trains: under ``megatron-emu-launch`` / torchrun (a restart resumes from
``latest``), or, started alone, as one process when the layout needs only one.
``--dry-run`` prints the parameter and memory plan of the configured layout without GPUs,
process groups or data. ``--check-launch --nnodes N --nproc-per-node P`` checks the config,
the data and the layout against a launch of N x P processes (what slurm/pretrain.sbatch runs
before starting any node).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from megatron_emu.config.io import ConfigError, load_config
from megatron_emu.config.validate import validate

PROG = "megatron-emu-train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML preset (examples/configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print parameters per component/stage and memory per GPU, then exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    p.add_argument("--verbose", action="store_true", help="show every library notice and warning as "
                   "printed (default: known megatron-core / torch notices are said once)")
    p.add_argument("--get", metavar="KEY", help="print one resolved config value (e.g. run.dir) and exit "
                   "(for batch scripts; after the checks of --check-launch when given)")
    p.add_argument("--check-launch", action="store_true",
                   help="check config, data and layout for --nnodes x --nproc-per-node processes, then exit")
    p.add_argument("--nnodes", type=int, default=1, help="with --check-launch: nodes (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="with --check-launch: processes per node (default 1)")
    return p


def _fail(errors: list[str]) -> int:
    for e in errors:
        print(f"{PROG}: {e}", file=sys.stderr)
    return 2


def _launch_errors(cfg, nnodes: int, nproc: int) -> list[str]:
    """The layout against ``nnodes x nproc`` processes, in the words of the one who launches."""
    from megatron_emu.config.validate import config_errors

    world, par = nnodes * nproc, cfg.parallel
    tp, pp, dp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.data_parallel_size
    if nnodes < 1 or nproc < 1:
        return [f"--nnodes ({nnodes}) and --nproc-per-node ({nproc}, NPROC_PER_NODE) must be >= 1"]
    errors = []
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    if gpus and gpus.isdigit() and int(gpus) and nproc > int(gpus):
        errors.append(f"{nproc} processes per node (NPROC_PER_NODE) but the node has {gpus} GPU(s)")
    if world % (tp * pp) or (dp is not None and dp * tp * pp != world):
        need = f"TP {tp} x PP {pp}" + (f" x DP {dp} = {dp * tp * pp}" if dp else f" = {tp * pp} (or a multiple)")
        errors.append(f"{nnodes} node(s) x {nproc} process(es) per node = world size {world} does not fit "
                      f"the layout {need}; change --nodes, NPROC_PER_NODE (default: the node's GPU "
                      f"count, 1 on CPU nodes) or parallel.*")
    else:
        errors += config_errors(cfg, world)
    return errors


def _standalone(cfg, argv: list[str]) -> list[str]:
    """Started without torchrun: one process with its own process group when the layout needs
    only one (the environment torchrun would set); otherwise how to launch it."""
    par = cfg.parallel
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    if tasks.isdigit() and int(tasks) > 1:
        return [f"started by srun as {tasks} tasks without a launcher: run one `python -m "
                f"megatron_emu.launch --nproc-per-node N ...` per node (see slurm/pretrain.sbatch)"]
    need = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * (par.data_parallel_size or 1)
    if need > 1:
        cmd = " ".join(shlex.quote(a) for a in argv)
        return [f"this layout needs {need} processes (TP {par.tensor_model_parallel_size} x PP "
                f"{par.pipeline_model_parallel_size} x DP {par.data_parallel_size or 1}); start it with "
                f"`python -m megatron_emu.launch --standalone --nproc-per-node {need} -m megatron_emu.train "
                f"{cmd}` (or slurm/pretrain.sbatch)"]
    from megatron_emu.parallel.local_launch import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    return []


def main(argv: list[str] | None = None) -> int:
    """The ``megatron-emu-train`` entry point (``argv`` None: the process's own arguments; a
    caller that passes ``argv`` keeps its signal handlers afterwards)."""
    entry_point = argv is None
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    signals = None
    if not (args.dry_run or args.get or args.check_launch):
        # First thing: from here a stop signal is kept (and one held back by the launcher is
        # delivered), also while the model is built or a checkpoint loaded.
        from megatron_emu.utils.stop_signals import StopSignals

        signals = StopSignals().install()
    try:
        return _main(args, argv, signals)
    finally:
        if signals is not None:
            signals.ignore_from_now() if entry_point else signals.restore()


def _main(args, argv: list[str], signals) -> int:
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    # Under a launcher every rank finds the same problems: rank 0 reports them, once.
    quiet = os.environ.get("RANK", "0") != "0"
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check_launch:
            from megatron_emu.config.validate import data_path_errors

            errors = _launch_errors(cfg, args.nnodes, args.nproc_per_node) + data_path_errors(cfg)
            if errors:
                return _fail(errors)
        elif args.dry_run or args.get:
            validate(cfg)
        else:
            if world is None:  # not under a launcher
                errors = _standalone(cfg, argv)
                if errors:
                    return _fail(errors)
                world = 1
            validate(cfg, world)
    except ConfigError as e:
        return 2 if quiet else _fail([str(e)])
    if args.get:
        from megatron_emu.config.io import to_dict

        value = to_dict(cfg)
        for part in args.get.split("."):
            if not isinstance(value, dict) or part not in value:
                print(f"{PROG}: --get {args.get}: no such config key", file=sys.stderr)
                return 2
            value = value[part]
        print(json.dumps(value) if isinstance(value, (dict, list)) else value)
        return 0
    if args.check_launch:
        return 0
    if args.dry_run:
        from megatron_emu.planner import format_plan, plan
        from megatron_emu.training.build import plan_spec

        report = plan(plan_spec(cfg))
        print(json.dumps(report, indent=2) if args.json else format_plan(report))
        return 0
    from megatron_emu.config.validate import data_path_errors

    errors = data_path_errors(cfg)
    if errors:
        return 2 if quiet else _fail(errors)
    from megatron_emu.compat import setup_process
    from megatron_emu.compat.version import UnsupportedMegatronError

    try:
        setup_process()  # before megatron-core is imported: the CPU layer on a machine without CUDA
    except UnsupportedMegatronError as e:
        return 2 if quiet else _fail([str(e)])
    from megatron_emu.training.loop import train

    rc = train(cfg, signals, verbose=args.verbose)
    # The process ends now: spare it the interpreter's last garbage collection, which walks every
    # torch/megatron object for seconds (time taken from SLURM's KillWait after a SIGTERM).
    import gc

    gc.freeze()
    return rc


if __name__ == "__main__":
    sys.exit(main())
