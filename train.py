"""Train GAInS / Mask R-CNN.

    python train.py                      # = configs/quickstart.yaml: synthetic data, CPU (9-14 min on 2 cores)
    python train.py CONFIG [key=value ...] [--resume]
    python train.py CONFIG [key=value ...] --print-config     # the resolved, checked config; nothing runs
    torchrun --nproc_per_node=2 train.py CONFIG [key=value ...] [--resume]

`key=value` overrides any config key (`solver.base_lr=0.01 output_dir=runs/x`); `--resume` continues from
the last checkpoint in output_dir. Everything else lives in gains/engine.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from gains import dist
from gains.cli_errors import one_line
from gains.config import load_config
from gains.errors import CheckpointError, ConfigError, DataError, EvaluationError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                        help="YAML config, e.g. configs/isbi_r50.yaml (default: configs/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--resume", action="store_true",
                        help="continue from output_dir/last_checkpoint (starts fresh when there is none)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, checked) as YAML and exit")
    args = parser.parse_intermixed_args(argv)
    if "=" in args.config and not args.config.endswith((".yaml", ".yml")):  # `train.py key=value` alone
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))  # known before the process group exists
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from gains.engine import train  # here: the model stack loads after the arguments are checked
    finished = False  # every rank got through: leave the group together (a barrier), else just leave
    try:
        train(cfg, resume=args.resume)
        finished = True
    except (ConfigError, CheckpointError, DataError, EvaluationError, FloatingPointError) as e:
        # Errors whose message says what to fix: print it without a traceback.
        if rank == 0:
            print(f"train.py: error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_distributed(synchronize=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
