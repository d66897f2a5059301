"""The process's global random generators: seed them, capture and restore their states (checkpoints, exact
resume), and run a block without moving them (evaluation inside training, seeded augmentation)."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def seed_process(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python `random` and numpy's global generator of this process."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def capture_rng_state() -> dict:
    """Generator states of this process: torch CPU, current CUDA device, Python `random`, numpy global.

    numpy's state is stored as plain ints so the checkpoint stays loadable with weights_only=True.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "python": random.getstate(),
        "numpy": (name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state` (the CUDA state is skipped when this process has no GPU)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run a block (evaluation, a seeded data-augmentation call) without moving any global generator,
    so what happens inside cannot change the random stream that training sees."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
