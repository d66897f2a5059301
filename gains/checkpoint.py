"""Checkpoints: atomic save, exact resume, weights for fine-tuning, import of detectron2/MSRA weights.

A training checkpoint (`model_{iter:07d}.pth`, `model_final.pth` in the run's output_dir) is one dict:

    format        "gains-checkpoint-v1"
    model         state dict of the bare model (no DDP `module.` prefix)
    optimizer     optimizer.state_dict()
    scheduler     LR scheduler state_dict()
    scaler        GradScaler state_dict() (None when AMP is off)
    iteration     number of COMPLETED iterations; a resumed run starts its loop at this index
    config        the resolved config (plain dict)
    category_map  the data set's CategoryMap.to_dict() (json category id <-> contiguous label), or None
    rng_states    one entry per rank: {"torch", "cuda", "python", "numpy"} generator states
    world_size    number of processes that wrote it (RNG states are only restored for the same number)

Everything in it is a tensor or a plain Python container, so `torch.load(weights_only=True)` reads it
(no arbitrary pickles are executed when loading a checkpoint someone sent you). `last_checkpoint` beside
the checkpoints holds the file name of the newest one; both are replaced atomically (tmp file + os.replace),
so a crash or a full disk during a save leaves the previous files intact.

The authors' detectron2 checkpoints are converted once into this format (key map: gains/convert_d2.py):

    python -m gains.checkpoint convert model_final.pth gains_isbi_r50.pth --config configs/isbi_r50.yaml
    python -m gains.checkpoint inspect model_final.pth      # format and the config values it implies

`init_weights` (fine-tuning) also accepts detectron2 checkpoints and MSRA `.pkl` files directly.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "gains-checkpoint-v1"
LAST_CHECKPOINT = "last_checkpoint"
_MAX_NAMES = 20  # key names listed in one error/warning before "... and N more"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message names the keys."""


# ----------------------------------------------------------------------------------------------- writing

def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """torch.save `state` to `path` atomically (tmp file in the same folder + os.replace)."""
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace a small text file atomically (last_checkpoint, metrics.jsonl rewrites)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(Path(path), write)


def write_last_checkpoint(output_dir: str | os.PathLike, filename: str) -> None:
    """Point `output_dir/last_checkpoint` at `filename` (a name inside output_dir, not a path)."""
    write_text_atomic(Path(output_dir) / LAST_CHECKPOINT, filename + "\n")


def find_last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named in `output_dir/last_checkpoint`, or None when there is none yet."""
    marker = Path(output_dir) / LAST_CHECKPOINT
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    path = Path(output_dir) / name
    if not name or not path.is_file():
        raise CheckpointError(f"{marker} names {name!r}, which does not exist in {output_dir}; delete the "
                              f"marker to start over or point it at an existing model_*.pth")
    return path


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (its state dict has no `module.` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_checkpoint(model: nn.Module, optimizer=None, scheduler=None, scaler=None, *, iteration: int,
                    config: dict | None = None, category_map: dict | None = None,
                    rng_states: list[dict] | None = None) -> dict:
    """Assemble the checkpoint dict described in the module docstring (tensors stay on their devices;
    torch.save writes them with their device and `read_checkpoint` maps them to CPU)."""
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    return {
        "format": FORMAT,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "iteration": int(iteration),
        "config": config,
        "category_map": category_map,
        "rng_states": rng_states,
        "world_size": len(rng_states) if rng_states else 1,
    }


# ----------------------------------------------------------------------------------------------- RNG state

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


# ----------------------------------------------------------------------------------------------- reading

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


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file to CPU with weights_only=True; one-line CheckpointError for missing, corrupt,
    truncated or unsafe files (torch_load_safely)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".pkl":  # detectron2 model-zoo / MSRA caffe2 pickles of numpy arrays (read safely)
        from gains.convert_d2 import read_foreign_weights
        state, meta = read_foreign_weights(path)
        return {**meta, "model": state}
    return torch_load_safely(path)


def _model_state_from(obj: Any, path: Path, convert_foreign: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded file: our checkpoint, {'model': sd}, or a bare state dict.

    detectron2 / MSRA names are converted (with the conversion report logged) when `convert_foreign`, and
    refused with the command that converts them otherwise."""
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if isinstance(sd, dict) and sd:
        from gains.convert_d2 import weights_format
        fmt = weights_format(sd)
        if fmt in ("detectron2", "caffe2"):
            if not convert_foreign:
                raise CheckpointError(f"{path} is a {fmt} checkpoint: convert it first with `python -m "
                                      f"gains.checkpoint convert {path} OUT.pth --config CONFIG`")
            sd = _convert_foreign(sd, fmt, path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: no model state dict found (expected a gains checkpoint, a dict with "
                              f"a 'model' state dict, or a bare state dict of tensors)")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model by other code
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _convert_foreign(sd: dict, fmt: str, path: Path) -> dict[str, torch.Tensor]:
    from gains.convert_d2 import convert_detectron2_state_dict, resnet_state_from_foreign
    if fmt == "caffe2":
        body, report = resnet_state_from_foreign(sd)
        sd = {"backbone.body." + k: v for k, v in body.items()}
    else:
        sd, report = convert_detectron2_state_dict(sd, strict=False)
    logger.warning("%s: converted from %s names:\n%s", path, fmt, report.describe())
    return sd


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMES])
    return shown + (f", ... and {len(keys) - _MAX_NAMES} more" if len(keys) > _MAX_NAMES else "")


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
            lines.append(f"missing in checkpoint ({len(self.missing)}): {_names(self.missing)}")
        if self.unexpected:
            lines.append(f"not in model ({len(self.unexpected)}): {_names(self.unexpected)}")
        if self.shape_mismatched:
            items = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatched]
            lines.append(f"shape mismatch ({len(items)}): {_names(items)}")
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


def _config_differences(saved: dict | None, current: dict | None, prefix: str = "model") -> list[str]:
    """Dotted keys under `model` whose values differ between two resolved configs (for error hints)."""
    a = (saved or {}).get(prefix) if isinstance(saved, dict) else None
    b = (current or {}).get(prefix) if isinstance(current, dict) else None
    out: list[str] = []

    def walk(x: Any, y: Any, dotted: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k), y.get(k), f"{dotted}.{k}")
        elif x != y:
            out.append(f"{dotted}: checkpoint {x!r}, config {y!r}")
    if a is not None and b is not None:
        walk(a, b, prefix)
    return out


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                    config: dict | None = None) -> dict:
    """Restore a gains checkpoint for resuming (strict) and return the whole checkpoint dict.

    The model must match exactly: any missing, unexpected or shape-mismatched key raises CheckpointError
    naming the keys (and, when `config` is given, the `model.*` config values that differ from the
    checkpoint's). optimizer / scheduler / scaler are restored when given and present in the file. The
    caller uses the returned dict's `iteration`, `rng_states` and `category_map`.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    model_sd = _model_state_from(ckpt, path)
    bare = unwrap_model(model)
    report = compare_state_dicts(bare.state_dict(), model_sd)
    if report.missing or report.unexpected or report.shape_mismatched:
        diffs = _config_differences(ckpt.get("config"), config.to_dict() if hasattr(config, "to_dict")
                                    else config)
        hint = ("\nconfig values that differ from the checkpoint's: " + "; ".join(diffs)) if diffs else ""
        raise CheckpointError(f"checkpoint {path} does not match the model built from the config: "
                              f"{report.describe()}{hint}")
    bare.load_state_dict(model_sd)
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and scaler.is_enabled():
        if ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        else:
            logger.warning("%s has no AMP scaler state (trained without AMP); the scaler starts fresh", path)
    return ckpt


def load_weights_for_finetune(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Initialise `model` from another run's weights, loading every key whose name and shape match.

    Typical use: start from a model trained on another data set, where the class-specific predictors have
    a different number of classes. detectron2 checkpoints (the authors' released models) and MSRA `.pkl`
    ImageNet weights are converted on the fly (gains/convert_d2.py; the conversion report is logged).
    Missing, unexpected and shape-mismatched keys are skipped and logged by name (a warning), and returned
    in the LoadReport. Nothing of the optimizer/iteration is taken. Raises
    CheckpointError when not a single tensor fits (almost certainly the wrong file or architecture).
    """
    path = Path(path)
    ckpt_sd = _model_state_from(read_checkpoint(path), path, convert_foreign=True)
    bare = unwrap_model(model)
    report = compare_state_dicts(bare.state_dict(), ckpt_sd)
    if not report.loaded:
        raise CheckpointError(f"no tensor of {path} fits the model: {report.describe()}")
    bare.load_state_dict({k: ckpt_sd[k] for k in report.loaded}, strict=False)
    if report.missing or report.unexpected or report.shape_mismatched:
        logger.warning("fine-tuning from %s: %s", path, report.describe())
    else:
        logger.info("fine-tuning from %s: all %d tensors loaded", path, len(report.loaded))
    return report


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """`python -m gains.checkpoint convert SRC DST --config CONFIG [key=value ...]` | `inspect SRC`."""
    import argparse
    import sys

    from gains import convert_d2
    from gains.config import ConfigError, load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m gains.checkpoint", description=(
        "convert SRC DST --config CONFIG [key=value ...]: a detectron2 GAInS / Mask R-CNN checkpoint (.pth or "
        ".pkl) -> a gains checkpoint for evaluate.py --ckpt DST. inspect SRC: the format of a weights file and "
        "the config values it implies. Key map and conventions: gains/convert_d2.py."))
    p.add_argument("command", choices=("convert", "inspect"))
    p.add_argument("src", help="detectron2 checkpoint (model_final.pth / .pkl)")
    if argv[:1] == ["convert"]:
        p.add_argument("dst", help="gains checkpoint to write")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        p.add_argument("--config", required=True, help="YAML config of the model, e.g. configs/isbi_r50.yaml")
        p.add_argument("--allow-partial", action="store_true",
                       help="convert despite unknown/missing/mis-shaped keys (all reported by name)")
        p.add_argument("--allow-config-mismatch", action="store_true",
                       help="convert although the config's input format / mean / std / stride / norm differ "
                            "from detectron2's (the outputs will then differ from the authors')")
    args = p.parse_intermixed_args(argv)
    try:
        if args.command == "inspect":
            state, meta = convert_d2.read_foreign_weights(args.src)
            fmt = convert_d2.weights_format(state)
            print(f"{args.src}: {fmt} names, {len(state)} entries, iteration {meta.get('iteration', 'unknown')}")
            if fmt == "detectron2":
                info = convert_d2.inspect_detectron2(state)
                print("config values it implies: " + " ".join(f"{k}={v}" for k, v in info["config"].items()))
                print({k: info[k] for k in ("mask_head", "anomaly", "guidance", "dead_guidance", "num_anchors")})
            return 0
        cfg = load_config(args.config, args.overrides)
        report, notes = convert_d2.convert_checkpoint(args.src, args.dst, cfg, allow_partial=args.allow_partial,
                                                      allow_config_mismatch=args.allow_config_mismatch)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print(report.describe() + "\n" + "\n".join(notes))
    print(f"wrote {args.dst}; evaluate it with: python evaluate.py --ckpt {args.dst}")
    return 0


if __name__ == "__main__":  # run through the importable module so exception classes are the library's
    import sys

    from gains.checkpoint import main as _main
    sys.exit(_main())
