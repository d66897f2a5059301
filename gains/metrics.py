"""Metrics of the GAInS tables: native COCO AP (segm/bbox) and the AJI family (METRICS.md).

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
def _rles(segm, h: int, w: int, where: str) -> list:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> RLEs whose union is the mask
    (one per polygon part)."""
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segm, list) and segm and all(isinstance(p, (list, tuple)) for p in segm):
            return mask_utils.frPyObjects([list(map(float, p)) for p in segm], h, w)
        if isinstance(segm, dict) and "counts" in segm and "size" in segm:
            if list(segm["size"]) != [h, w]:
                raise ValueError(f"RLE size {list(segm['size'])} differs from the image size {[h, w]}")
            return [segm]  # compressed or uncompressed: `runs_from_rles` reads both
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: 'segmentation' must be a non-empty list of polygons or an RLE dict "
                     "with 'size' and 'counts'")


def _mask_runs(segms: list, h: int, w: int, where: list[str]) -> MaskRuns:
    """Segmentations of one image -> MaskRuns; multi-part polygons are merged by decoding them."""
    from pycocotools import mask as mask_utils

    rles = []
    for segm, wh in zip(segms, where):
        parts = _rles(segm, h, w, wh)
        if len(parts) > 1:  # the union of polygon parts, re-encoded as one RLE
            union = mask_utils.decode(parts).any(axis=2)
            parts = [mask_utils.encode(np.asfortranarray(union.astype(np.uint8)))]
        rles.extend(parts)
    return runs_from_rles(rles, h, w)


def _check_ids(gt: dict):
    """Validate the ground-truth dict; returns ({image_id: image}, sorted category ids)."""
    images = {}
    for im in gt.get("images", []):
        if im["id"] in images:
            raise ValueError(f"ground truth: image id {im['id']} appears twice in 'images'")
        images[im["id"]] = im
    cats = [c["id"] for c in gt.get("categories", [])]
    if len(set(cats)) != len(cats):
        raise ValueError("ground truth: duplicate category ids in 'categories'")
    seen = set()
    for n, a in enumerate(gt.get("annotations", [])):
        ann_id = a.get("id")
        if ann_id is None or ann_id < 1:
            raise ValueError(f"ground truth: annotation #{n} has id {ann_id!r}; annotation ids must be >= 1 "
                             "(pycocotools treats id 0 as 'unmatched'); renumber them 1..N")
        if ann_id in seen:
            raise ValueError(f"ground truth: annotation id {ann_id} is used twice; ids must be unique")
        seen.add(ann_id)
        if a["image_id"] not in images or a["category_id"] not in set(cats):
            raise ValueError(f"ground truth: annotation {ann_id} refers to image {a['image_id']} / category "
                             f"{a['category_id']}, not listed in 'images' / 'categories'")
    return images, sorted(set(cats))


def _check_results(results: list, images: dict, cats: list, iou_type: str):
    bad_images = sorted({r["image_id"] for r in results} - set(images))
    if bad_images:
        raise ValueError(f"results refer to image ids {bad_images[:20]} that are not in the ground truth; "
                         "evaluate against the annotation file the predictions were made for")
    bad_cats = sorted({r["category_id"] for r in results} - set(cats))
    if bad_cats:
        raise ValueError(f"results use category ids {bad_cats[:20]} that are not in the ground truth "
                         f"{cats[:20]}; map the model's contiguous labels back to the dataset's category ids")
    key = "segmentation" if iou_type == "segm" else "bbox"
    missing = [n for n, r in enumerate(results) if key not in r or "score" not in r]
    if missing:
        raise ValueError(f"results #{missing[:10]} lack '{key}' or 'score', needed for iou_type {iou_type!r}")


def _coco_images(gt: dict, results: list, iou_type: str):
    images, cats = _check_ids(gt)
    _check_results(results, images, cats, iou_type)
    anns = {i: [] for i in images}
    dets = {i: [] for i in images}
    for a in gt.get("annotations", []):
        anns[a["image_id"]].append(a)
    for r in results:  # results order decides score ties, as in pycocotools
        dets[r["image_id"]].append(r)
    out = []
    for i in sorted(images):
        h, w = int(images[i]["height"]), int(images[i]["width"])
        ga, dr = anns[i], dets[i]
        gm = dm = gb = db = None
        if iou_type == "segm":
            gm = _mask_runs([a["segmentation"] for a in ga], h, w, [f"annotation {a['id']}" for a in ga])
            dm = _mask_runs([r["segmentation"] for r in dr], h, w, [f"result for image {i}"] * len(dr))
        else:
            missing = [a["id"] for a in ga if len(a.get("bbox") or []) != 4]
            if missing:
                raise ValueError(f"ground truth: annotations {missing[:10]} need a 'bbox' [x, y, w, h] for "
                                 "iou_type 'bbox'")
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
    return out, cats


def coco_evaluate(gt: dict, results: list[dict], iou_type: str = "segm", max_dets=(1, 10, 100)) -> dict:
    """COCO AP of `results` against the COCO dataset dict `gt`, equal to pycocotools COCOeval.

    gt: {"images": [{id, height, width}], "categories": [{id}], "annotations": [{id >= 1, image_id,
    category_id, segmentation (polygons / RLE; for 'segm'), bbox xywh (for 'bbox'), iscrowd (default 0),
    area (area ranges only; if absent: mask pixel count, or box w*h for box-only annotations)}]}.
    results: [{image_id, category_id, score, segmentation RLE (segm) and/or bbox xywh (bbox)}]; a 'bbox'
    in segm results is ignored (detection area = mask area, as detectron2 does). An empty list gives AP 0
    where pycocotools' loadRes would crash. Returns the dict of `coco_ap.evaluate_instances`.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    images, cats = _coco_images(gt, results, iou_type)
    return evaluate_images(images, cats, iou_type, max_dets)
