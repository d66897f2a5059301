"""The optimizer and its schedule: SGD with detectron2's weight-decay split for norm layers, the warm-up +
multi-step learning rate, and fused SGD (on the CPU) set up so that a step the GradScaler skips leaves no
garbage."""
from __future__ import annotations

import bisect

import torch
from torch import nn

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def prepare_fused_sgd(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After a resume (load_state_dict brings the checkpoint's `fused` flag back): use this run's choice, and
    with fused SGD create zero momentum buffers up front. Its first step otherwise makes them with
    `torch.empty_like` and fills them inside the kernel, which a skipped step (an fp16 overflow the
    GradScaler skips: it hands its overflow flag to the fused kernel) never runs: garbage would enter the
    next update. A zero buffer gives the same first update (momentum * 0 + g = g)."""
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
        if not fused or group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def use_fused_sgd(device: torch.device) -> bool:
    """Fused SGD on the CPU, where its one kernel is 2.5x faster than the per-parameter loop (~15 ms of a
    quickstart step); PyTorch's default (foreach) SGD elsewhere. Same update up to float rounding."""
    return device.type == "cpu"


def build_optimizer(cfg, model: nn.Module, fused: bool = False) -> torch.optim.SGD:
    """SGD with momentum; norm layers' affine parameters get `solver.weight_decay_norm` (detectron2's
    split: decaying a GroupNorm/BatchNorm scale towards 0 fights the normalisation). Frozen parameters
    (requires_grad False) are not handed to the optimizer. fused: one fused kernel per step (it takes the
    GradScaler's scale and overflow flag from `scaler.step`)."""
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

