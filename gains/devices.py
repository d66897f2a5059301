"""Where a process runs: the `device` config value -> torch.device, the device a model lives on, and
`deterministic: true` (deterministic kernels only)."""
from __future__ import annotations

import os

import torch

from .errors import ConfigError


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



def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")

