"""Contact-zone IoU: mask quality exactly where instances cross, touch or overlap (what GAInS targets).

Definition (gains/METRICS.md §6)
---------------------------------------
Within one image and category, two ground-truth instances *meet* as in `gains.cto` (one mask dilated by the
3x3 square shares a pixel with the other). Let D(m) be mask m dilated by the (2r+1) x (2r+1) square
(r = `radius`, default 2: the 5-px window of the GA maps). The **contact zone** of a GT g is

    Z_g = D(g) ∩ ⋃_{h meets g} D(h)

the pixels within r of both g and a neighbour it meets: the overlap itself, the pixels along a touching
boundary, and a band of r pixels around them (so a prediction that leaks into the neighbour, or stops short
of the shared pixels, is charged). Z_g is non-empty exactly for CTO GTs. The **prediction of g** is the
detection of g's category with score >= `score_thresh` whose whole mask has the highest IoU with g (none:
the prediction is empty). Then

    zone IoU(g) = |p ∩ g ∩ Z_g| / |(p ∪ g) ∩ Z_g|        (CTO GTs only; 0 when p is empty)

and the reported figure is its mean over CTO GTs. `mask IoU(g)` = |p ∩ g| / |p ∪ g| with the same p, for
every GT, separates "the masks are worse everywhere" from "worse where instances meet". Crowd GTs take no
part. Dense per image ([N, H, W] bool), meant for benchmark-size images such as ISBI2014's 512 x 512.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def _meets(gt_masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """bool [G, G]: g_i (3x3-dilated) shares a pixel with g_j, same category, i != j."""
    g = len(gt_masks)
    grown = [ndimage.binary_dilation(m, np.ones((3, 3), bool)) for m in gt_masks]
    meet = np.zeros((g, g), bool)
    for i in range(g):
        for j in range(i + 1, g):
            if labels[i] == labels[j] and (grown[i] & gt_masks[j]).any():
                meet[i, j] = meet[j, i] = True
    return meet


def contact_zones(gt_masks: np.ndarray, labels, radius: int = 2) -> np.ndarray:
    """bool [G, H, W]: the contact zone Z_g of each GT (module docstring); all False for non-CTO GTs.

    gt_masks: bool [G, H, W] (non-crowd GTs of one image); labels: int [G] category ids."""
    gt_masks = np.asarray(gt_masks, bool)
    labels = np.asarray(labels).reshape(-1)
    zones = np.zeros_like(gt_masks)
    if len(gt_masks) < 2:
        return zones
    meet = _meets(gt_masks, labels)
    square = np.ones((2 * radius + 1, 2 * radius + 1), bool)
    grown = np.stack([ndimage.binary_dilation(m, square) for m in gt_masks])
    for i in range(len(gt_masks)):
        if meet[i].any():
            zones[i] = grown[i] & grown[meet[i]].any(axis=0)
    return zones


def zone_scores(gt_masks, gt_labels, det_masks, det_labels, det_scores, radius: int = 2,
                score_thresh: float = 0.5) -> dict:
    """Per-GT contact-zone IoU and whole-mask IoU of one image.

    gt_masks bool [G,H,W] (non-crowd), gt_labels int [G]; det_masks bool [D,H,W], det_labels int [D],
    det_scores float [D]. Returns {"cto": bool [G], "zone_iou": float [G] (NaN for non-CTO GTs),
    "mask_iou": float [G] (0 when no detection of the category passes score_thresh)}.
    """
    gt = np.asarray(gt_masks, bool)
    gl = np.asarray(gt_labels).reshape(-1)
    det = np.asarray(det_masks, bool).reshape(-1, *gt.shape[1:]) if len(gt) else np.asarray(det_masks, bool)
    dl = np.asarray(det_labels).reshape(-1)
    ds = np.asarray(det_scores, np.float64).reshape(-1)
    zones = contact_zones(gt, gl, radius)
    cto = zones.reshape(len(gt), -1).any(axis=1)
    zone_iou = np.full(len(gt), np.nan)
    mask_iou = np.zeros(len(gt))
    keep = ds >= score_thresh
    det, dl, ds = det[keep], dl[keep], ds[keep]
    det_area = det.reshape(len(det), -1).sum(axis=1)
    for i, g in enumerate(gt):
        p = np.zeros_like(g)
        cand = np.where(dl == gl[i])[0]
        if len(cand):
            inter = (det[cand] & g).reshape(len(cand), -1).sum(axis=1)
            union = det_area[cand] + g.sum() - inter
            iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
            best = cand[np.lexsort((-ds[cand], -iou))[0]]  # highest IoU, then highest score
            p = det[best]
            mask_iou[i] = iou[np.where(cand == best)[0][0]]
        if cto[i]:
            z = zones[i]
            union = ((p | g) & z).sum()
            zone_iou[i] = ((p & g) & z).sum() / union if union else 0.0
    return {"cto": cto, "zone_iou": zone_iou, "mask_iou": mask_iou}
