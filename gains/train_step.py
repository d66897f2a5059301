"""One optimizer step and its safety net: moving a batch to the device, backward + (clipped, scaled) update
that can be skipped on the device, and the non-finite loss check (NonFiniteGuard on a GPU: no host<->device
sync per step; a host check every step on the CPU), which stops the run naming the bad iteration."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import dist
from .checkpoint import find_last_checkpoint
from .sparse_maps import SparseMaps
from .train_log import MetricsLog

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
        stop_on_nonfinite(iteration, logged, metrics, output_dir, note)


def to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device, move_targets: bool = True):
    """Copies of a batch on `device` (tensors and SparseMaps in targets move; ints and tuples stay); inputs
    untouched. move_targets=False leaves the targets where they are, for a model that takes them from the
    host itself (`takes_host_targets`: it validates them there without a device sync)."""
    images = [im.to(device, non_blocking=True) for im in images]
    if move_targets:
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, SparseMaps)) else v
                    for k, v in t.items()} for t in targets]
    return images, targets


def stop_on_nonfinite(iteration: int, logged: dict[str, float], metrics: MetricsLog, output_dir: Path,
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

