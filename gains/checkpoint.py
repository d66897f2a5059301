"""gains checkpoints: save atomically, find the newest, resume exactly, and load weights for fine-tuning.

A training checkpoint (`model_{iter:07d}.pth`, `model_final.pth` in the run's output_dir) is one dict:

    format        "gains-checkpoint-v1"
    model         state dict of the bare model (no DDP `module.` prefix)
    optimizer     optimizer.state_dict()
    scheduler     LR scheduler state_dict()
    scaler        GradScaler state_dict() (None when AMP is off)
    iteration     number of COMPLETED iterations; a resumed run starts its loop at this index
    config        the resolved config (plain dict)
    category_map  the data set's CategoryMap.to_dict() (json category id <-> contiguous label), or None
    rng_states    one entry per rank: {"torch", "cuda", "python", "numpy"} generator states (gains.rng)
    world_size    number of processes that wrote it (RNG states are only restored for the same number)

Everything in it is a tensor or a plain Python container, so `torch.load(weights_only=True)` reads it
(no arbitrary pickles are executed when loading a checkpoint someone sent you; gains.weights_io).
`last_checkpoint` beside the checkpoints holds the file name of the newest one; both are replaced atomically
(tmp file + os.replace), so a crash or a full disk during a save leaves the previous files intact.

The authors' detectron2 checkpoints are converted once into this format (gains/convert_checkpoint.py):

    python preprocess.py --inspect-weights model_final.pth   # format and the config values it implies
    python preprocess.py --from-detectron2 model_final.pth --config configs/isbi_r50.yaml --out gains_isbi_r50.pth

`load_weights_for_finetune` (`init_weights`) also takes detectron2 checkpoints, MSRA `.pkl` files and torchvision
ResNet state dicts directly (names mapped by gains/weight_names.py), and refuses a file trained on other input
than the model's (channel order, pixel mean/std, stride layout), naming the config keys to set.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write, write_text_atomic
from .errors import CheckpointError
from .weight_names import (InputConvention, check_input_convention, convert_detectron2_state_dict, input_convention,
                           resnet_state_from_foreign, weights_format)
from .weights_io import LoadReport, compare_state_dicts, read_foreign_weights, torch_load_safely

logger = logging.getLogger(__name__)

FORMAT = "gains-checkpoint-v1"
LAST_CHECKPOINT = "last_checkpoint"
CONVERT_HINT = "python preprocess.py --from-detectron2 {path} --config CONFIG --out OUT.pth"


# ----------------------------------------------------------------------------------------------- writing

def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """torch.save `state` to `path` atomically (tmp file in the same folder + os.replace)."""
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


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



# ----------------------------------------------------------------------------------------------- reading

def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file to CPU with weights_only=True; one-line CheckpointError for missing, corrupt,
    truncated or unsafe files (torch_load_safely)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".pkl":  # detectron2 model-zoo / MSRA caffe2 pickles of numpy arrays (read safely)
        state, meta = read_foreign_weights(path)
        return {**meta, "model": state}
    return torch_load_safely(path)


def _model_state_from(obj: Any, path: Path, convert_foreign: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded file: our checkpoint, {'model': sd}, or a bare state dict.

    detectron2 / MSRA / torchvision-ResNet names are converted (with the conversion report logged) when
    `convert_foreign`, and refused with the command that converts them otherwise."""
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if isinstance(sd, dict) and sd:
        fmt = weights_format(sd)
        if fmt in ("detectron2", "caffe2", "torchvision"):
            if not convert_foreign:
                raise CheckpointError(f"{path} is a {fmt} checkpoint: convert it first with "
                                      f"`{CONVERT_HINT.format(path=path)}`")
            sd = _convert_foreign(sd, fmt, path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: no model state dict found (expected a gains checkpoint, a dict with "
                              f"a 'model' state dict, or a bare state dict of tensors)")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model by other code
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _convert_foreign(sd: dict, fmt: str, path: Path) -> dict[str, torch.Tensor]:
    if fmt == "torchvision":  # the trunk of our backbone has torchvision's names; the classifier has no place
        kept = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        dropped = [k for k in kept if k.startswith("fc.") or k.endswith("num_batches_tracked")]
        logger.warning("%s: torchvision ResNet names loaded as backbone.body.*; ignored (classifier, BN step "
                       "counters): %s", path, dropped)
        return {"backbone.body." + k: v for k, v in kept.items() if k not in dropped}
    if fmt == "caffe2":
        body, report = resnet_state_from_foreign(sd)
        sd = {"backbone.body." + k: v for k, v in body.items()}
    else:
        sd, report = convert_detectron2_state_dict(sd, strict=False)
    logger.warning("%s: converted from %s names:\n%s", path, fmt, report.describe())
    return sd


def _input_convention_of(ckpt: Any) -> InputConvention | None:
    """The input the weights of a read checkpoint were trained on: a gains checkpoint's resolved config, else
    the file's kind (weight_names.input_convention); None when nothing says (a bare state dict of ours)."""
    if not isinstance(ckpt, dict):
        return None
    config = ckpt.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        return InputConvention.from_config(config["model"], "a gains checkpoint")
    sd = ckpt.get("model", ckpt)
    return input_convention(sd, ckpt) if isinstance(sd, dict) else None


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
    ImageNet weights are converted on the fly (gains/weight_names.py; the conversion report is logged).
    Missing, unexpected and shape-mismatched keys are skipped and logged by name (a warning), and returned
    in the LoadReport. Nothing of the optimizer/iteration is taken. Raises
    CheckpointError when not a single tensor fits (almost certainly the wrong file or architecture), and
    WeightsInputError when the file was trained on other input than `model` feeds its backbone (the file's
    kind decides: MSRA / detectron2, torchvision, or a gains checkpoint's own config; models without
    `input_settings()` are not checked).
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    ckpt_sd = _model_state_from(ckpt, path, convert_foreign=True)
    bare = unwrap_model(model)
    convention = _input_convention_of(ckpt)
    if convention is not None and callable(getattr(bare, "input_settings", None)):
        check_input_convention(convention, bare.input_settings(), f"{path} (init_weights)")
    report = compare_state_dicts(bare.state_dict(), ckpt_sd)
    if not report.loaded:
        raise CheckpointError(f"no tensor of {path} fits the model: {report.describe()}")
    bare.load_state_dict({k: ckpt_sd[k] for k in report.loaded}, strict=False)
    if report.missing or report.unexpected or report.shape_mismatched:
        logger.warning("fine-tuning from %s: %s", path, report.describe())
    else:
        logger.info("fine-tuning from %s: all %d tensors loaded", path, len(report.loaded))
    return report
