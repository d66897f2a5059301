"""Training: the loop of `train(cfg)`, its set-up (model, data stream, optimizer, resume) and the points
where it saves checkpoints and evaluates.

The loop in `_train_loop` is meant to be read top to bottom (detectron2's plain_train_net.py is the model): no
hooks, no registries. Iterations are counted, not epochs; "iteration n" in file names, logs and checkpoints
is the number of COMPLETED optimizer steps, so `model_0002000.pth` holds the weights after 2000 steps and
resuming from it runs step index 2000 next. The parts it calls: gains.optim (SGD, LR schedule),
gains.train_step (device copies, backward + update, the non-finite check), gains.train_log (metrics.jsonl,
log lines), gains.precision (`solver.amp`), gains.sampling (the data stream), gains.checkpoint.

Reproducibility. Three random streams matter, and each is made a pure function of the config:
- data order: one global stream of per-epoch permutations seeded by (seed, epoch); rank r of W takes every
  W-th element, so a global batch holds the same images whatever the number of processes;
- data augmentation: every sample draws its resize/flip from generators seeded by (seed, its position in
  that global stream), so it does not depend on the worker, the rank, or on where a run was resumed;
- everything else in the process (RPN/RoI sampling, dropout): seeded with seed + rank, and saved in the
  checkpoints so that `--resume` continues the same stream.
With `deterministic: true` on CPU, a resumed run therefore ends with bitwise the same weights.

Each step reads its losses on the host once (gains.train_step.check_losses): a NaN or inf loss stops the run
before that step's backward, with the weights and checkpoints of the step before. The log line's means are
summed on the device (LossWindow) and read once per `solver.log_period`. Mixed precision (`solver.amp`):
bf16 autocast where it is native (CPU, Ampere and later), fp16 with a GradScaler otherwise; box arithmetic
and losses stay float32.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from . import dist
from .checkpoint import (find_last_checkpoint, load_checkpoint, load_weights_for_finetune, make_checkpoint,
                         save_checkpoint, unwrap_model, write_last_checkpoint)
from .config import dump_config
from .data import build_dataset, collate
from .devices import configure_determinism, resolve_device
from .errors import ConfigError
from .evaluation import evaluate_model
from .model import build_model, check_backbone_init
from .optim import build_lr_scheduler, build_optimizer, prepare_fused_sgd, use_fused_sgd
from .precision import AmpMode, autocast, parse_amp, resolve_amp
from .rng import capture_rng_state, preserved_rng_state, restore_rng_state, seed_process
from .sampling import build_train_loader
from .train_log import LossWindow, MetricsLog, WindowMeter, log_file, log_line, progress_bar
from .train_step import backward_and_step, check_losses, to_device

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- checks

def check_batch_size(ims_per_batch: int, world_size: int) -> int:
    """Images per process for a global batch of `ims_per_batch`; raises ConfigError unless divisible."""
    if ims_per_batch < 1 or ims_per_batch % world_size != 0:
        raise ConfigError(f"solver.ims_per_batch={ims_per_batch} must be a positive multiple of the number of "
                          f"processes ({world_size}); set solver.ims_per_batch to a multiple of {world_size} "
                          f"or change --nproc_per_node")
    return ims_per_batch // world_size


def check_solver(s) -> None:
    """Reject solver values that would crash or mislead mid-run (zero periods, unsorted steps) up front."""
    for key in ("max_iter", "log_period", "checkpoint_period"):
        if int(s[key]) < 1:
            raise ConfigError(f"solver.{key} must be >= 1, got {s[key]}")
    if int(s.eval_period) < 0 or int(s.warmup_iters) < 0:
        raise ConfigError("solver.eval_period and solver.warmup_iters must be >= 0")
    if list(s.steps) != sorted(s.steps):
        raise ConfigError(f"solver.steps must be increasing, got {list(s.steps)}")
    parse_amp(s.amp)
    for key in ("channels_last", "cudnn_benchmark"):
        if not isinstance(s[key], bool):
            raise ConfigError(f"solver.{key} must be true or false, got {s[key]!r}")



# ----------------------------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    """What `train` leaves behind: the final checkpoint, the iterations done, the last evaluation."""

    final_checkpoint: Path | None
    iterations: int
    eval_results: dict | None


@dataclass
class TrainingRun:
    """Everything the loop touches, built by `_set_up`: the (DDP-wrapped) model, its optimizer, schedule
    and scaler, the precision, the data loader, and where the run writes."""

    cfg: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: AmpMode
    device: torch.device
    fused_sgd: bool  # one fused SGD kernel per step (on the CPU, where it is faster; see optim.use_fused_sgd)
    output_dir: Path
    category_map: dict | None
    start_iter: int = 0
    loader: torch.utils.data.DataLoader | None = None


def train(cfg, resume: bool = False, *, model: nn.Module | None = None, dataset: Dataset | None = None,
          collate_fn: Callable | None = None) -> TrainResult:
    """Train `build_model(cfg)` on the training split for `solver.max_iter` iterations.

    Works unchanged as one process or under torchrun (DDP). `resume`: continue from
    `output_dir/last_checkpoint` (model, optimizer, scheduler, scaler, iteration, RNG states); without a
    checkpoint it starts from scratch. `model`/`dataset`/`collate_fn` replace the config-built ones (tests,
    notebooks); the dataset's items follow the gains.data contract and the model returns a loss dict.
    Raises FloatingPointError when a loss becomes NaN/inf (nothing of that step is saved), and ConfigError
    before any work for a config-built frozen-BN backbone without weights (gains.model.check_backbone_init).
    """
    check_solver(cfg.solver)
    if model is None:
        check_backbone_init(cfg)  # before any work: frozen BN on a random ResNet is refused (or allowed)
    info = dist.init_distributed()
    images_per_rank = check_batch_size(int(cfg.solver.ims_per_batch), info.world_size)
    device = resolve_device(cfg.device, info.local_rank)
    configure_determinism(bool(cfg.deterministic), device)
    seed_process(int(cfg.seed) + info.rank)
    output_dir = Path(cfg.output_dir)
    with log_file(output_dir, enabled=dist.is_main_process()):
        run, train_set = _set_up(cfg, model, dataset, device, output_dir)
        _resume_or_start(run, resume, info)
        _distribute(run, info, images_per_rank, train_set, collate_fn)
        return _train_loop(run)


def _train_loop(run: TrainingRun) -> TrainResult:
    """The loop: load, forward, check the losses (host), backward, update; then log, checkpoint and evaluate
    on their periods."""
    cfg, s, model, device = run.cfg, run.cfg.solver, run.model, run.device
    max_iter, start_iter = int(s.max_iter), run.start_iter
    if start_iter >= max_iter:
        logger.info("training already finished (%d >= solver.max_iter=%d)", start_iter, max_iter)
        return TrainResult(find_last_checkpoint(run.output_dir), start_iter, None)
    main = dist.is_main_process()
    metrics = MetricsLog(run.output_dir / "metrics.jsonl", start_iter, enabled=main)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    host_targets = bool(getattr(unwrap_model(model), "takes_host_targets", False))
    meter, window = WindowMeter(), LossWindow()  # host timings; losses summed on the device
    dropped_fragments = 0  # instances cut by data.crop_size below data.crop_min_area, per log period
    logger.info("training %d -> %d iterations, %d image(s) per step on %d process(es), device %s",
                start_iter, max_iter, int(s.ims_per_batch), dist.get_world_size(), device)
    progress_ctx, progress = progress_bar(start_iter, max_iter, enabled=main and sys.stderr.isatty())
    with progress_ctx:
        data_iter = iter(run.loader)
        for it in range(start_iter, max_iter):
            t_start = time.perf_counter()
            images, targets = next(data_iter)
            dropped_fragments += sum(int(t.get("dropped_fragments", 0)) for t in targets)
            images, targets = to_device(images, targets, device, move_targets=not host_targets)
            t_data = time.perf_counter() - t_start
            with autocast(run.amp, device):
                loss_dict = model(images, targets)
            names = tuple(sorted(loss_dict))
            values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])
            check_losses(it + 1, names, values, metrics, run.output_dir)  # NaN/inf: stops before the backward
            lr = run.optimizer.param_groups[0]["lr"]
            backward_and_step(sum(loss_dict.values()), run.optimizer, run.scaler, params, float(s.clip_grad_norm))
            run.scheduler.step()
            done = it + 1

            window.update(names + ("total_loss",), torch.cat([values, values.sum().reshape(1)]))
            meter.update({"time": time.perf_counter() - t_start, "data_time": t_data})
            progress.update(1)
            log_now = done % int(s.log_period) == 0 or done == max_iter
            save_now = done % int(s.checkpoint_period) == 0 and done < max_iter
            eval_now = int(s.eval_period) > 0 and done % int(s.eval_period) == 0
            if log_now:
                _log(run, done, lr, meter, window, metrics, progress, dropped_fragments)
                dropped_fragments = 0
            if save_now:
                _save(run, f"model_{done:07d}.pth", done)
            if eval_now:
                _evaluate(run, "val", f"eval_{done:07d}", done, metrics)

    final = _save(run, "model_final.pth", max_iter)
    eval_results = None
    if cfg.test.eval_at_end:
        split = str(cfg.test.split)
        eval_results = _evaluate(run, split, f"eval_final_{split}", max_iter, metrics)
    dist.barrier()
    return TrainResult(final, max_iter, eval_results)


# ----------------------------------------------------------------------------------------------- set-up

def _set_up(cfg, model: nn.Module | None, dataset: Dataset | None, device: torch.device,
            output_dir: Path) -> tuple[TrainingRun, Dataset]:
    """(run, training set): the config's model (or the given one) on `device` with its optimizer, LR
    schedule, scaler and precision, and the config's training split (or the given data set). The resolved
    config is written to output_dir/config.yaml (rank 0)."""
    s = cfg.solver
    if dist.is_main_process():
        dump_config(cfg, output_dir / "config.yaml")
    model = model if model is not None else build_model(cfg)
    dataset = dataset if dataset is not None else build_dataset(cfg, "train", is_train=True)
    model.to(device).train()
    if s.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D weights NHWC; activations follow them
    if device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = bool(s.cudnn_benchmark)
    amp = resolve_amp(s.amp, device)
    fused_sgd = use_fused_sgd(device)
    optimizer = build_optimizer(cfg, model, fused=fused_sgd)
    logger.info("precision %s%s%s", amp.name, " + GradScaler" if amp.use_scaler else "",
                ", channels_last" if s.channels_last else "")
    run = TrainingRun(cfg=cfg, model=model, optimizer=optimizer, scheduler=build_lr_scheduler(cfg, optimizer),
                      scaler=torch.amp.GradScaler(device.type, enabled=amp.use_scaler), amp=amp, device=device,
                      fused_sgd=fused_sgd, output_dir=output_dir,
                      category_map=dataset.category_map.to_dict() if hasattr(dataset, "category_map") else None)
    return run, dataset


def _resume_or_start(run: TrainingRun, resume: bool, info: dist.DistInfo) -> None:
    """`--resume`: restore model, optimizer, scheduler, scaler, iteration and RNG states from the newest
    checkpoint of output_dir. Otherwise start fresh (forgetting an earlier run's checkpoints) from
    `init_weights` when given."""
    output_dir, cfg = run.output_dir, run.cfg
    last = find_last_checkpoint(output_dir) if resume else None
    if last is not None:
        ckpt = load_checkpoint(last, run.model, run.optimizer, run.scheduler, run.scaler, config=cfg)
        run.start_iter = int(ckpt["iteration"])
        states = ckpt.get("rng_states") or []
        if len(states) == info.world_size:
            restore_rng_state(states[info.rank])
        else:
            logger.warning("%s was written by %d process(es), this run has %d: weights, optimizer and data "
                           "order resume exactly, RPN/RoI sampling restarts from seed + rank",
                           last, len(states), info.world_size)
        logger.info("resumed from %s at iteration %d", last, run.start_iter)
    else:
        if resume:
            logger.info("--resume: no checkpoint in %s; starting from scratch", output_dir)
        elif dist.is_main_process() and (output_dir / "last_checkpoint").exists():
            logger.warning("%s holds checkpoints of an earlier run; they will be overwritten (use --resume "
                           "to continue that run instead)", output_dir)
            (output_dir / "last_checkpoint").unlink()
        if cfg.init_weights:
            load_weights_for_finetune(run.model, cfg.init_weights)
    prepare_fused_sgd(run.optimizer, fused=run.fused_sgd)
    dist.barrier()  # nobody trains before rank 0 has dealt with the output folder


def _distribute(run: TrainingRun, info: dist.DistInfo, images_per_rank: int, dataset: Dataset,
                collate_fn: Callable | None) -> None:
    """Wrap the model in DDP when several processes run, and build this rank's endless data loader from
    the run's start iteration."""
    if info.world_size > 1:
        # Every parameter gets a gradient each step (losses use `x.sum() * 0` for empty cases), so DDP
        # needs no find_unused_parameters; buffers (frozen BN statistics) are not broadcast each step.
        run.model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            broadcast_buffers=False)
    run.loader = build_train_loader(dataset, images_per_rank=images_per_rank, seed=int(run.cfg.seed),
                                    rank=info.rank, world_size=info.world_size, start_iter=run.start_iter,
                                    num_workers=int(run.cfg.data.num_workers), collate_fn=collate_fn or collate,
                                    pin_memory=run.device.type == "cuda")


# ----------------------------------------------------------------------------------------------- loop steps

def _log(run: TrainingRun, done: int, lr: float, meter: WindowMeter, window: LossWindow, metrics: MetricsLog,
         progress, dropped_fragments: int) -> None:
    """One metrics.jsonl record and log line: mean losses and timings of the window since the last one."""
    count, t_sync = meter.count, time.perf_counter()
    losses = window.pop_means()  # waits for the device: its time is part of the window's steps
    means = meter.pop_means()
    means["time"] += (time.perf_counter() - t_sync) / max(count, 1)
    max_iter = int(run.cfg.solver.max_iter)
    record = {"iter": done, **losses, **means, "lr": lr, "eta_seconds": means["time"] * (max_iter - done)}
    if run.cfg.data.crop_size:
        record["dropped_fragments"] = dropped_fragments
    if run.device.type == "cuda":
        record["max_mem_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    metrics.write(record)
    log_line(record, max_iter, progress)


def _save(run: TrainingRun, name: str, iteration: int) -> Path:
    """Checkpoint `output_dir/name` on rank 0 (RNG states of all ranks gathered first: a collective, so
    every rank calls) and point last_checkpoint at it."""
    rng_states = dist.all_gather_object(capture_rng_state())
    path = run.output_dir / name
    if dist.is_main_process():
        state = make_checkpoint(run.model, run.optimizer, run.scheduler, run.scaler, iteration=iteration,
                                config=run.cfg, category_map=run.category_map, rng_states=rng_states)
        save_checkpoint(state, path)
        write_last_checkpoint(run.output_dir, name)
        logger.info("saved %s", path)
    return path


def _evaluate(run: TrainingRun, split: str, folder: str, iteration: int, metrics: MetricsLog) -> dict | None:
    """`run_evaluation` into output_dir/folder, its results appended to metrics.jsonl."""
    results = run_evaluation(run.model, run.cfg, split, run.output_dir / folder)
    if results is not None:
        metrics.write({"iter": iteration, "split": split, "eval": results})
    return results


def run_evaluation(model: nn.Module, cfg, split: str, output_dir: Path) -> dict | None:
    """gains.evaluation.evaluate_model(model, cfg, split, output_dir) on every rank (it shards the data
    itself). The model is put in eval mode for the call and back afterwards; the global random generators
    are left as they were, so evaluating does not change the training that follows."""
    bare = unwrap_model(model)
    was_training = bare.training
    bare.eval()
    try:
        with torch.no_grad(), preserved_rng_state():
            results = evaluate_model(bare, cfg, split, str(output_dir))
    finally:
        bare.train(was_training)
    if results:  # the full table was printed by the evaluator; metrics.json holds everything
        logger.info("evaluation on %s: mAP %.2f, AJI %.4f -> %s/metrics.json", split,
                    results.get("mAP") or 0.0, results.get("aji") or 0.0, output_dir)
    return results
