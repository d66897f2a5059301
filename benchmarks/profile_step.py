#!/usr/bin/env python
"""Where a training step's time goes: data loading, forward, backward, optimizer, for a config.

    python benchmarks/profile_step.py [configs/quickstart.yaml] [--iters 30] [--warmup 5] [key=value ...]

Runs the training data stream and model of the config (as engine.train builds them) for `--iters` steps
after `--warmup`, timing each phase with perf_counter (CPU: synchronous), and prints a Markdown table of the
median seconds per phase, plus torch's thread settings. No checkpoint or output folder is written.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_intermixed_args(argv)

    import torch

    from gains.config import load_config
    from gains.data import build_dataset
    from gains.optim import build_lr_scheduler, build_optimizer
    from gains.train_step import to_device
    from gains.model import build_model
    from gains.sampling import build_train_loader

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(int(cfg.seed))
    dataset = build_dataset(cfg, "train", is_train=True)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    loader = build_train_loader(dataset, images_per_rank=int(cfg.solver.ims_per_batch), seed=int(cfg.seed),
                                rank=0, world_size=1, start_iter=0, num_workers=int(cfg.data.num_workers))
    phases = {"data": [], "forward": [], "backward": [], "optimizer": [], "step": []}
    batches = iter(loader)
    for it in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        images, targets = to_device(*next(batches), torch.device("cpu"))
        t1 = time.perf_counter()
        losses = model(images, targets)
        total = sum(losses.values())
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        t3 = time.perf_counter()
        optimizer.step()
        scheduler.step()
        t4 = time.perf_counter()
        if it >= args.warmup:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                phases[name].append(seconds)
    print(f"### one training step of {args.config} {' '.join(args.overrides)}\n")
    print(f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, inter-op "
          f"{torch.get_num_interop_threads()}, data workers {cfg.data.num_workers}, batch "
          f"{cfg.solver.ims_per_batch}; median of {args.iters} steps after {args.warmup}\n")
    print("| phase | median s | share |")
    print("|---|---|---|")
    step = statistics.median(phases["step"])
    for name, values in phases.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.3f} | {100 * m / step:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
