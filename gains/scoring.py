"""Scoring: ground truth and detections of one image -> the running metric sums -> the metrics dict, its
printed table and metrics.json. Shared by `evaluation.evaluate_model` (a model over a split) and
`evaluation.evaluate_results` (a COCO results file), so both report exactly the same numbers.

Metrics (gains/METRICS.md), on per-instance masks at the ORIGINAL image resolution: COCO mask AP (mAP =
AP@[.5:.95], AP50, AP75; in %), box AP, the GAInS/DoNet `aji` (mode `test.aji_mode`), `aji_kumar` and
`aji_plus` (fractions in [0,1]; the table prints AJI x100 like the paper), per category and averaged; the
CTO strata (gains.cto).

The detection cap (`test.max_dets_eval`, `evaluate.py --max-dets`): every metric above scores the top
`max_dets` detections of each image and category (COCO's maxDets = [1, 10, max_dets]), so the paper
configs' 100 reproduce the authors' evaluator (COCOeval's default, the published AJI's "top 100 per
category"). None scores every detection: maxDets = [1, 10, M] with M = max(100, the most detections of
one image and category), which truncates nothing and equals COCO's default numbers wherever no image has
more than 100. An image with more ground truths or detections of a category than the cap is named in a
warning: beyond the cap, ground truths cannot all be matched and detections are not scored.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from .annotations import CategoryMap, ImageRecord, segmentation_to_mask, segmentation_to_rle
from .atomic import write_json_atomic
from .cto import stratified_metrics_images
from .errors import EvaluationError
from .mask_runs import runs_from_rles
from .metrics import AJI_MODES, aji_from_overlaps, category_overlaps, evaluate_images, normalize_images, stat_names

COCO_MAX_DETS = 100  # COCOeval's default maxDets[-1]: the published numbers' cap
AJI_KINDS = ("aji", "aji_kumar", "aji_plus")
CAP_KEY = "test.max_dets_eval (evaluate.py --max-dets)"


def check_max_dets(max_dets, where: str = "test.max_dets_eval") -> int | None:
    """The evaluation's detection cap: None (no cap) or an integer >= 10; else EvaluationError naming
    `where` and the fix. (>= 10: COCO's summary also reports AR at 1 and 10 detections.)"""
    if max_dets is None:
        return None
    if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 10:
        raise EvaluationError(f"{where} must be null (score every detection) or an integer >= 10 (detections "
                              f"scored per image and category, COCO's maxDets; 100 = the paper), got {max_dets!r}")
    return int(max_dets)


def coco_max_dets(max_dets: int | None, largest: int) -> tuple[int, int, int]:
    """COCO's three maxDets for the cap `max_dets` (None: no cap) when the most detections any (image,
    category) has is `largest`: (1, 10, max_dets), or (1, 10, max(100, largest)) without a cap."""
    return (1, 10, int(max_dets) if max_dets is not None else max(COCO_MAX_DETS, int(largest)))


def gt_instances(record: ImageRecord, as_runs: bool = False) -> dict:
    """Ground truth of one image at its original resolution, in the per-image layout of gains.average_precision:
    `image_id`, `labels` int64 [G] json category ids, `masks` uint8 [G,H0,W0] (pycocotools' rasteriser),
    `boxes_xywh` float64 [G,4] (the annotation's bbox), `iscrowd` bool [G], `areas` float64 [G] (the
    annotation's 'area' field, used for the COCO area ranges). Crowd annotations are included.
    as_runs: `masks` is a `MaskRuns` (column-major, from the annotations' RLEs: the same pixels, no
    full-size array), for large images; pair it with run/RLE detections (`det_instances`)."""
    anns, h, w = record.annotations, record.height, record.width
    if as_runs:
        masks = runs_from_rles([segmentation_to_rle(a.segmentation, h, w) for a in anns], h, w)
    else:
        masks = (np.stack([segmentation_to_mask(a.segmentation, h, w) for a in anns]) if anns
                 else np.zeros((0, h, w), dtype=np.uint8))
    return {"image_id": int(record.image_id), "labels": np.array([a.category_id for a in anns], dtype=np.int64),
            "masks": masks, "boxes_xywh": np.array([a.bbox for a in anns], dtype=np.float64).reshape(-1, 4),
            "iscrowd": np.array([a.iscrowd for a in anns], dtype=bool),
            "areas": np.array([a.area for a in anns], dtype=np.float64)}


def det_instances(pred: dict, category_map: CategoryMap) -> dict:
    """Predictions at the original size (`inference.postprocess`) -> the average_precision detection layout with json
    category ids: `labels` int64 [N], `scores` float64 [N], `masks` bool [N,H0,W0], `boxes_xywh` [N,4].
    pred["masks"] may also be a `CropMasks` or a list of COCO RLEs (large images): `masks` is then the
    MaskRuns of those RLEs (column-major), never a full-size array."""
    boxes = pred["boxes"].double().numpy().reshape(-1, 4)
    masks = pred["masks"]
    if isinstance(masks, torch.Tensor):
        masks = masks.numpy()
    elif hasattr(masks, "image_size"):  # CropMasks
        masks = runs_from_rles(masks.to_rles(), *masks.image_size)
    elif isinstance(masks, (list, tuple)):  # RLE dicts: gains.average_precision reads them as runs
        masks = list(masks)
    return {"labels": np.array([category_map.to_json_id(v) for v in pred["labels"].tolist()], dtype=np.int64),
            "scores": pred["scores"].double().numpy(), "masks": masks,
            "boxes_xywh": np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)}


class MetricAccumulator:
    """Collects images for the metrics of `gains.metrics.instance_metrics` one at a time: each image's
    masks become runs (`gains.mask_runs`, a few KB per instance instead of H*W bytes) and its exact
    per-category intersections are counted at once, so ranks do that work in parallel and `images` pickles
    compactly for the gather on rank 0 (`merge`). An image id seen twice is kept once (the first)."""

    def __init__(self):
        self.images: dict[int, tuple] = {}  # image_id -> (ImageInstances, category overlaps)

    def add(self, gt: dict, det: dict) -> None:
        """gt/det: one image in the gains.average_precision layout (masks and boxes_xywh both given)."""
        im = normalize_images([gt], [det])[0]
        # all detections: AP and `aji` take their own top 100 per category, Kumar/AJI+ use them all
        self.images.setdefault(im.image_id, (im, category_overlaps(im, None)))

    def merge(self, images: dict) -> None:
        for image_id, item in images.items():
            self.images.setdefault(image_id, item)

    def compute(self, category_ids, aji_mode: str = "clean", with_boxes: bool = True,
                max_dets: int | None = COCO_MAX_DETS, image_names: dict | None = None) -> dict:
        """{"segm": evaluate_images dict, "bbox": same or None, "aji"/"aji_kumar"/"aji_plus": aji dicts,
        "strata", "max_dets": the cap (None = none), "coco_max_dets": COCO's three maxDets, "cap_notes":
        the warnings about images beyond the cap (also issued as UserWarnings)}.

        max_dets: every metric scores the top max_dets detections per image and category (module
        docstring); None scores them all. image_names: {accumulator image id: id to print}, for callers
        that add images under other ids (`evaluate_results` adds them by position)."""
        if aji_mode not in AJI_MODES:
            raise EvaluationError(f"test.aji_mode must be one of {AJI_MODES}, got {aji_mode!r}")
        max_dets = check_max_dets(max_dets)
        ids = sorted(self.images)
        images, overlaps = [self.images[i][0] for i in ids], [self.images[i][1] for i in ids]
        largest = max((len(ov.det_index) for per_cat in overlaps for ov in per_cat.values()), default=0)
        triple = coco_max_dets(max_dets, largest)
        out = {"segm": evaluate_images(images, category_ids, "segm", triple, overlaps),
               "bbox": evaluate_images(images, category_ids, "bbox", triple) if with_boxes else None}
        for kind in AJI_KINDS:  # one cap for every metric: they all score the same detections
            out[kind] = aji_from_overlaps(images, overlaps, category_ids, kind, aji_mode, triple[-1])
        if all(im.gt_masks is not None or not len(im.gt_labels) for im in images):
            out["strata"] = stratified_metrics_images(images, category_ids, max_dets=triple)
        out.update(max_dets=max_dets, coco_max_dets=list(triple),
                   cap_notes=_cap_notes(images, overlaps, category_ids, max_dets, image_names or {}))
        for note in out["cap_notes"]:
            warnings.warn(note, UserWarning, stacklevel=2)
        return out


def _cap_notes(images, overlaps, category_ids, max_dets: int | None, image_names: dict) -> list[str]:
    """One counted message per side (ground truth, detections) when some (image, category) has more
    instances than the cap `max_dets`, naming the largest case and the fix; [] without a cap."""
    if max_dets is None:
        return []
    cats = {int(c) for c in category_ids}
    over = {"gt": [], "det": []}  # (count, image id, category) beyond the cap
    for im, per_cat in zip(images, overlaps):
        for c, ov in per_cat.items():
            if c not in cats:
                continue
            n_gt = int(np.count_nonzero(~im.gt_crowd[ov.gt_index]))  # crowd regions are never matched
            for side, n in (("gt", n_gt), ("det", len(ov.det_index))):
                if n > max_dets:
                    over[side].append((n, image_names.get(im.image_id, im.image_id), c))
    notes = []
    for side, what, consequence in (
            ("gt", "ground-truth instances", f"at most {max_dets} of them can be matched, so recall, AP and "
                                             "AJI are capped below what the predictions reach"),
            ("det", "detections", f"only the {max_dets} highest-scoring are scored, the rest count for nothing")):
        if over[side]:
            n, image, c = max(over[side], key=lambda t: t[0])
            count = len({i for _, i, _ in over[side]})
            notes.append(f"{count} image(s) have more {what} of one category than the evaluation cap "
                         f"{CAP_KEY}={max_dets} (most: image id {image}, category {c}: {n}); {consequence}. "
                         f"Set {CAP_KEY} to null (none) or above {n} to score them all")
    return notes


def _pct(x) -> float | None:
    return None if x is None or x < 0 else 100.0 * float(x)


def _frac(x) -> float | None:
    return None if x is None or x < 0 else float(x)


def cell_nuclei_pair(names) -> tuple[int, int] | None:
    """Indices of the (cell, nuclei) categories when the data set is named like ISBI2014's, else None."""
    low = [str(n).lower() for n in names]
    cells = [i for i, n in enumerate(low) if "cell" in n and "nucle" not in n]
    nuclei = [i for i, n in enumerate(low) if "nucle" in n]
    return (cells[0], nuclei[0]) if len(cells) == 1 and len(nuclei) == 1 else None


def summarize(raw: dict, category_ids, names, *, split: str, num_images: int, num_detections: int,
              score_thresh: float | None, aji_mode: str) -> dict:
    """The metrics.json dict: AP values in % (None = undefined: no ground truth), AJI values as fractions,
    `max_dets_eval` (the cap, None = none) and `coco_max_dets` (COCO's maxDets; `segm_stats` / `bbox_stats`
    name their AR stats after them, e.g. AR100)."""
    segm, bbox = raw["segm"], raw["bbox"]
    triple = raw.get("coco_max_dets", (1, 10, COCO_MAX_DETS))
    names_12 = stat_names(triple)
    per_category, undefined = {}, []
    for c, name in zip(category_ids, names):
        s = segm["per_category"][c]
        row = {"category_id": int(c), "mAP": _pct(s["AP"]), "AP50": _pct(s["AP50"]), "AP75": _pct(s["AP75"]),
               "box_AP": _pct(bbox["per_category"][c]["AP"]) if bbox else None}
        row.update({k: _frac(raw[k]["per_category"][c]) for k in AJI_KINDS})
        if row["mAP"] is None:
            undefined.append(str(name))
        per_category[str(name) if str(name) not in per_category else f"{name} ({c})"] = row
    out = {"split": split, "num_images": int(num_images), "num_detections": int(num_detections),
           "score_thresh": score_thresh, "aji_mode": aji_mode,
           "max_dets_eval": raw.get("max_dets", COCO_MAX_DETS), "coco_max_dets": [int(m) for m in triple],
           "mAP": _pct(segm["stats"][0]), "AP50": _pct(segm["stats"][1]), "AP75": _pct(segm["stats"][2]),
           **{k: _frac(raw[k]["mean"]) for k in AJI_KINDS},
           "box_AP": _pct(bbox["stats"][0]) if bbox else None,
           "box_AP50": _pct(bbox["stats"][1]) if bbox else None,
           "box_AP75": _pct(bbox["stats"][2]) if bbox else None,
           "segm_stats": {k: _pct(v) for k, v in zip(names_12, segm["stats"])},
           "bbox_stats": {k: _pct(v) for k, v in zip(names_12, bbox["stats"])} if bbox else None,
           "per_category": per_category}
    if raw.get("strata"):
        # CTO = GT instances that touch/overlap/cross another of their category (gains/cto.py); AJI mode clean
        out["strata"] = {name: {"mAP": _pct(v["AP"] / 100), "AP50": _pct(v["AP50"] / 100),
                                "AP75": _pct(v["AP75"] / 100), "aji": _frac(v["aji"]), "num_gt": v["num_gt"]}
                         for name, v in raw["strata"].items() if name in ("cto", "non_cto")}
    pair = cell_nuclei_pair(names)
    if pair is not None:
        rows = [list(per_category.values())[i] for i in pair]
        avg = {k: (rows[0][k] + rows[1][k]) / 2 if None not in (rows[0][k], rows[1][k]) else None
               for k in ("mAP", "AP50", "AP75", "box_AP", *AJI_KINDS)}
        out["cell_nuclei_average"] = {"categories": [str(names[i]) for i in pair],
                                      "definition": "mean of the cell and nuclei category values", **avg}
    notes = list(raw.get("cap_notes", []))
    if num_detections == 0:
        notes.append("no predictions at all: AP and AJI are 0 for every category with ground truth")
    if undefined:
        notes.append(f"no ground truth for {', '.join(undefined)}: its AP is undefined (null) and left out "
                     "of the averages")
    out["notes"] = notes
    return out


def format_table(m: dict) -> str:
    """The one table people read: mAP, AP50, AP75 (%) and AJI (x100) per category and averaged."""
    def f(v, scale=1.0):
        return f"{v * scale:7.2f}" if v is not None and math.isfinite(v) else "      -"

    thresh = "all detections" if m["score_thresh"] is None else f"score >= {m['score_thresh']:g}"
    cap = m.get("max_dets_eval", COCO_MAX_DETS)
    triple = m.get("coco_max_dets", [1, 10, COCO_MAX_DETS])
    scored = (f"top {cap} per image and category, maxDets={cap}" if cap is not None
              else f"no cap: every detection, maxDets={triple[-1]}")
    lines = [f"== {m['split']}: {m['num_images']} images, {m['num_detections']} detections ({thresh}) ==",
             f"mask AP: COCO AP (%);  AJI: aji mode '{m['aji_mode']}' x100 ({thresh}, {scored})",
             f"{'category':<22}{'mAP':>7} {'AP50':>7} {'AP75':>7} {'AJI':>7}"]
    rows = list(m["per_category"].items()) + [("average", m)]
    if "cell_nuclei_average" in m:
        rows.append(("Cell/Nuclei mean", m["cell_nuclei_average"]))
    for name, r in rows:
        lines.append(f"{name[:21]:<22}{f(r['mAP'])} {f(r['AP50'])} {f(r['AP75'])} {f(r['aji'], 100)}")
    lines.append(f"box AP {f(m['box_AP']).strip()} | aji_kumar {f(m['aji_kumar'], 100).strip()} | "
                 f"aji_plus {f(m['aji_plus'], 100).strip()} (x100)")
    stats = m.get("segm_stats") or {}
    if stats:  # COCO's summary, its AR stats named by the maxDets in use (AR1, AR10, AR<cap>)
        lines.append(f"COCO segm, maxDets={triple}: " + " ".join(f"{k} {f(v).strip()}"
                                                                   for k, v in list(stats.items())[3:]))
    for name, label in (("cto", "CTO instances"), ("non_cto", "non-CTO instances")):
        r = (m.get("strata") or {}).get(name)
        if r:
            lines.append(f"{label:<22}{f(r['mAP'])} {f(r['AP50'])} {f(r['AP75'])} {f(r['aji'], 100)}"
                         f"   ({r['num_gt']} GT; AJI mode clean)")
    lines += [f"note: {n}" for n in m["notes"]]
    return "\n".join(lines)


def write_outputs(output_dir, metrics: dict, results: list[dict] | None, split: str) -> None:
    """`results_{split}.json` (COCO results) then `metrics.json`, each atomically (metrics last: its
    presence means the evaluation finished)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if results is not None:
        write_json_atomic(output_dir / f"results_{split}.json", results)
    write_json_atomic(output_dir / "metrics.json", metrics)
