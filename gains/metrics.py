"""Metrics of the GAInS tables: native COCO AP (segm/bbox) and the AJI family (gains/METRICS.md).

Entry points:
- `coco_evaluate(gt, results)`: COCO dataset dict + COCO results list -> the pycocotools COCOeval numbers.
  RLEs are parsed natively into runs, never decoded; pycocotools only rasterises polygons (frPyObjects)
  and merges multi-part ones (decode/encode).
- `evaluate_instances(gt_per_image, det_per_image, category_ids)`: the same from in-memory masks/boxes
  (layout in `gains.average_precision`), so the evaluator never re-encodes masks.
- `instance_metrics(...)`: mask AP and every AJI variant from one pass of pixel intersections.
- `aji`, `aji_kumar`, `aji_plus` and their per-image helpers (`gains.aji`).
"""
from __future__ import annotations

import numpy as np

from .annotations import check_coco_gt, check_coco_results, polygon_list
from .aji import (AJI_MODES, aji, aji_from_overlaps, aji_gains_image, aji_image, aji_kumar,  # noqa: F401
                  aji_kumar_image, aji_plus, aji_plus_image, greedy_aji_matches, range_ignore)
from .average_precision import (AREA_NAMES, AREA_RANGES, IOU_THRESHOLDS, RECALL_THRESHOLDS, STAT_NAMES,  # noqa: F401
                      ImageInstances, box_iou_xywh, category_overlaps, evaluate_images, evaluate_instances,
                      mask_iou, normalize_images, pairwise_intersections, stat_names, summarize)
from .mask_runs import MaskRuns, empty_runs, runs_from_dense, runs_from_rles  # noqa: F401


def instance_metrics(gt_per_image, det_per_image, category_ids, aji_mode: str = "clean",
                     max_dets=(1, 10, 100)) -> dict:
    """Mask AP (as `evaluate_instances`, iou_type 'segm') plus 'aji' (in `aji_mode`), 'aji_kumar' and
    'aji_plus', sharing one intersection pass per image. Every metric scores the same detections: the top
    max(max_dets) per image and category (COCO's maxDets; raise it to score more)."""
    images = normalize_images(gt_per_image, det_per_image)
    cap = max(int(m) for m in max_dets)
    overlaps = [category_overlaps(im, cap) for im in images]
    out = evaluate_images(images, category_ids, "segm", max_dets, overlaps)
    cats = sorted({int(c) for c in category_ids})
    for kind in ("aji", "aji_kumar", "aji_plus"):
        out[kind] = aji_from_overlaps(images, overlaps, cats, kind, aji_mode, cap)
    return out


# ----------------------------------------------------------------------------------------- COCO json
def _rles(segm, h: int, w: int) -> list:
    """A validated COCO segmentation (polygons, uncompressed or compressed RLE) -> RLEs whose union is the
    mask (one per polygon part)."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, dict):
        return [segm]  # compressed or uncompressed: `runs_from_rles` reads both
    return mask_utils.frPyObjects([list(map(float, p)) for p in polygon_list(segm)], h, w)


def _mask_runs(segms: list, h: int, w: int) -> MaskRuns:
    """Segmentations of one image -> MaskRuns; multi-part polygons are merged by decoding them."""
    from pycocotools import mask as mask_utils

    rles = []
    for segm in segms:
        parts = _rles(segm, h, w)
        if len(parts) > 1:  # the union of polygon parts, re-encoded as one RLE
            union = mask_utils.decode(parts).any(axis=2)
            parts = [mask_utils.encode(np.asfortranarray(union.astype(np.uint8)))]
        rles.extend(parts)
    return runs_from_rles(rles, h, w)


def _coco_images(gt: dict, results: list, iou_type: str, gt_name: str, results_name: str):
    """Validate both inputs (annotations.check_coco_gt / check_coco_results: one rule and one DataError per
    malformed input, shared with evaluation.evaluate_results and load_coco) -> (ImageInstances per image,
    sorted category ids)."""
    geometry = "segmentation" if iou_type == "segm" else "bbox"
    truth = check_coco_gt(gt, gt_name, geometry=geometry)
    dets = check_coco_results(results, truth, results_name, geometry=geometry)
    out = []
    for i in sorted(truth.images):
        (h, w), ga, dr = truth.size(i), truth.annotations[i], dets[i]
        gm = dm = gb = db = None
        if iou_type == "segm":
            gm = _mask_runs([a["segmentation"] for a in ga], h, w)
            dm = _mask_runs([r["segmentation"] for r in dr], h, w)
        else:
            gb = np.array([a["bbox"] for a in ga], dtype=np.float64).reshape(-1, 4)
            db = np.array([r["bbox"] for r in dr], dtype=np.float64).reshape(-1, 4)
        areas = [a.get("area") for a in ga]
        if any(x is None for x in areas):  # pycocotools needs the field; we fall back to the mask or box
            fallback = gm.areas() if gm is not None else gb[:, 2] * gb[:, 3]
            areas = [fallback[n] if x is None else x for n, x in enumerate(areas)]
        out.append(ImageInstances(
            i, np.array([a["category_id"] for a in ga], dtype=np.int64).reshape(-1),
            np.array([bool(a.get("iscrowd", 0)) for a in ga], dtype=bool).reshape(-1),
            np.array(areas, dtype=np.float64).reshape(-1), gm, gb,
            np.array([r["category_id"] for r in dr], dtype=np.int64).reshape(-1),
            np.array([r["score"] for r in dr], dtype=np.float64).reshape(-1), dm, db))
    return out, list(truth.categories.json_ids)


def coco_evaluate(gt: dict, results: list[dict], iou_type: str = "segm", max_dets=(1, 10, 100), *,
                  gt_name: str = "ground truth", results_name: str = "results") -> dict:
    """COCO AP of `results` against the COCO dataset dict `gt`, equal to pycocotools COCOeval.

    gt: {"images": [{id, height, width}], "categories": [{id}], "annotations": [{id >= 1, image_id,
    category_id, segmentation (polygons / RLE; for 'segm'), bbox xywh (for 'bbox'), iscrowd (default 0),
    area (area ranges only; if absent: mask pixel count, or box w*h for box-only annotations)}]}.
    results: [{image_id, category_id, score, segmentation RLE (segm) and/or bbox xywh (bbox)}]; a 'bbox'
    in segm results is ignored (detection area = mask area, as detectron2 does). An empty list gives AP 0
    where pycocotools' loadRes would crash. Returns the dict of `coco_ap.evaluate_instances`. Malformed input
    of either kind is a DataError from `annotations.check_coco_gt` / `check_coco_results` (the rules and
    messages of evaluation.evaluate_results), starting with `gt_name` / `results_name`.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    images, cats = _coco_images(gt, results, iou_type, gt_name, results_name)
    return evaluate_images(images, cats, iou_type, max_dets)
