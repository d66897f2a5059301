"""The authors' released detectron2 checkpoints -> gains checkpoints, file to file (`python preprocess.py
--from-detectron2 model_final.pth --config configs/isbi_r50.yaml --out gains_isbi_r50.pth`): the config is
checked against the tensors (structure) and against detectron2's input conventions (numerics), the names
are mapped (gains.weight_names), and the result is written atomically with the resolved config, the
category map of the config's data json and the source's iteration count. `describe_weights_file` is what
`preprocess.py --inspect-weights FILE` prints.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch

from .annotations import CategoryMap
from .backbone import ResNetFPN
from .checkpoint import make_checkpoint, save_checkpoint
from .model import build_model
from .rpn import AnchorGenerator
from .weight_names import (MSRA_PIXEL_MEAN, MSRA_PIXEL_STD, ConversionError, ConversionReport, normalise_names,
                           convert_detectron2_state_dict, inspect_detectron2, weights_format)
from .weights_io import list_names, read_foreign_weights


def describe_weights_file(path) -> str:
    """Lines about a weights file: its naming scheme, number of entries and iteration and, for detectron2
    files, the config values its tensors imply and the structure found (mask head, anomaly branch, ...)."""
    state, meta = read_foreign_weights(path)
    fmt = weights_format(state)
    lines = [f"{path}: {fmt} names, {len(state)} entries, iteration {meta.get('iteration', 'unknown')}"]
    if fmt == "detectron2":
        info = inspect_detectron2(state)
        lines.append("config values it implies: " + " ".join(f"{k}={v}" for k, v in info["config"].items()))
        lines.append(str({k: info[k] for k in ("mask_head", "anomaly", "guidance", "dead_guidance", "num_anchors")}))
    return "\n".join(lines)


def check_config(cfg, info: dict, state: dict) -> tuple[list[str], list[str]]:
    """(structural, numerics): `key=value (config: current)` settings the config needs to hold this
    checkpoint, and to reproduce detectron2's numbers (BGR, MSRA mean/std or the file's own pixel_mean /
    pixel_std, stride in the 1x1 conv, frozen BN)."""
    def get(dotted):
        return functools.reduce(lambda node, part: node[part], dotted.split("."), cfg)
    family = {"gains": "gains", "branch_only": "gains"}  # modes with the anomaly branch
    structural = [f"{k}={v} (config: {get(k)!r})" for k, v in info["config"].items()
                  if (family.get(get(k), "mask_rcnn") != v if k == "model.mode" else get(k) != v)]
    if info["num_anchors"] and info["num_anchors"] != len(cfg.model.rpn.aspect_ratios):
        structural.append(f"model.rpn.aspect_ratios with {info['num_anchors']} ratios "
                          f"(config: {list(cfg.model.rpn.aspect_ratios)})")
    mean, std = (state.get(k) for k in ("pixel_mean", "pixel_std"))
    want = {"model.input_format": "BGR", "model.backbone.stride_in_1x1": True, "model.backbone.norm": "frozen_bn",
            "model.pixel_mean": [round(v, 4) for v in mean.flatten().tolist()] if mean is not None else MSRA_PIXEL_MEAN,
            "model.pixel_std": [round(v, 4) for v in std.flatten().tolist()] if std is not None else MSRA_PIXEL_STD}
    numerics = [f"{k}={json.dumps(v)} (config: {get(k)!r})" for k, v in want.items() if get(k) != v and not (
        isinstance(v, list) and len(v) == len(get(k)) and all(abs(float(a) - b) < 1e-3 for a, b in zip(get(k), v)))]
    cells = AnchorGenerator(cfg.model.rpn.anchor_sizes, cfg.model.rpn.aspect_ratios, ResNetFPN.strides).cell_anchors
    for i, ours in enumerate(cells):  # detectron2's stored anchors, when the file has them
        theirs = state.get(f"proposal_generator.anchor_generator.cell_anchors.{i}")
        if torch.is_tensor(theirs) and not (theirs.shape == ours.shape and torch.allclose(theirs.double(), ours,
                                                                                           atol=1e-2)):
            numerics.append(f"model.rpn.anchor_sizes / aspect_ratios giving the level-{i} anchors {theirs.tolist()} "
                            f"(config gives {ours.tolist()})")
    return structural, numerics


def category_map_from_config(cfg, num_classes: int) -> tuple[dict | None, str]:
    """(category map, note) from the config's data json (test, val or train: the first that exists), or None
    (evaluation then takes the json's categories in id order, as detectron2's load_coco_json does)."""
    root = Path(cfg.data.root)
    for key in ("test_json", "val_json", "train_json"):
        path = root / cfg.data[key] if cfg.data.get(key) else None
        if path is not None and path.is_file():
            with open(path) as f:
                cmap = CategoryMap.from_categories(json.load(f).get("categories") or [])
            if cmap.num_classes != num_classes:
                raise ConversionError(f"{path} declares {cmap.num_classes} categories {list(cmap.names)} but the "
                                      f"checkpoint has {num_classes} classes: wrong data.root for this model?")
            return cmap.to_dict(), f"category map from {path}: {dict(zip(cmap.names, cmap.json_ids))}"
    return None, (f"no data json under data.root={root}: no category map stored; evaluation takes the json's "
                  "categories in sorted id order (detectron2's order as well)")


def convert_checkpoint(src, dst, cfg, *, allow_partial: bool = False,
                       allow_config_mismatch: bool = False) -> tuple[ConversionReport, list[str]]:
    """detectron2 checkpoint file -> gains checkpoint at `dst` (atomic): model built from `cfg` with the
    converted weights, resolved config, category map, the source's iteration count. Returns (report, notes).

    The config must describe the checkpoint (the error names each key to set) and reproduce detectron2's
    input conventions (an error unless `allow_config_mismatch`). Unknown, missing or mis-shaped keys are
    errors unless `allow_partial`, which keeps the fresh initialisation where the file has nothing (named).
    """
    state, meta = read_foreign_weights(src)
    if weights_format(state) != "detectron2":
        raise ConversionError(f"{src} has no detectron2 names (backbone.bottom_up.*, roi_heads.*; first keys: "
                              f"{list_names(list(state)[:5])}); MSRA ImageNet weights go in model.backbone.weights")
    state = normalise_names(state)
    structural, numerics = check_config(cfg, inspect_detectron2(state), state)
    if structural:
        raise ConversionError(f"the config does not describe {src}; set: " + "; ".join(structural))
    notes = []
    if numerics:
        msg = "the config does not reproduce detectron2's input/backbone conventions; set: " + "; ".join(numerics)
        if not allow_config_mismatch:
            raise ConversionError(msg + " (or pass --allow-config-mismatch to convert anyway)")
        notes.append("WARNING: " + msg)
    build_cfg = copy.deepcopy(cfg)
    build_cfg.model.backbone.weights = None  # every weight comes from the checkpoint
    model = build_model(build_cfg)
    if "pixel_mean" not in state:
        notes.append(f"no pixel_mean/pixel_std in the file: MSRA's {MSRA_PIXEL_MEAN} / {MSRA_PIXEL_STD}, BGR assumed")
    converted, report = convert_detectron2_state_dict(state, num_classes=int(cfg.model.num_classes),
                                                      mode=str(cfg.model.mode), reference=model.state_dict(),
                                                      strict=not allow_partial)
    kept = model.load_state_dict(converted, strict=False).missing_keys
    if kept:
        notes.append(f"WARNING: {len(kept)} tensors keep their fresh initialisation: {list_names(kept)}")
    cmap, note = category_map_from_config(cfg, int(cfg.model.num_classes))
    notes.append(note)
    iteration = int(meta["iteration"]) + 1 if "iteration" in meta else 0  # detectron2 stores the last index
    ckpt = make_checkpoint(model, iteration=iteration, config=cfg, category_map=cmap)
    ckpt["converted_from"] = {"path": str(src), "format": "detectron2", "report": report.describe()}
    save_checkpoint(ckpt, dst)
    return report, notes
