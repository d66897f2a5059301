"""Allowed values of config keys, checked when a config is loaded (after the types, gains.config).

`RULES` maps a dotted key to what it allows: a tuple of choices, or a range (lo, hi, lo_open, hi_open)
where None means unbounded; list values are checked element by element. `CROSS_RULES` relate two keys.
A violation is one ConfigError line naming the key, the value and what is allowed, so
`train.py configs/quickstart.yaml model.mode=gainz` stops before anything is written.
"""
from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError

POSITIVE = (0, None, True, False)          # > 0
NON_NEGATIVE = (0, None, False, False)     # >= 0
FRACTION = (0, 1, False, False)            # in [0, 1]
AT_LEAST_ONE = (1, None, False, False)     # >= 1

RULES: dict[str, Any] = {
    "model.mode": ("mask_rcnn", "reweight_only", "branch_only", "gains"),
    "model.input_format": ("BGR", "RGB"),
    "model.backbone.depth": (18, 34, 50, 101),
    "model.backbone.norm": ("frozen_bn", "bn", "gn", "syncbn"),
    "model.backbone.freeze_at": (0, 5, False, False),
    "model.alrm.guidance_init": ("default", "kaiming"),
    "gamm.variant": ("isbi", "chrom", "nuclei"),
    "gamm.dtype": ("float32", "float16"),
    "gamm.layout": ("compact", "authors"),
    "data.target_format": ("sparse", "dense"),
    "data.normalize": ("dtype", "percentile"),
    "test.split": ("train", "val", "test"),
    "test.aji_mode": ("clean", "gains"),
    "test.tiling": ("auto", "always", "never"),
    # sizes and counts
    "model.num_classes": AT_LEAST_ONE,
    "model.backbone.fpn_channels": AT_LEAST_ONE,
    "model.rpn.anchor_sizes": POSITIVE,
    "model.rpn.aspect_ratios": POSITIVE,
    "model.rpn.batch_size_per_image": AT_LEAST_ONE,
    "model.rpn.pre_nms_topk_train": AT_LEAST_ONE,
    "model.rpn.pre_nms_topk_test": AT_LEAST_ONE,
    "model.rpn.post_nms_topk_train": AT_LEAST_ONE,
    "model.rpn.post_nms_topk_test": AT_LEAST_ONE,
    "model.rpn.min_box_size": NON_NEGATIVE,
    "model.roi_heads.batch_size_per_image": AT_LEAST_ONE,
    "model.roi_heads.box_pooler_resolution": AT_LEAST_ONE,
    "model.roi_heads.mask_pooler_resolution": AT_LEAST_ONE,
    "model.roi_heads.fc_dim": AT_LEAST_ONE,
    "model.roi_heads.mask_conv_dim": AT_LEAST_ONE,
    "model.roi_heads.detections_per_image": AT_LEAST_ONE,
    "model.roi_heads.box_weights": POSITIVE,
    "model.roi_heads.mask_loss_weight": NON_NEGATIVE,
    "model.alrm.ga_loss_weight": NON_NEGATIVE,
    "data.num_workers": NON_NEGATIVE,
    "data.min_size_train": AT_LEAST_ONE,
    "data.max_size_train": AT_LEAST_ONE,
    "data.min_size_test": AT_LEAST_ONE,
    "data.max_size_test": AT_LEAST_ONE,
    "data.crop_size": AT_LEAST_ONE,
    "data.crop_min_area": NON_NEGATIVE,
    "data.intensity_scale": NON_NEGATIVE,
    "gamm.window_size": AT_LEAST_ONE,
    "gamm.ga_factor": NON_NEGATIVE,
    "gamm.overlap_hl": NON_NEGATIVE,
    "solver.ims_per_batch": AT_LEAST_ONE,
    "solver.base_lr": NON_NEGATIVE,             # 0 freezes the weights (tests, evaluation-only runs)
    "solver.momentum": (0, 1, False, True),
    "solver.weight_decay": NON_NEGATIVE,
    "solver.weight_decay_norm": NON_NEGATIVE,
    "solver.max_iter": AT_LEAST_ONE,
    "solver.warmup_iters": NON_NEGATIVE,
    "solver.warmup_factor": (0, 1, True, False),
    "solver.steps": AT_LEAST_ONE,
    "solver.gamma": POSITIVE,
    "solver.clip_grad_norm": NON_NEGATIVE,
    "solver.checkpoint_period": AT_LEAST_ONE,
    "solver.eval_period": NON_NEGATIVE,
    "solver.log_period": AT_LEAST_ONE,
    "test.vis": NON_NEGATIVE,
    "test.tile_size": AT_LEAST_ONE,
    "test.tile_overlap": NON_NEGATIVE,
    "test.tile_batch_size": AT_LEAST_ONE,
    "test.detections_per_tile": AT_LEAST_ONE,
    "test.max_detections": NON_NEGATIVE,
    "test.max_downscale": NON_NEGATIVE,
    # fractions and thresholds
    "model.rpn.positive_fraction": FRACTION,
    "model.rpn.nms_thresh": FRACTION,
    "model.rpn.iou_thresholds": FRACTION,
    "model.roi_heads.positive_fraction": FRACTION,
    "model.roi_heads.iou_threshold": FRACTION,
    "model.roi_heads.score_thresh_test": FRACTION,
    "model.roi_heads.nms_thresh_test": FRACTION,
    "data.hflip_prob": FRACTION,
    "data.vflip_prob": FRACTION,
    "data.rot90_prob": FRACTION,
    "test.score_thresh": FRACTION,
    "test.vis_score_thresh": FRACTION,
    "test.merge_iou": FRACTION,
    "test.merge_containment": FRACTION,
}
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _describe_range(lo, hi, lo_open, hi_open) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _in_range(v, lo, hi, lo_open, hi_open) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    above = v > lo if lo_open else v >= lo
    below = True if hi is None else (v < hi if hi_open else v <= hi)
    return above and below


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_rules(cfg: dict) -> None:
    """Raise ConfigError (one line: key, value, what is allowed) for the first value `RULES` or the
    cross-key rules reject. `cfg`: the resolved config as nested dicts. null values are not checked (their
    meaning is the key's own: no cap, none, off)."""
    for key, rule in RULES.items():
        value = _get(cfg, key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(rule[0], str) or len(rule) != 4 or not isinstance(rule[2], bool):  # choices
            if any(v not in rule for v in values):
                raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(map(str, rule))}")
        elif not all(_in_range(v, *rule) for v in values):
            raise ConfigError(f"{key}={value!r} is not allowed: {'each value ' if isinstance(value, list) else ''}"
                              f"must be {_describe_range(*rule)}")
    if not DEVICE.match(str(cfg.get("device", "auto"))):
        raise ConfigError(f"device={cfg.get('device')!r} is not allowed: choose auto, cpu, cuda or cuda:N")
    test = cfg.get("test", {})
    if test.get("tile_overlap", 0) >= test.get("tile_size", 1):
        raise ConfigError(f"test.tile_overlap={test['tile_overlap']} must be smaller than test.tile_size="
                          f"{test['tile_size']} (neighbouring tiles overlap by less than a tile)")
    ious = _get(cfg, "model.rpn.iou_thresholds")
    if ious is not None and (len(ious) != 2 or ious[0] > ious[1]):
        raise ConfigError(f"model.rpn.iou_thresholds={ious!r} must be [background_below, foreground_from] "
                          "with the first <= the second (detectron2: [0.3, 0.7])")
