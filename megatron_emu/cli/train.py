"""``megatron-emu-train --config FILE.yaml [--set dotted.key=value ...] [--dry-run [--json]]``.

The config is loaded strictly and validated (every problem at once, each naming its field)
before any process group starts (and the data directories are checked). Without
``--dry-run`` it trains (run under torchrun / srun; a restart resumes from ``latest``).
``--dry-run`` prints the parameter and memory plan of the
configured layout without GPUs, process groups or data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_emu.config.io import ConfigError, load_config
from megatron_emu.config.validate import validate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-emu-train", description=__doc__,
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
                   "(for batch scripts)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, None if (args.dry_run or args.get) else world)
    except ConfigError as e:
        print(f"megatron-emu-train: {e}", file=sys.stderr)
        return 2
    if args.get:
        from megatron_emu.config.io import to_dict

        value = to_dict(cfg)
        for part in args.get.split("."):
            if not isinstance(value, dict) or part not in value:
                print(f"megatron-emu-train: --get {args.get}: no such config key", file=sys.stderr)
                return 2
            value = value[part]
        print(json.dumps(value) if isinstance(value, (dict, list)) else value)
        return 0
    if args.dry_run:
        from megatron_emu.planner import format_plan, plan

        report = plan(cfg)
        print(json.dumps(report, indent=2) if args.json else format_plan(report))
        return 0
    from megatron_emu.config.validate import data_path_errors

    errors = data_path_errors(cfg)
    if errors:
        print(f"megatron-emu-train: {ConfigError(errors)}", file=sys.stderr)
        return 2
    from megatron_emu.training.loop import train

    return train(cfg, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
