"""CTO-stratified mask AP and AJI: the same metrics counted only where instances Cross, Touch or Overlap.

Definitions (gains/METRICS.md §5)
----------------------------------
**CTO ground truth.** Within one image, two non-crowd ground-truth instances *meet* when one mask,
dilated by the 3x3 square (8-connectivity), shares a pixel with the other: they overlap (>= 1 common
pixel; crossing is a case of overlap) or touch (a pixel of one is a horizontal, vertical or diagonal
neighbour of a pixel of the other). A one-pixel gap is not touching. A GT instance is **CTO** when it meets
at least one other non-crowd GT of the **same category** (`same_category_only=True`, the default) or of
any category (`same_category_only=False`). Crowd GTs are never CTO and make no other GT CTO; an empty
mask meets nothing. Every other non-crowd GT is non-CTO.
Why same-category by default: the paper's claim is about separating instances that must be told apart
from each other; per-category AP and AJI never match a cell detection against a nucleus GT, so a nucleus
lying inside its cell (ISBI2014) does not make the cell harder, and with any-category every such cell
would be CTO: the stratum would mean "contains a nucleus".

**Detection stratum.** A detection (of the top 100 per image and category, as for AP) belongs to the CTO
stratum when its mask shares >= 1 pixel (IoU > 0) with a CTO GT of its own category, and to the non-CTO
stratum otherwise. Every detection is in exactly one stratum, decided by its own mask, the role its area
plays for COCO's area ranges.

**Stratum AP** (S = CTO or non-CTO): COCO mask AP exactly as pycocotools computes it for the area range
'all', with "area inside the range" replaced by "in S": GTs outside S (and crowd GTs) are ignored, the
greedy matching prefers non-ignored GTs as usual, a detection matched to an ignored GT is ignored, and an
unmatched detection is ignored when it is not in the S detection stratum. Accumulation, interpolation and
the -1 of a category without S GT are unchanged. Equivalently: pycocotools with 'area' = -1 given to every
GT and detection outside S; APs/APm/APl and AR* are then "S and that size". Consequences: (a) perfect
predictions score 100 in both strata (every GT matched, nothing unmatched); (b) a false positive over a
CTO cluster (sharing a pixel with a CTO GT, e.g. a merged or badly split detection) counts in CTO AP;
(c) a false positive sharing no pixel with a CTO GT counts in non-CTO AP only and leaves CTO AP
unchanged. So each spurious detection is charged to exactly one stratum and neither hides background
false positives; one grazing both a CTO and an isolated GT is charged to CTO.

**Stratum AJI**: `aji` mode 'clean' (gains/METRICS.md §3: greedy, GT order, IoU >= 0.5, the top `max_dets` detections)
per image and category on the S GTs and the detections that stratum AP counts at IoU 0.5 (matched there
to an S GT, or unmatched and in the S detection stratum). An (image, category) is counted when it has
>= 1 of either (value 0 when one side is empty); mean over counted images per category, then over
categories with a counted image (-1 if none), as `aji`. Stratum 'all' is plain AP and plain `aji`
(clean) and equals `instance_metrics`.
"""
from __future__ import annotations

import numpy as np

from .aji import _aggregate, aji_from_overlaps, aji_image
from .average_precision import (STAT_NAMES, _mask_runs, _match_all, _mean_valid, _Pair, _precision_recall,
                      category_overlaps, mask_iou, normalize_images, summarize)
from .mask_runs import MaskRuns

STRATA = ("all", "cto", "non_cto")
OUTSIDE = -1.0  # an 'area' outside every COCO area range: how a stratum hides GTs and detections


def dilate_runs(runs: MaskRuns) -> MaskRuns:
    """The masks dilated by the 3x3 square, as runs in the same pixel order.

    Horizontal step: a run grows by one pixel on each side unless that side is a line boundary (a run
    spanning several lines covers the boundaries between them itself). Vertical step: the union with the
    result shifted one line up and down. The three copies may overlap, so the result is only fit to be the
    `other` argument of `MaskRuns.intersections` (exact for "> 0", counts overlapping pixels twice).
    """
    n = runs.line
    s = np.where(runs.starts % n != 0, runs.starts - 1, runs.starts)
    e = np.where(runs.ends % n != 0, runs.ends + 1, runs.ends)
    owner = np.repeat(np.arange(len(runs), dtype=np.int64), np.diff(runs.ptr))
    starts = np.clip(np.stack([s - n, s, s + n], 1).ravel(), 0, runs.size)  # mask-major order kept
    ends = np.clip(np.stack([e - n, e, e + n], 1).ravel(), 0, runs.size)
    owner = np.repeat(owner, 3)
    keep = ends > starts
    ptr = np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=len(runs)))]).astype(np.int64)
    return MaskRuns(starts[keep], ends[keep], ptr, runs.line, runs.size)


def cto_flags(gt_masks, labels, iscrowd=None, same_category_only: bool = True) -> np.ndarray:
    """bool [G]: which GT instances of one image are CTO (module docstring).

    gt_masks: bool/int [G,H,W] or [G,1,H,W] (numpy or torch), or a `MaskRuns` of G masks (any pixel order:
    row-major or COCO's column-major, the 3x3 square is symmetric). labels: int [G] category ids.
    iscrowd: bool/int [G] or None (no crowd).
    """
    labels = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels).reshape(-1)
    g = len(labels)
    crowd = np.zeros(g, bool) if iscrowd is None else np.asarray(
        iscrowd.detach().cpu() if hasattr(iscrowd, "detach") else iscrowd).astype(bool).reshape(-1)
    if len(crowd) != g:
        raise ValueError(f"cto_flags: iscrowd has {len(crowd)} entries, labels {g}")
    runs = gt_masks if isinstance(gt_masks, MaskRuns) else _mask_runs(gt_masks, g, "cto_flags GT")
    if len(runs) != g:
        raise ValueError(f"cto_flags: {len(runs)} masks but {g} labels")
    if g < 2:
        return np.zeros(g, dtype=bool)
    meet = runs.intersections(dilate_runs(runs)) > 0  # [i, j]: g_i meets g_j dilated (symmetric)
    np.fill_diagonal(meet, False)
    meet &= ~crowd[:, None] & ~crowd[None, :]
    if same_category_only:
        meet &= labels[:, None] == labels[None, :]
    return meet.any(axis=1)


def _stratum_pair(k, ov, im, flags, stratum: str, max_det: int):
    """The `_Pair` of one (image, category) for a stratum: outside-stratum GTs and detections get
    'area' OUTSIDE (ignored GT; ignored detection when unmatched), exactly like COCO's area ranges."""
    inter, det_pixels = ov.inter[:max_det], ov.det_pixels[:max_det]
    crowd = im.gt_crowd[ov.gt_index]
    gt_area = im.gt_areas[ov.gt_index].copy()
    det_area = det_pixels.astype(np.float64)
    if stratum != "all":
        gt_cto = flags[ov.gt_index]
        det_cto = (inter[:, gt_cto] > 0).any(axis=1)
        want = stratum == "cto"
        gt_area[gt_cto != want] = OUTSIDE
        det_area[det_cto != want] = OUTSIDE
    ious = mask_iou(inter, det_pixels, ov.gt_pixels, crowd)
    return _Pair(k, ious, crowd, gt_area, det_area, im.det_scores[ov.det_index[:max_det]])


def _stratum_aji(images, overlaps, flags, items, matches, cats, stratum: str, max_det: int) -> dict:
    """`aji` (clean) on the stratum's GTs and the detections its AP counts at IoU 0.5."""
    if stratum == "all":
        return aji_from_overlaps(images, overlaps, cats, "aji", "clean", max_det)
    want = stratum == "cto"
    per_image = {im.image_id: {} for im in images}
    for (n, c, ov), (_, det_ignored, _) in zip(items, matches):
        if c not in cats:
            continue
        im = images[n]
        keep_g = (flags[n][ov.gt_index] == want) & ~im.gt_crowd[ov.gt_index]
        keep_d = ~det_ignored[0, 0]  # area range 'all' (= the stratum), IoU threshold 0.5
        if not keep_g.any() and not keep_d.any():
            continue
        if not keep_g.any() or not keep_d.any():
            per_image[im.image_id][c] = 0.0
            continue
        inter = ov.inter[:max_det][np.ix_(keep_d, keep_g)]
        per_image[im.image_id][c] = aji_image(inter, ov.gt_pixels[keep_g], ov.det_pixels[:max_det][keep_d])
    return _aggregate(per_image, cats)


def stratified_metrics(gt_per_image, det_per_image, category_ids, same_category_only: bool = True,
                       max_dets=(1, 10, 100)) -> dict:
    """Mask AP and `aji` (clean) overall, on CTO instances and on non-CTO instances (module docstring).

    Inputs as `gains.average_precision.evaluate_instances` / `instance_metrics` (per-image dicts with 'labels',
    'masks' and optional 'iscrowd', 'areas', 'image_id' for GT; 'labels', 'scores', 'masks' for
    detections); masks are required.

    Returns {"same_category_only": bool, "cto_flags": {image_id: bool [G]} (GT order of the input),
    "all" | "cto" | "non_cto": {"AP", "AP50", "AP75": x100 (-100 when the stratum has no GT),
    "aji": fraction (-1 if nothing counted), "num_gt": non-crowd GTs of `category_ids` in the stratum
    ('all': every non-crowd GT), "stats": the 12 COCOeval stats (fractions) restricted to the stratum,
    "per_category": {cat_id: {"AP", "AP50", "AP75" (fractions, -1 = no GT), "aji" (None = not counted),
    "num_gt"}}}}. One intersection pass per image serves every stratum; the matching runs once.
    """
    return stratified_metrics_images(normalize_images(gt_per_image, det_per_image), category_ids,
                                     same_category_only, max_dets)


def stratified_metrics_images(images, category_ids, same_category_only: bool = True,
                              max_dets=(1, 10, 100)) -> dict:
    """`stratified_metrics` on already normalised images (`gains.average_precision.normalize_images` output, e.g. the
    evaluator's streamed accumulator)."""
    max_dets = sorted(int(m) for m in max_dets)
    if len(max_dets) != 3:
        raise ValueError("max_dets needs exactly 3 values, like COCOeval's maxDets")
    cats = [int(c) for c in sorted(set(category_ids))]
    index = {c: k for k, c in enumerate(cats)}
    for im in images:
        if (len(im.gt_labels) and im.gt_masks is None) or (len(im.det_labels) and im.det_masks is None):
            raise ValueError(f"image {im.image_id}: CTO metrics need 'masks' for GT and detections")
        unknown = set(np.concatenate([im.gt_labels, im.det_labels]).tolist()) - set(index)
        if unknown:
            raise ValueError(f"image {im.image_id}: category ids {sorted(unknown)} are not in category_ids "
                             f"{cats}; map labels back to the dataset's category ids")
    max_det = max_dets[-1]
    flags = [cto_flags(im.gt_masks, im.gt_labels, im.gt_crowd, same_category_only) if len(im.gt_labels)
             else np.zeros(0, dtype=bool) for im in images]
    overlaps = [category_overlaps(im, max_det) for im in images]
    items = [(n, c, ov) for n, per_cat in enumerate(overlaps) for c, ov in per_cat.items()]
    K = len(cats)
    pairs = [_stratum_pair(index[c] + s * K, ov, images[n], flags[n], stratum, max_det)
             for s, stratum in enumerate(STRATA) for n, c, ov in items]
    matches = _match_all(pairs)  # per pair (det matched, det ignored [A,T,D], gt ignored [A,G])
    precision, recall = _precision_recall(pairs, matches, len(STRATA) * K, max_dets)
    out = {"same_category_only": bool(same_category_only),
           "cto_flags": {im.image_id: f for im, f in zip(images, flags)}}
    at = {"AP": slice(None), "AP50": 0, "AP75": 5}  # rows of IOU_THRESHOLDS
    for s, stratum in enumerate(STRATA):
        ks = slice(s * K, (s + 1) * K)
        stats = summarize(precision[:, :, ks], recall[:, ks], max_dets)
        aji = _stratum_aji(images, overlaps, flags, items, matches[s * len(items):(s + 1) * len(items)],
                           cats, stratum, max_det)
        in_stratum = [(~im.gt_crowd) & (np.ones_like(f) if stratum == "all" else f == (stratum == "cto"))
                      for im, f in zip(images, flags)]
        num_gt = {c: int(sum(np.count_nonzero(m & (im.gt_labels == c)) for im, m in zip(images, in_stratum)))
                  for c in cats}
        per_category = {c: {**{name: _mean_valid(precision[t, :, s * K + k, 0, -1]) for name, t in at.items()},
                            "aji": aji["per_category"][c], "num_gt": num_gt[c]} for k, c in enumerate(cats)}
        out[stratum] = {**{name: 100.0 * stats[i] for i, name in enumerate(STAT_NAMES[:3])},
                        "aji": aji["mean"], "num_gt": sum(num_gt.values()), "stats": stats,
                        "per_category": per_category}
    return out
