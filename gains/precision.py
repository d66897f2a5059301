"""Mixed precision of training (`solver.amp`): which autocast dtype on which device, and whether a GradScaler
is needed. bf16 where it is native (CPUs with AVX512-BF16 / AMX, Ampere and later GPUs), fp16 with a
GradScaler on older GPUs, float32 on other CPUs; the model keeps box arithmetic and every loss in float32
under autocast."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .errors import ConfigError

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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic that oneDNN uses (x86 AVX512-BF16 or AMX). Without it a
    bf16 convolution is emulated and slower than float32. Other CPUs (ARM included) count as not native."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's probes (private API)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_amp(value, device: torch.device) -> AmpMode:
    """`solver.amp` on `device`: true = bf16 where it is native (CPUs with AVX512-BF16 or AMX; CUDA GPUs of
    compute capability >= 8.0), fp16 with a GradScaler on older GPUs and float32 on other CPUs (there fp16
    and emulated bf16 are both slower than float32); bf16 / fp16 force that dtype (with a warning where it is
    slow). Box coordinates and every loss stay float32 in the model."""
    mode = parse_amp(value)
    if mode == "off":
        return AmpMode(None)
    if device.type == "cpu":
        native_bf16 = cpu_has_native_bf16()
    else:
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if mode == "auto":
        if device.type == "cpu":
            return AmpMode(torch.bfloat16 if native_bf16 else None)
        return AmpMode(torch.bfloat16 if native_bf16 else torch.float16)
    if mode == "bf16" and not native_bf16:
        hint = ("solver.amp=true, which keeps float32 there" if device.type == "cpu"
                else "solver.amp=fp16 (or true, which picks fp16 + GradScaler there)")
        warnings.warn(f"solver.amp=bf16: {device} has no native bfloat16; it is emulated (slow). Use {hint}")
    if mode == "fp16" and device.type == "cpu":
        warnings.warn("solver.amp=fp16 on the CPU is much slower than bf16 on most CPUs; use solver.amp=bf16")
    return AmpMode(torch.bfloat16 if mode == "bf16" else torch.float16)


def autocast(amp: AmpMode, device: torch.device):
    """The forward's autocast context for `amp` (a disabled one when AMP is off)."""
    return torch.autocast(device_type=device.type, dtype=amp.dtype, enabled=amp.enabled)

