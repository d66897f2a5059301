#!/usr/bin/env python
"""Where a training step's time goes: data loading, forward (by module), backward, optimizer, for a config.

    python benchmarks/profile_step.py [configs/quickstart.yaml] [--iters 30] [--warmup 5]
        [--weights runs/quickstart/model_final.pth] [--ops 25] [key=value ...]

Runs the training data stream and model of the config (as engine.train builds them, with its `solver.amp`
and `solver.channels_last`) for `--iters` steps after `--warmup`, timing each phase with perf_counter
(CPU: synchronous), and prints a Markdown table of the median seconds per phase, the forward time of each
part of the model, the number of RoIs the mask head (and the ALRM branch) ran on per step, and torch's thread
settings; `--ops N` adds torch.profiler's N costliest operators. No checkpoint or output folder is written.

The cost of a step depends on how far training is: the mask head and the anomaly branch run on every
foreground RoI, and a trained RPN proposes many more of them than a fresh one. `--weights` starts from a
checkpoint's weights (those whose names and shapes fit) so the steady state of a run is measured, not its
first iterations.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def time_modules(model, names: list[str]) -> tuple[dict[str, list[float]], list[int]]:
    """Forward hooks: seconds per call of each named submodule (appended per step) and the mask head's RoIs."""
    seconds: dict[str, list[float]] = defaultdict(list)
    mask_rois: list[int] = []
    for name in names:
        module = model.get_submodule(name)
        started: list[float] = []
        module.register_forward_pre_hook(lambda m, args, s=started: s.append(time.perf_counter()))
        module.register_forward_hook(lambda m, args, out, s=started, n=name:
                                     seconds[n].append(time.perf_counter() - s.pop()))
    model.roi_heads.mask_head.register_forward_pre_hook(lambda m, args: mask_rois.append(len(args[0])))
    return seconds, mask_rois


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--weights", help="start from this checkpoint's weights (steady state of a trained run)")
    p.add_argument("--ops", type=int, default=0, metavar="N",
                   help="also run torch.profiler over the timed steps and print its N costliest operators")
    args = p.parse_intermixed_args(argv)

    import torch

    from gains.checkpoint import load_weights_for_finetune
    from gains.config import load_config
    from gains.data import build_dataset
    from gains.model import build_model
    from gains.optim import build_lr_scheduler, build_optimizer, prepare_fused_sgd, use_fused_sgd
    from gains.precision import autocast, resolve_amp
    from gains.sampling import build_train_loader
    from gains.train_step import to_device

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(int(cfg.seed))
    dataset = build_dataset(cfg, "train", is_train=True)
    model = build_model(cfg).train()
    if args.weights:  # every tensor whose name and shape fit, as init_weights does
        report = load_weights_for_finetune(model, args.weights)
        print(f"weights: {len(report.loaded)} of {len(model.state_dict())} tensors from {args.weights}\n")
    if cfg.solver.channels_last:  # as engine._set_up: 4-D weights NHWC, activations follow them
        model.to(memory_format=torch.channels_last)
    amp = resolve_amp(cfg.solver.amp, torch.device("cpu"))  # CPU: bf16 autocast, no GradScaler
    fused = use_fused_sgd(torch.device("cpu"))  # as engine._set_up on the CPU
    optimizer = build_optimizer(cfg, model, fused=fused)
    prepare_fused_sgd(optimizer, fused=fused)
    scheduler = build_lr_scheduler(cfg, optimizer)
    if args.weights:  # a trained model: the warm-up's first, tiny learning rates are not what it would see
        for group in optimizer.param_groups:
            group["lr"] = float(cfg.solver.base_lr) * float(cfg.solver.gamma) ** len(cfg.solver.steps)
    parts = [n for n in ("backbone", "rpn", "roi_heads.box_head", "roi_heads.mask_head", "roi_heads.alrm")
             if _has(model, n)]
    module_seconds, mask_rois = time_modules(model, parts)
    loader = build_train_loader(dataset, images_per_rank=int(cfg.solver.ims_per_batch), seed=int(cfg.seed),
                                rank=0, world_size=1, start_iter=0, num_workers=int(cfg.data.num_workers))
    phases = {"data": [], "forward": [], "backward": [], "optimizer": [], "step": []}
    batches = iter(loader)
    profiler = None
    for it in range(args.warmup + args.iters):
        if it == args.warmup:
            module_seconds.clear()
            mask_rois.clear()
            if args.ops:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiler.start()
        t0 = time.perf_counter()
        images, targets = to_device(*next(batches), torch.device("cpu"))
        t1 = time.perf_counter()
        with autocast(amp, torch.device("cpu")):
            losses = model(images, targets)
        total = sum(losses.values())
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        t3 = time.perf_counter()
        optimizer.step()
        if not args.weights:
            scheduler.step()
        t4 = time.perf_counter()
        if it >= args.warmup:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                phases[name].append(seconds)
    if profiler is not None:  # its own overhead inflates the phases above a little
        profiler.stop()
    layout = ", channels_last" if cfg.solver.channels_last else ""
    print(f"### one training step of {args.config} {' '.join(args.overrides)}\n")
    print(f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, inter-op "
          f"{torch.get_num_interop_threads()}, data workers {cfg.data.num_workers}, batch "
          f"{cfg.solver.ims_per_batch}, precision {amp.name}{layout}; median of {args.iters} steps after "
          f"{args.warmup}; mask-head RoIs per step: {statistics.mean(mask_rois):.0f} (min {min(mask_rois)}, max {max(mask_rois)})\n")
    print("| phase | median s | share |")
    print("|---|---|---|")
    step = statistics.median(phases["step"])
    for name, values in phases.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.3f} | {100 * m / step:.0f} % |")
    for name in parts:
        m = statistics.median(module_seconds[name]) if module_seconds[name] else 0.0  # one call per step
        print(f"| forward: {name} | {m:.3f} | {100 * m / step:.0f} % |")
    if profiler is not None:
        print(f"\n### the {args.ops} costliest operators (torch.profiler, self CPU time over {args.iters} steps)\n")
        print("```")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
        print("```")
    return 0


def _has(model, name: str) -> bool:
    """Whether the model has that submodule (the ALRM branch exists only in modes gains / branch_only)."""
    import torch

    try:
        return isinstance(model.get_submodule(name), torch.nn.Module)
    except AttributeError:
        return False


if __name__ == "__main__":
    sys.exit(main())
