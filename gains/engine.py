"""Training: optimizer, LR schedule, the training data stream, and the training loop (`train`).

The loop in `train()` is meant to be read top to bottom (detectron2's plain_train_net.py is the model): no
hooks, no registries. Iterations are counted, not epochs; "iteration n" in file names, logs and checkpoints
is the number of COMPLETED optimizer steps, so `model_0002000.pth` holds the weights after 2000 steps and
resuming from it runs step index 2000 next.

Reproducibility. Three random streams matter, and each is made a pure function of the config:
- data order: one global stream of per-epoch permutations seeded by (seed, epoch); rank r of W takes every
  W-th element, so a global batch holds the same images whatever the number of processes;
- data augmentation: every sample draws its resize/flip from generators seeded by (seed, its position in
  that global stream), so it does not depend on the worker, the rank, or on where a run was resumed;
- everything else in the process (RPN/RoI sampling, dropout): seeded with seed + rank, and saved in the
  checkpoints so that `--resume` continues the same stream.
With `deterministic: true` on CPU, a resumed run therefore ends with bitwise the same weights.

The step on a GPU waits for nothing between log points: the losses are summed on the device (LossWindow)
and read once per `solver.log_period`; the non-finite check runs there too (NonFiniteGuard: from the first
non-finite loss on, the updates are skipped inside fused SGD / the GradScaler, and the run stops at the next
log, checkpoint or evaluation point with the usual message, the weights being those before the bad step).
On the CPU the check stays on the host every step (free there: no device to wait for), so CPU runs, their
numerics and their tests are unchanged. Mixed precision (`solver.amp`): bf16 autocast where it is native
(CPU, Ampere and later), fp16 with a GradScaler otherwise; box arithmetic and losses stay float32.
"""
from __future__ import annotations

import bisect
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from . import dist
from .checkpoint import (capture_rng_state, find_last_checkpoint, load_checkpoint, load_weights_for_finetune,
                         make_checkpoint, preserved_rng_state, restore_rng_state, save_checkpoint,
                         unwrap_model, write_last_checkpoint, write_text_atomic)
from .config import ConfigError, dump_config
from .sampling import build_train_loader, list_collate
from .sparse_maps import SparseMaps

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


# ----------------------------------------------------------------------------------------------- set-up

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`device` config value -> torch.device; with CUDA each process uses GPU `local_rank`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """`deterministic: true` -> deterministic kernels only (an op without one raises, naming itself)."""
    if not deterministic:
        return
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace to be deterministic; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def seed_process(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python `random` and numpy's global generator of this process."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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


# ----------------------------------------------------------------------------------------------- precision

_AMP_VALUES = {False: "off", None: "off", "false": "off", "off": "off", "fp32": "off",
               True: "auto", "true": "auto", "on": "auto",
               "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


def parse_amp(value) -> str:
    """`solver.amp` -> "off" | "auto" | "bf16" | "fp16" (false / true / bf16 / fp16; ConfigError otherwise)."""
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        key = {0: False, 1: True}.get(key, key)
    if key not in _AMP_VALUES:
        raise ConfigError(f"solver.amp must be false, true, bf16 or fp16, got {value!r}")
    return _AMP_VALUES[key]


@dataclass(frozen=True)
class AmpMode:
    """Resolved mixed precision: autocast dtype (None = off) and whether a GradScaler is needed (fp16)."""

    dtype: torch.dtype | None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def use_scaler(self) -> bool:
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_amp(value, device: torch.device) -> AmpMode:
    """`solver.amp` on `device`: true = bf16 where it is native (CPU; CUDA GPUs of compute capability >= 8.0),
    else fp16 with a GradScaler; bf16 / fp16 force that dtype (fp16 on a CPU works but is slow, bf16 on a GPU
    without native bf16 is emulated). Box coordinates and every loss stay float32 in the model."""
    mode = parse_amp(value)
    if mode == "off":
        return AmpMode(None)
    native_bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported(
        including_emulation=False))
    if mode == "auto":
        return AmpMode(torch.bfloat16 if native_bf16 else torch.float16)
    if mode == "bf16" and not native_bf16:
        warnings.warn(f"solver.amp=bf16: {device} has no native bfloat16; it is emulated (slow). Use "
                      f"solver.amp=fp16 (or true, which picks fp16 + GradScaler there)")
    if mode == "fp16" and device.type == "cpu":
        warnings.warn("solver.amp=fp16 on the CPU is much slower than bf16 on most CPUs; use solver.amp=bf16")
    return AmpMode(torch.bfloat16 if mode == "bf16" else torch.float16)


def autocast(amp: AmpMode, device: torch.device):
    """The forward's autocast context for `amp` (a disabled one when AMP is off)."""
    return torch.autocast(device_type=device.type, dtype=amp.dtype, enabled=amp.enabled)


# ----------------------------------------------------------------------------------------------- the step

# Non-finite check of the losses. True: on the device (no host<->device sync per step; see NonFiniteGuard),
# False: on the host every step (the step raises before its backward), None: on the device for CUDA only. On
# the CPU the host check costs nothing (there is no device to wait for) and keeps the old exact behaviour.
DEVICE_GUARD: bool | None = None


def use_device_guard(device: torch.device) -> bool:
    return DEVICE_GUARD if DEVICE_GUARD is not None else device.type == "cuda"


def backward_and_step(total: torch.Tensor, optimizer: torch.optim.Optimizer, scaler, params,
                      clip_grad_norm: float = 0.0, skip: torch.Tensor | None = None) -> None:
    """zero_grad, backward of `total` (scaled when the GradScaler is on), optional clipping, optimizer step.

    skip: optional 0-dim bool tensor on the parameters' device; where True the update is not applied (weights
    and momentum untouched) and the host never reads it: fused SGD takes it as `found_inf`, and with a
    GradScaler one gradient is made NaN so that the scaler skips the step itself (fused SGD then skips on the
    device too; a non-fused optimizer makes the scaler read its flag, one sync). Needs a fused optimizer when
    the scaler is off (build_optimizer(..., fused=True)).
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if skip is not None and scaler.is_enabled():
        grad = next(p.grad for p in params if p.grad is not None)
        grad.add_(torch.where(skip, float("nan"), 0.0))
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    if skip is None or scaler.is_enabled():
        scaler.step(optimizer)
    else:
        if not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("backward_and_step(skip=...) without a GradScaler needs a fused optimizer")
        optimizer.grad_scale, optimizer.found_inf = None, skip.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    scaler.update()


def prepare_fused_sgd(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After a resume (load_state_dict brings the checkpoint's `fused` flag back): use this run's choice, and
    with fused SGD create zero momentum buffers up front. Its first step otherwise makes them with
    `torch.empty_like` and fills them inside the kernel, which a skipped step (a NaN loss, or an fp16
    overflow the GradScaler skips) never runs: garbage would enter the next update. A zero buffer gives the
    same first update (momentum * 0 + g = g)."""
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
        if not fused or group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class NonFiniteGuard:
    """The non-finite loss check without a host<->device sync per step.

    `update` tests each step's loss vector on the device and returns a sticky 0-dim flag that is True from
    the first non-finite step on; given to `backward_and_step(skip=...)`, that step and every later one are
    not applied, so no bad update reaches the weights although the host reads nothing. `raise_if_tripped`
    reads the flag (one sync) at log, checkpoint and evaluation points and stops the run like the per-step
    check: same message, naming the first bad iteration and its losses; nothing after it is saved. Under DDP
    the flag is all-reduced every step (an asynchronous collective), so every rank skips the same steps.
    """

    def __init__(self, device: torch.device, all_ranks: bool | None = None):
        self.tripped = torch.zeros((), dtype=torch.bool, device=device)
        self.first: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # names -> (iteration, losses)
        self.all_ranks = dist.get_world_size() > 1 if all_ranks is None else all_ranks

    def update(self, iteration: int, names: tuple, values: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(values).all()
        if self.all_ranks:
            flag = bad.to(torch.float32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag > 0
        new = bad & ~self.tripped
        it, vals = self.first.get(names, (torch.full_like(self.tripped, -1, dtype=torch.int64), values))
        self.first[names] = (torch.where(new, iteration, it), torch.where(new, values, vals))
        self.tripped |= bad
        return self.tripped

    def raise_if_tripped(self, done: int, metrics: "MetricsLog", output_dir: Path) -> None:
        if not bool(self.tripped):  # the one device->host read
            return
        found = [(int(it), names, vals) for names, (it, vals) in self.first.items() if int(it) >= 0]
        iteration, names, vals = min(found, key=lambda f: f[0])
        logged = dist.reduce_loss_dict(dict(zip(names, vals)))
        note = (f" (noticed at iteration {done}: the updates of iterations {iteration}-{done} were skipped on "
                f"the device, the weights are those after iteration {iteration - 1})") if done > iteration else ""
        _stop_on_nonfinite(iteration, logged, metrics, output_dir, note)


# ----------------------------------------------------------------------------------------------- optimizer

def build_optimizer(cfg, model: nn.Module, fused: bool = False) -> torch.optim.SGD:
    """SGD with momentum; norm layers' affine parameters get `solver.weight_decay_norm` (detectron2's
    split: decaying a GroupNorm/BatchNorm scale towards 0 fights the normalisation). Frozen parameters
    (requires_grad False) are not handed to the optimizer. fused: one fused kernel per step, which can
    also skip a step on the device (GradScaler's / NonFiniteGuard's flag) without a host sync."""
    s = cfg.solver
    norm_params, other_params, seen = [], [], set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (norm_params if isinstance(module, _NORM_TYPES) else other_params).append(param)
    groups = [{"params": other_params, "weight_decay": float(s.weight_decay)}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": float(s.weight_decay_norm)})
    return torch.optim.SGD(groups, lr=float(s.base_lr), momentum=float(s.momentum), fused=True if fused else None)


def lr_factor(iteration: int, *, warmup_iters: int, warmup_factor: float, steps, gamma: float) -> float:
    """LR multiplier at 0-based `iteration`: linear warm-up from `warmup_factor` to 1 over `warmup_iters`,
    times gamma ** (number of `steps` <= iteration) (detectron2's WarmupMultiStepLR)."""
    factor = gamma ** bisect.bisect_right(sorted(steps), iteration)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Per-iteration LR = base_lr * lr_factor(iteration); call `step()` after every optimizer step.

    The checkpointed state is only the position (`last_epoch` = completed iterations): on resume the
    schedule's shape (base_lr, warm-up, steps) comes from the current config, so e.g. `solver.steps=...`
    on a resumed run takes effect.
    """

    def __init__(self, optimizer, *, warmup_iters: int, warmup_factor: float, steps, gamma: float):
        self.schedule = dict(warmup_iters=int(warmup_iters), warmup_factor=float(warmup_factor),
                             steps=[int(x) for x in steps], gamma=float(gamma))
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [base * lr_factor(self.last_epoch, **self.schedule) for base in self.base_lrs]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        # optimizer.load_state_dict brought back the checkpoint's LRs; recompute them from the config.
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, self.get_lr()):
            group["initial_lr"], group["lr"] = base, lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_lr_scheduler(cfg, optimizer) -> WarmupMultiStepLR:
    s = cfg.solver
    return WarmupMultiStepLR(optimizer, warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor,
                             steps=s.steps, gamma=s.gamma)


def to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device, move_targets: bool = True):
    """Copies of a batch on `device` (tensors and SparseMaps in targets move; ints and tuples stay); inputs
    untouched. move_targets=False leaves the targets where they are, for a model that takes them from the
    host itself (`takes_host_targets`: it validates them there without a device sync)."""
    images = [im.to(device, non_blocking=True) for im in images]
    if move_targets:
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, SparseMaps)) else v
                    for k, v in t.items()} for t in targets]
    return images, targets


# ----------------------------------------------------------------------------------------------- logging

def _json_safe(value: Any) -> Any:
    """Metrics -> strict JSON values: tensors to numbers, NaN/inf to strings, unknown objects to str."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if torch.is_tensor(value) or isinstance(value, np.generic):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


class MetricsLog:
    """JSON lines in `output_dir/metrics.jsonl`, written by rank 0 only.

    On start, lines of iterations after `start_iter` (left by a run that crashed after its last checkpoint)
    are dropped, so a resumed run's log reads as one run; a fresh run (start_iter 0) starts an empty log.
    """

    def __init__(self, path: Path, start_iter: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if start_iter > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if int(json.loads(line).get("iter", 0)) <= start_iter:
                        kept.append(line)
                except (ValueError, AttributeError):
                    continue  # a half-written last line of a killed run
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(_json_safe(record)) + "\n")


class WindowMeter:
    """Means of losses and timings over the iterations since the last log line."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def pop_means(self) -> dict[str, float]:
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


class LossWindow:
    """Sums of the loss vectors since the last log line, kept where the losses were computed: on a GPU there
    is no device->host copy per step; `pop_means` reads them once (averaged over ranks, like the losses of a
    global batch)."""

    def __init__(self):
        self.sums: dict[tuple, torch.Tensor] = {}
        self.counts: dict[tuple, int] = {}

    def update(self, names: tuple, values: torch.Tensor) -> None:
        values = values.detach().double()
        self.sums[names] = self.sums[names] + values if names in self.sums else values
        self.counts[names] = self.counts.get(names, 0) + 1

    def pop_means(self) -> dict[str, float]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for names, vec in self.sums.items():
            for k, v in zip(names, vec):
                sums[k] = sums[k] + v if k in sums else v
                counts[k] = counts.get(k, 0) + self.counts[names]
        self.sums, self.counts = {}, {}
        return dist.reduce_loss_dict({k: sums[k] / counts[k] for k in sums})


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------- evaluation

def run_evaluation(model: nn.Module, cfg, split: str, output_dir: Path) -> dict | None:
    """Call gains.evaluation.evaluate_model(model, cfg, split, output_dir) on every rank (it shards the
    data itself) if that module exists; else log one line and return None. The model is put in eval mode
    for the call and back afterwards; the global random generators are left as they were, so evaluating
    does not change the training that follows."""
    if importlib.util.find_spec("gains.evaluation") is None:
        logger.info("evaluation module not available; skipped (%s split)", split)
        return None
    evaluation = importlib.import_module("gains.evaluation")
    bare = unwrap_model(model)
    was_training = bare.training
    bare.eval()
    try:
        with torch.no_grad(), preserved_rng_state():
            results = evaluation.evaluate_model(bare, cfg, split, str(output_dir))
    finally:
        bare.train(was_training)
    if results:  # the full table was printed by the evaluator; metrics.json holds everything
        logger.info("evaluation on %s: mAP %.2f, AJI %.4f -> %s/metrics.json", split,
                    results.get("mAP") or 0.0, results.get("aji") or 0.0, output_dir)
    return results


# ----------------------------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    """What `train` leaves behind: the final checkpoint, the iterations done, the last evaluation."""

    final_checkpoint: Path | None
    iterations: int
    eval_results: dict | None


def _save(path_name: str, output_dir: Path, model, optimizer, scheduler, scaler, iteration, cfg,
          category_map) -> Path:
    """Checkpoint on rank 0 (RNG states of all ranks gathered first: a collective, so every rank calls)."""
    rng_states = dist.all_gather_object(capture_rng_state())
    path = output_dir / path_name
    if dist.is_main_process():
        state = make_checkpoint(model, optimizer, scheduler, scaler, iteration=iteration, config=cfg,
                                category_map=category_map, rng_states=rng_states)
        save_checkpoint(state, path)
        write_last_checkpoint(output_dir, path_name)
        logger.info("saved %s", path)
    return path


def _build_default_dataset(cfg):
    from .data import build_dataset, collate  # imported here: engine must import without the data stack
    return build_dataset(cfg, "train", is_train=True), collate


def _build_default_model(cfg) -> nn.Module:
    from .model import build_model
    b = cfg.model.backbone
    if b.norm == "frozen_bn" and not b.weights and not cfg.init_weights:
        # Only training is concerned: evaluating a checkpoint supplies every weight.
        warnings.warn("model.backbone.norm=frozen_bn without model.backbone.weights: frozen BN of a randomly "
                      "initialised ResNet is an identity, so activations grow layer after layer and training "
                      "from scratch is unstable; use model.backbone.norm=gn (or bn), or give ImageNet weights")
    return build_model(cfg)


def train(cfg, resume: bool = False, *, model: nn.Module | None = None, dataset: Dataset | None = None,
          collate_fn: Callable | None = None) -> TrainResult:
    """Train `build_model(cfg)` on the training split for `solver.max_iter` iterations.

    Works unchanged as one process or under torchrun (DDP). `resume`: continue from
    `output_dir/last_checkpoint` (model, optimizer, scheduler, scaler, iteration, RNG states); without a
    checkpoint it starts from scratch. `model`/`dataset`/`collate_fn` replace the config-built ones (tests,
    notebooks); the dataset's items follow the gains.data contract and the model returns a loss dict.
    Raises FloatingPointError when a loss becomes NaN/inf (nothing of that step is saved).
    """
    check_solver(cfg.solver)
    info = dist.init_distributed()
    images_per_rank = check_batch_size(int(cfg.solver.ims_per_batch), info.world_size)
    device = resolve_device(cfg.device, info.local_rank)
    configure_determinism(bool(cfg.deterministic), device)
    seed_process(int(cfg.seed) + info.rank)
    output_dir = Path(cfg.output_dir)
    with _log_file(output_dir, enabled=dist.is_main_process()):
        return _train(cfg, resume, model, dataset, collate_fn, info, images_per_rank, device, output_dir)


@contextlib.contextmanager
def _log_file(output_dir: Path, enabled: bool):
    """Copy the `gains` log lines of this run into output_dir/log.txt (rank 0)."""
    if not enabled:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.getLogger("gains").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("gains").removeHandler(handler)
        handler.close()


def _train(cfg, resume, model, dataset, collate_fn, info, images_per_rank, device, output_dir) -> TrainResult:
    s = cfg.solver
    main = dist.is_main_process()
    if main:
        dump_config(cfg, output_dir / "config.yaml")

    # ---- model, data, optimizer
    if model is None:
        model = _build_default_model(cfg)
    if dataset is None:
        dataset, default_collate = _build_default_dataset(cfg)
        collate_fn = collate_fn or default_collate
    category_map = dataset.category_map.to_dict() if hasattr(dataset, "category_map") else None
    model.to(device).train()
    if s.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D weights NHWC; activations follow them
    if device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = bool(s.cudnn_benchmark)
    amp = resolve_amp(s.amp, device)
    device_guard = use_device_guard(device)  # True on CUDA: no host<->device sync per step (NonFiniteGuard)
    optimizer = build_optimizer(cfg, model, fused=device_guard)
    scheduler = build_lr_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.use_scaler)
    logger.info("precision %s%s%s", amp.name, " + GradScaler" if amp.use_scaler else "",
                ", channels_last" if s.channels_last else "")

    # ---- resume or fresh start
    start_iter = 0
    last = find_last_checkpoint(output_dir) if resume else None
    if last is not None:
        ckpt = load_checkpoint(last, model, optimizer, scheduler, scaler, config=cfg)
        start_iter = int(ckpt["iteration"])
        states = ckpt.get("rng_states") or []
        if len(states) == info.world_size:
            restore_rng_state(states[info.rank])
        else:
            logger.warning("%s was written by %d process(es), this run has %d: weights, optimizer and data "
                           "order resume exactly, RPN/RoI sampling restarts from seed + rank",
                           last, len(states), info.world_size)
        logger.info("resumed from %s at iteration %d", last, start_iter)
    else:
        if resume:
            logger.info("--resume: no checkpoint in %s; starting from scratch", output_dir)
        elif main and (output_dir / "last_checkpoint").exists():
            logger.warning("%s holds checkpoints of an earlier run; they will be overwritten (use --resume "
                           "to continue that run instead)", output_dir)
            (output_dir / "last_checkpoint").unlink()
        if cfg.init_weights:
            load_weights_for_finetune(model, cfg.init_weights)
    prepare_fused_sgd(optimizer, fused=device_guard)
    dist.barrier()  # nobody trains before rank 0 has dealt with the output folder

    if info.world_size > 1:
        # Every parameter gets a gradient each step (losses use `x.sum() * 0` for empty cases), so DDP
        # needs no find_unused_parameters; buffers (frozen BN statistics) are not broadcast each step.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    loader = build_train_loader(dataset, images_per_rank=images_per_rank, seed=int(cfg.seed), rank=info.rank,
                                world_size=info.world_size, start_iter=start_iter,
                                num_workers=int(cfg.data.num_workers), collate_fn=collate_fn or list_collate,
                                pin_memory=device.type == "cuda")
    host_targets = bool(getattr(unwrap_model(model), "takes_host_targets", False))
    metrics = MetricsLog(output_dir / "metrics.jsonl", start_iter, enabled=main)
    max_iter = int(s.max_iter)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    eval_results = None
    if start_iter >= max_iter:
        logger.info("training already finished (%d >= solver.max_iter=%d)", start_iter, max_iter)
        return TrainResult(find_last_checkpoint(output_dir), start_iter, None)

    logger.info("training %d -> %d iterations, %d image(s) per step on %d process(es), device %s",
                start_iter, max_iter, int(s.ims_per_batch), info.world_size, device)
    progress_ctx, progress = _progress_bar(start_iter, max_iter, enabled=main and sys.stderr.isatty())
    meter, window = WindowMeter(), LossWindow()  # host timings; losses summed on the device
    guard = NonFiniteGuard(device) if device_guard else None
    dropped_fragments = 0  # instances cut by data.crop_size below data.crop_min_area, per log period
    with progress_ctx:
        data_iter = iter(loader)
        for it in range(start_iter, max_iter):
            # ---- one step: load, forward, check, backward, update. With the device guard (CUDA) nothing here
            # waits for the device: the losses stay there until the next log point.
            t_start = time.perf_counter()
            images, targets = next(data_iter)
            dropped_fragments += sum(int(t.get("dropped_fragments", 0)) for t in targets)
            images, targets = to_device(images, targets, device, move_targets=not host_targets)
            t_data = time.perf_counter() - t_start
            with autocast(amp, device):
                loss_dict = model(images, targets)
            names = tuple(sorted(loss_dict))
            values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])
            total = sum(loss_dict.values())
            if guard is None:  # host check every step: stop before the backward of a bad step
                logged = dist.reduce_loss_dict(dict(zip(names, values)))  # mean over ranks: same decision
                if not all(math.isfinite(v) for v in logged.values()):
                    _stop_on_nonfinite(it + 1, logged, metrics, output_dir)
                skip = None
            else:  # device check: the update of a bad step (and of every later one) is skipped there
                skip = guard.update(it + 1, names, values)
            lr = optimizer.param_groups[0]["lr"]
            backward_and_step(total, optimizer, scaler, params, float(s.clip_grad_norm), skip)
            scheduler.step()
            done = it + 1

            # ---- bookkeeping: check, log, checkpoint, evaluate
            window.update(names + ("total_loss",), torch.cat([values, values.sum().reshape(1)]))
            meter.update({"time": time.perf_counter() - t_start, "data_time": t_data})
            progress.update(1)
            log_now = done % int(s.log_period) == 0 or done == max_iter
            save_now = done % int(s.checkpoint_period) == 0 and done < max_iter
            eval_now = int(s.eval_period) > 0 and done % int(s.eval_period) == 0
            if guard is not None and (log_now or save_now or eval_now):
                guard.raise_if_tripped(done, metrics, output_dir)
            if log_now:
                count, t_sync = meter.count, time.perf_counter()
                losses = window.pop_means()  # waits for the device: its time is part of the window's steps
                means = meter.pop_means()
                means["time"] += (time.perf_counter() - t_sync) / max(count, 1)
                record = {"iter": done, **losses, **means, "lr": lr,
                          "eta_seconds": means["time"] * (max_iter - done)}
                if cfg.data.crop_size:
                    record["dropped_fragments"], dropped_fragments = dropped_fragments, 0
                if device.type == "cuda":
                    record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                metrics.write(record)
                _log_line(record, max_iter, progress)
            if save_now:
                _save(f"model_{done:07d}.pth", output_dir, model, optimizer, scheduler, scaler, done, cfg,
                      category_map)
            if eval_now:
                results = run_evaluation(model, cfg, "val", output_dir / f"eval_{done:07d}")
                if results is not None:
                    metrics.write({"iter": done, "split": "val", "eval": results})

    final = _save("model_final.pth", output_dir, model, optimizer, scheduler, scaler, max_iter, cfg,
                  category_map)
    if cfg.test.eval_at_end:
        split = str(cfg.test.split)
        eval_results = run_evaluation(model, cfg, split, output_dir / f"eval_final_{split}")
        if eval_results is not None:
            metrics.write({"iter": max_iter, "split": split, "eval": eval_results})
    dist.barrier()
    return TrainResult(final, max_iter, eval_results)


def _stop_on_nonfinite(iteration: int, logged: dict[str, float], metrics: MetricsLog, output_dir: Path,
                       note: str = ""):
    """Stop before the bad step touches the weights; the last checkpoint on disk stays the newest."""
    bad = [k for k, v in logged.items() if not math.isfinite(v)]
    metrics.write({"iter": iteration, "error": "non-finite loss", **logged})
    last = find_last_checkpoint(output_dir)
    raise FloatingPointError(
        f"non-finite loss at iteration {iteration}: {', '.join(bad)} "
        f"({', '.join(f'{k}={v:.4g}' for k, v in logged.items())}); training stopped without saving this "
        f"step{note}. Last good checkpoint: {last if last else 'none yet'} (continue with --resume after lowering "
        f"solver.base_lr or enabling solver.clip_grad_norm)")


def _progress_bar(start: int, total: int, enabled: bool):
    """tqdm bar (rate and ETA) on an interactive rank-0 terminal, else a disabled (silent) one; while it
    is shown, console log lines go through tqdm.write so they do not tear it."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    bar = tqdm(total=total, initial=start, dynamic_ncols=True, desc="train", disable=not enabled)
    stack = contextlib.ExitStack()
    stack.enter_context(bar)
    if enabled:
        stack.enter_context(logging_redirect_tqdm())
    return stack, bar


def _log_line(record: dict, max_iter: int, progress) -> None:
    losses = "  ".join(f"{k}: {v:.4f}" for k, v in record.items() if k.startswith("loss") or k == "total_loss")
    eta = _format_eta(record["eta_seconds"])
    line = (f"iter {record['iter']}/{max_iter}  {losses}  lr: {record['lr']:.6g}  "
            f"s/it: {record['time']:.3f}  data: {record['data_time']:.3f}  eta: {eta}")
    progress.set_postfix_str(f"loss {record['total_loss']:.3f} lr {record['lr']:.2g}", refresh=False)
    logger.info(line)
