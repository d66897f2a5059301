"""What a training run writes and prints while it runs: metrics.jsonl (JSON lines, resumable), the means of
losses and timings over a log window (summed on the device, read once per window), the log line, the tqdm
bar and the copy of the log in output_dir/log.txt."""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import dist
from .atomic import write_text_atomic

logger = logging.getLogger("gains.engine")  # the training log's name, as before the split


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


@contextlib.contextmanager
def log_file(output_dir: Path, enabled: bool):
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


def progress_bar(start: int, total: int, enabled: bool):
    """tqdm bar (rate and ETA) on an interactive rank-0 terminal, else a disabled (silent) one; while it
    is shown, console log lines go through tqdm.write so they do not tear it."""
    bar = tqdm(total=total, initial=start, dynamic_ncols=True, desc="train", disable=not enabled)
    stack = contextlib.ExitStack()
    stack.enter_context(bar)
    if enabled:
        stack.enter_context(logging_redirect_tqdm())
    return stack, bar


def log_line(record: dict, max_iter: int, progress) -> None:
    losses = "  ".join(f"{k}: {v:.4f}" for k, v in record.items() if k.startswith("loss") or k == "total_loss")
    eta = _format_eta(record["eta_seconds"])
    line = (f"iter {record['iter']}/{max_iter}  {losses}  lr: {record['lr']:.6g}  "
            f"s/it: {record['time']:.3f}  data: {record['data_time']:.3f}  eta: {eta}")
    progress.set_postfix_str(f"loss {record['total_loss']:.3f} lr {record['lr']:.2g}", refresh=False)
    logger.info(line)

