"""One training step and its safety net: moving a batch to the device, the non-finite loss check on the host,
and backward + (clipped, scaled) update, the plain GradScaler recipe.

The engine's step (gains.engine._train_loop), read top to bottom:

    loss_dict = model(images, targets)                  # name -> 0-dim float32 loss
    check_losses(iteration, names, values, ...)         # values: the losses as a float32 [len(names)] vector;
                                                        #   read on the host; NaN/inf -> FloatingPointError
    backward_and_step(sum(loss_dict.values()), optimizer, scaler, params, clip_grad_norm)

A non-finite loss stops the run before its backward, so the weights, the optimizer state and the checkpoints
are those after the previous step. With fp16 the GradScaler also skips, by itself, a step whose scaled
gradients overflowed (the loss being finite) and lowers its scale; with float32 and bf16 it is disabled and
each of its calls is the identity, so the step is `loss.backward(); [clip_grad_norm_]; optimizer.step()`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import dist
from .checkpoint import find_last_checkpoint
from .sparse_maps import SparseMaps
from .train_log import MetricsLog


def check_losses(iteration: int, names: tuple, values: torch.Tensor, metrics: MetricsLog,
                 output_dir: Path) -> None:
    """The non-finite check of one step's losses, on the host (one device->host read per step).

    names: the loss names, sorted; values: float32 tensor [len(names)], the step's losses in that order (on
    any device). The losses are averaged over ranks first (dist.reduce_loss_dict), so every rank of a DDP run
    decides alike. A NaN or inf stops the run before the step's backward: see stop_on_nonfinite.
    """
    logged = dist.reduce_loss_dict(dict(zip(names, values)))
    if not all(math.isfinite(v) for v in logged.values()):
        stop_on_nonfinite(iteration, logged, metrics, output_dir)


def backward_and_step(total: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      params: list[torch.nn.Parameter], clip_grad_norm: float = 0.0) -> None:
    """zero_grad, backward of `total`, optional clipping, optimizer step, scaler update.

    total: 0-dim float32 tensor, the sum of the step's losses (checked finite by check_losses). scaler: on
    (fp16) it scales `total`, unscales the gradients (before clipping, else in `step`; fused SGD unscales
    inside its kernel with the scale and overflow flag `scaler.step` hands it), skips the update when a
    gradient is inf/NaN and adapts its scale in `update`; off (float32, bf16) every call is a no-op and
    `scaler.step` is `optimizer.step()`. params: the optimizer's parameters; clip_grad_norm > 0 clips the L2
    norm of all their (unscaled) gradients together to that value.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device, move_targets: bool = True):
    """Copies of a batch on `device` (tensors and SparseMaps in targets move; ints and tuples stay); inputs
    untouched. move_targets=False leaves the targets where they are, for a model that takes them from the
    host itself (`takes_host_targets`: it validates them there without a device sync)."""
    images = [im.to(device, non_blocking=True) for im in images]
    if move_targets:
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, SparseMaps)) else v
                    for k, v in t.items()} for t in targets]
    return images, targets


def stop_on_nonfinite(iteration: int, logged: dict[str, float], metrics: MetricsLog, output_dir: Path):
    """Stop before the bad step touches the weights: a metrics.jsonl record {"iter", "error": "non-finite
    loss", every loss}, then FloatingPointError naming the iteration, the bad losses and the last checkpoint
    on disk (which stays the newest: nothing of this step is saved)."""
    bad = [k for k, v in logged.items() if not math.isfinite(v)]
    metrics.write({"iter": iteration, "error": "non-finite loss", **logged})
    last = find_last_checkpoint(output_dir)
    raise FloatingPointError(
        f"non-finite loss at iteration {iteration}: {', '.join(bad)} "
        f"({', '.join(f'{k}={v:.4g}' for k, v in logged.items())}); training stopped without saving this "
        f"step. Last good checkpoint: {last if last else 'none yet'} (continue with --resume after lowering "
        f"solver.base_lr or enabling solver.clip_grad_norm)")
