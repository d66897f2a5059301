"""Reading weight files safely, and comparing a state dict with a model.

- `torch_load_safely`: torch.load(weights_only=True) with one line of CheckpointError for any failure
  (missing, truncated, corrupt, or holding pickled objects, which are never run);
- `read_foreign_weights`: detectron2 `.pth` / `.pkl` and MSRA caffe2 `.pkl` files (an unpickler that builds
  numpy arrays and nothing else) -> a flat dict of tensors;
- `compare_state_dicts` / `LoadReport`: which keys load, are missing, unexpected or mis-shaped.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

_MAX_NAMES = 20  # key names listed in one error/warning before "... and N more"


def list_names(keys: list[str]) -> str:
    """The first 20 names, comma-separated, and "... and N more" (error messages stay readable)."""
    shown = ", ".join(keys[:_MAX_NAMES])
    return shown + (f", ... and {len(keys) - _MAX_NAMES} more" if len(keys) > _MAX_NAMES else "")


CHECKPOINT_EXPECTED = ("a checkpoint written by train.py (model_*.pth), a state dict saved with torch.save, or a "
                       "detectron2 / MSRA .pkl")


def torch_load_safely(path: str | os.PathLike, expected: str = CHECKPOINT_EXPECTED, what: str = "checkpoint") -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`; any failure is ONE line of CheckpointError,
    `cannot read {what} {path}: {why}; expected {expected}`. torch's own text is not passed on when it
    mentions `weights_only`: refusing a file that holds arbitrary pickled objects is the point, and the
    advice to retry with weights_only=False would run whatever code the file carries."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # protocol notes of the weights-only unpickler are not for users
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # the weights-only unpickler met a class or function reference
            why = (f"it holds pickled Python objects ({found.group(1)}), not only tensors and plain containers; "
                   "they are not loaded because unpickling them can run arbitrary code")
        else:
            why = "corrupt, or not a file written by torch.save (no valid pickle data)"
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, AttributeError, ImportError, IndexError,
            TypeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        # truncated zip ("failed finding central directory"), empty file (EOFError), text (KeyError), ...
        why = f"truncated, corrupt or not a file written by torch.save ({_first_line(e)})"
    raise CheckpointError(f"cannot read {what} {path}: {why}; expected {expected}") from None


def _first_line(e: BaseException) -> str:
    """`Type: first sentence of the message` (at most 120 chars; dropped when it mentions weights_only)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(". ")[0][:120]
    if "weights_only" in text.lower():
        text = ""
    return type(e).__name__ + (f": {text}" if text else "")



class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else (a .pkl from the internet runs no code)."""

    SAFE = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
            ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        module = module.replace("numpy._core", "numpy.core")
        if (module, name) not in self.SAFE:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays are read)")
        if module.startswith("numpy.core."):  # numpy 2 moved numpy.core to numpy._core; pickles name either
            for mod in (module.replace("numpy.core", "numpy._core"), module):
                with contextlib.suppress(ImportError):
                    return getattr(importlib.import_module(mod), name)
        return super().find_class(module, name)


def read_foreign_weights(path: str | Path) -> tuple[dict, dict]:
    """(state: name -> tensor (other values kept; converters ignore them by name), meta: `iteration` etc.)
    of a detectron2 `.pth`/`.pkl` or MSRA `.pkl`; `.pth` via torch.load(weights_only=True), `.pkl` via an
    unpickler that only builds numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as f:
                obj = _NumpyUnpickler(f, encoding="latin1").load()
        else:  # one line of ours on any failure; never torch's advice to load unsafely
            obj = torch_load_safely(path, "a detectron2 / MSRA checkpoint (.pth or .pkl)", "weights file")
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    meta = {}
    if isinstance(obj, dict):
        meta = {k: obj[k] for k in ("iteration", "__author__", "matching_heuristics") if k in obj}
        obj = next((obj[k] for k in ("model", "blobs") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a dict of weights (detectron2 {{'model': ...}}, caffe2 "
                              f"{{'blobs': ...}} or a flat dict), got {type(obj).__name__}")
    return {str(k): torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in obj.items()}, meta



@dataclass
class LoadReport:
    """How a state dict met a model: names of keys loaded, missing in the file, unexpected in the file,
    and present in both with different shapes (name, shape in file, shape in model)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{len(self.loaded)} tensors loaded"]
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): {list_names(self.missing)}")
        if self.unexpected:
            lines.append(f"not in model ({len(self.unexpected)}): {list_names(self.unexpected)}")
        if self.shape_mismatched:
            items = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatched]
            lines.append(f"shape mismatch ({len(items)}): {list_names(items)}")
        return "; ".join(lines)


def compare_state_dicts(model_sd: dict, ckpt_sd: dict) -> LoadReport:
    """Classify every key of two state dicts (nothing is loaded)."""
    report = LoadReport()
    for k, v in model_sd.items():
        if k not in ckpt_sd:
            report.missing.append(k)
        elif tuple(ckpt_sd[k].shape) != tuple(v.shape):
            report.shape_mismatched.append((k, tuple(ckpt_sd[k].shape), tuple(v.shape)))
        else:
            report.loaded.append(k)
    report.unexpected = [k for k in ckpt_sd if k not in model_sd]
    return report

