"""Aggregated Jaccard Index family on per-instance masks (overlaps allowed): gains/METRICS.md §3-§4.

Three definitions, never to be confused:
- `aji` (the GAInS/DoNet tables): per category, detections score-sorted (stable) and cut at `max_dets`
  (100 in the published evaluator, COCO's maxDets; the evaluator's `test.max_dets_eval`); each GT
  in annotation order takes the free detection with the largest IoU if IoU >= 0.5 (a tie goes to the later
  detection). mode 'clean' is that definition; mode 'gains' reproduces the published evaluator, which
  repeats it for the 4 COCO area ranges and averages, adding for unmatched GT positions the areas of
  the GT list re-ordered for that range (ignored last) while matching in the original order.
- `aji_kumar` (Kumar et al. 2017): each GT takes its max-IoU detection (IoU > 0), detections reusable.
- `aji_plus` (HoVer-Net AJI+): one-to-one Hungarian matching maximising IoU, zero-IoU pairs dropped.

Kumar and AJI+ take the same cap when one is given (`aji_from_overlaps`), so one evaluation scores one
set of detections with every metric. All sums are exact integer pixel counts. Every per-image helper takes
    inter       int64 [D, G]  |d ∩ g| with detections in descending score order (stable)
    gt_pixels   int64 [G]     |g|
    det_pixels  int64 [D]     |d|
and returns a float in [0, 1] (0 when the union is empty). `iscrowd` plays no part: a crowd annotation
counts as an ordinary instance (biomedical data sets have none), except for the range re-ordering of
mode 'gains', which follows the evaluator (crowd = ignored).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .average_precision import AREA_RANGES, ImageInstances, category_overlaps, normalize_images

AJI_MODES = ("clean", "gains")


def _ratio(inter_sum: int, union_sum: int) -> float:
    return float(inter_sum) / float(union_sum) if union_sum > 0 else 0.0


def _union(inter: np.ndarray, gt_pixels: np.ndarray, det_pixels: np.ndarray) -> np.ndarray:
    return det_pixels[:, None] + gt_pixels[None, :] - inter


def _iou(inter, gt_pixels, det_pixels) -> np.ndarray:
    union = _union(inter, gt_pixels, det_pixels)
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def greedy_aji_matches(inter, gt_pixels, det_pixels, iou_threshold: float = 0.5) -> np.ndarray:
    """GT-ordered greedy one-to-one matching of `aji`: int64 [G], the detection row of each GT or -1."""
    iou = _iou(inter, gt_pixels, det_pixels)
    free = np.ones(len(det_pixels), dtype=bool)
    match = np.full(len(gt_pixels), -1, dtype=np.int64)
    for g in range(len(gt_pixels)):
        if not free.any():
            break
        col = np.where(free, iou[:, g], -1.0)
        d = len(col) - 1 - int(np.argmax(col[::-1]))  # the later detection wins a tie
        if col[d] >= iou_threshold:
            match[g], free[d] = d, False
    return match


def _matched_sums(inter, gt_pixels, det_pixels, match):
    g = np.flatnonzero(match >= 0)
    d = match[g]
    union = det_pixels[d] + gt_pixels[g] - inter[d, g]
    return int(inter[d, g].sum()), int(union.sum()), d


def aji_image(inter, gt_pixels, det_pixels) -> float:
    """`aji` of one image and category, mode 'clean'."""
    match = greedy_aji_matches(inter, gt_pixels, det_pixels)
    i_sum, u_sum, used = _matched_sums(inter, gt_pixels, det_pixels, match)
    u_sum += int(gt_pixels[match < 0].sum()) + int(np.delete(det_pixels, used).sum())
    return _ratio(i_sum, u_sum)


def range_ignore(gt_areas: np.ndarray, iscrowd: np.ndarray) -> np.ndarray:
    """bool [4, G]: the evaluator's per-range ignore flags (crowd, or 'area' field outside the range)."""
    lo = np.array([r[0] for r in AREA_RANGES])[:, None]
    hi = np.array([r[1] for r in AREA_RANGES])[:, None]
    return iscrowd[None, :].astype(bool) | (gt_areas[None, :] < lo) | (gt_areas[None, :] > hi)


def aji_gains_image(inter, gt_pixels, det_pixels, ignore: np.ndarray) -> float:
    """`aji` of one image and category, mode 'gains': mean over the 4 area-range copies.

    ignore: bool [4, G] from `range_ignore`. The matching is the clean one in every copy; only the
    unmatched-GT areas differ: position i of the re-ordered GT list (stable, ignored last) is charged
    for an unmatched GT i of the original order, as the published evaluator does.
    """
    match = greedy_aji_matches(inter, gt_pixels, det_pixels)
    i_sum, u_sum, used = _matched_sums(inter, gt_pixels, det_pixels, match)
    u_sum += int(np.delete(det_pixels, used).sum())
    copies = []
    for flags in ignore:
        reordered = gt_pixels[np.argsort(flags, kind="mergesort")]
        copies.append(_ratio(i_sum, u_sum + int(reordered[match < 0].sum())))
    return float(np.mean(copies))


def _reuse_sums(inter, gt_pixels, det_pixels, gt_rows, det_rows):
    """Sums for GT->detection pairs (detections may repeat) plus the areas of everything left alone."""
    union = det_pixels[det_rows] + gt_pixels[gt_rows] - inter[det_rows, gt_rows]
    lone_gt = np.setdiff1d(np.arange(len(gt_pixels)), gt_rows)
    lone_det = np.setdiff1d(np.arange(len(det_pixels)), det_rows)
    u_sum = int(union.sum()) + int(gt_pixels[lone_gt].sum()) + int(det_pixels[lone_det].sum())
    return _ratio(int(inter[det_rows, gt_rows].sum()), u_sum)


def aji_kumar_image(inter, gt_pixels, det_pixels) -> float:
    """Kumar et al.'s AJI: every GT takes its max-IoU detection (first one on a tie) if IoU > 0."""
    if len(gt_pixels) == 0 or len(det_pixels) == 0:
        return _reuse_sums(inter, gt_pixels, det_pixels, np.zeros(0, int), np.zeros(0, int))
    iou = _iou(inter, gt_pixels, det_pixels)
    best = np.argmax(iou, axis=0)
    gt_rows = np.flatnonzero(iou[best, np.arange(len(gt_pixels))] > 0)
    return _reuse_sums(inter, gt_pixels, det_pixels, gt_rows, best[gt_rows])


def aji_plus_image(inter, gt_pixels, det_pixels) -> float:
    """HoVer-Net's AJI+: Hungarian one-to-one matching maximising the summed IoU, IoU-0 pairs dropped."""
    if len(gt_pixels) == 0 or len(det_pixels) == 0:
        return _reuse_sums(inter, gt_pixels, det_pixels, np.zeros(0, int), np.zeros(0, int))
    iou = _iou(inter, gt_pixels, det_pixels)
    gt_rows, det_rows = linear_sum_assignment(-iou.T)
    keep = iou[det_rows, gt_rows] > 0
    return _reuse_sums(inter, gt_pixels, det_pixels, gt_rows[keep], det_rows[keep])


# ----------------------------------------------------------------------------------------- data sets
def _aggregate(per_image: dict, category_ids) -> dict:
    """Mean over counted images per category, then over categories that have a counted image."""
    per_category = {}
    for c in category_ids:
        values = [v[c] for v in per_image.values() if v.get(c) is not None]
        per_category[c] = float(np.mean(values)) if values else None
    counted = [v for v in per_category.values() if v is not None]
    return {"per_image": per_image, "per_category": per_category,
            "mean": float(np.mean(counted)) if counted else -1.0}


def aji_from_overlaps(images: list[ImageInstances], overlaps, category_ids, kind="aji", mode="clean",
                      max_dets: int | None = 100) -> dict:
    """The AJI `kind` ('aji' | 'aji_kumar' | 'aji_plus') from `category_overlaps` of every image.

    max_dets: every kind scores only the top `max_dets` detections (by score, stable) of each image and
    category, the cap COCO AP uses (the evaluator's `test.max_dets_eval`); None scores them all.
    overlaps[n] must hold at least those detections of image n.
    """
    if mode not in AJI_MODES:
        raise ValueError(f"aji mode must be one of {AJI_MODES}, got {mode!r}")
    category_ids = [int(c) for c in category_ids]
    per_image = {}
    for im, per_cat in zip(images, overlaps):
        values = {}
        for c, ov in per_cat.items():
            if c not in category_ids:
                continue
            # rows are in score order, so the cap is a prefix; slicing by None keeps them all
            inter, gp, dp = ov.inter[:max_dets], ov.gt_pixels, ov.det_pixels[:max_dets]
            if kind == "aji":
                if len(gp) == 0 or len(dp) == 0:
                    values[c] = 0.0
                elif mode == "gains":
                    ignore = range_ignore(im.gt_areas[ov.gt_index], im.gt_crowd[ov.gt_index])
                    values[c] = aji_gains_image(inter, gp, dp, ignore)
                else:
                    values[c] = aji_image(inter, gp, dp)
            elif kind == "aji_kumar":
                values[c] = aji_kumar_image(inter, gp, dp)
            elif kind == "aji_plus":
                values[c] = aji_plus_image(inter, gp, dp)
            else:
                raise ValueError(f"unknown AJI kind {kind!r}")
        per_image[im.image_id] = values
    out = _aggregate(per_image, category_ids)
    out.update(kind=kind, mode=mode if kind == "aji" else None)
    return out


def _dataset(gt_per_image, det_per_image, category_ids, kind, mode="clean", max_dets=None) -> dict:
    images = normalize_images(gt_per_image, det_per_image)
    for im in images:
        if (len(im.gt_labels) and im.gt_masks is None) or (len(im.det_labels) and im.det_masks is None):
            raise ValueError(f"image {im.image_id}: AJI needs 'masks' for GT and detections")
    overlaps = [category_overlaps(im, max_dets) for im in images]
    return aji_from_overlaps(images, overlaps, category_ids, kind, mode, max_dets)


def aji(gt_per_image, det_per_image, category_ids, mode: str = "clean", max_dets: int = 100) -> dict:
    """Data-set `aji` (GAInS/DoNet tables), inputs as `average_precision.evaluate_instances` (masks needed;
    labels outside `category_ids` are left out).

    Returns {"per_image": {image_id: {cat_id: value}} (only categories present in that image),
    "per_category": {cat_id: mean over counted images or None}, "mean": mean over categories with a
    counted image (-1 if none), "kind": "aji", "mode": mode}.
    """
    return _dataset(gt_per_image, det_per_image, category_ids, "aji", mode, max_dets)


def aji_kumar(gt_per_image, det_per_image, category_ids, max_dets: int | None = None) -> dict:
    """Data-set Kumar AJI (score order irrelevant except for ties and the cap); as `aji`. max_dets: only the
    top max_dets detections per image and category take part (None: all)."""
    return _dataset(gt_per_image, det_per_image, category_ids, "aji_kumar", max_dets=max_dets)


def aji_plus(gt_per_image, det_per_image, category_ids, max_dets: int | None = None) -> dict:
    """Data-set AJI+ (HoVer-Net); result layout and max_dets as `aji_kumar`."""
    return _dataset(gt_per_image, det_per_image, category_ids, "aji_plus", max_dets=max_dets)
