"""Predictions -> metrics -> metrics.json, a COCO results json and one printed table.

Two entry points:
- `evaluate_model(model, cfg, split, output_dir)`: run the model over a split (sharded over torchrun ranks,
  every image exactly once, gathered to rank 0 and de-duplicated by image id) and score it. Called by the
  training loop's periodic evaluation and by `evaluate.py --ckpt`.
- `evaluate_results(gt, results)`: score an existing COCO results list against a COCO ground-truth dict
  (`evaluate.py --gt --pred`), no model involved.

Metrics (METRICS.md), all on per-instance masks at the ORIGINAL image resolution: COCO mask AP (mAP =
AP@[.5:.95], AP50, AP75; in %), box AP, the GAInS/DoNet `aji` (mode `test.aji_mode`), `aji_kumar` and
`aji_plus` (fractions in [0,1]; the table prints AJI x100 like the paper), per category and averaged.
Categories are the json's ids; an average is the mean over categories that have ground truth. For
ISBI2014-like data (one category named like 'cell', one like 'nucle...') the paper's "Cell/Nuclei average"
is added: the plain mean of the two category rows. Images are streamed: each image's masks are reduced to
compact runs with exact overlap counts at once, so memory does not grow with the pixels of the split.

Large images (those `gains.predictor.Predictor` would tile: `test.tiling`, `test.tile_size`) are predicted
by the Predictor on the ORIGINAL image, tile by tile, instead of being resized to `data.min_size_test`;
their ground truth and detections reach the metrics as runs (COCO RLE -> `gains.mask_runs`), never as dense
[N,H,W] arrays, so a 4096 px field with thousands of nuclei costs memory per instance, not per pixel.
Smaller images take the batched whole-image path (`inference.predict_dataset`) exactly as before.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from . import dist
from .annotations import (CategoryMap, DataError, ImageRecord, check_segmentation, is_finite_number, segmentation_to_mask,
                   segmentation_to_rle)
from .cto import stratified_metrics_images
from .atomic import write_json_atomic
from .checkpoint import unwrap_model
from .data import build_dataset
from .devices import model_device
from .imageio import read_image, read_image_array, to_float_rgb
from .inference import encode_results, predict_dataset, shard_indices
from .instances import CropMasks
from .predictor import Predictor
from .visualize import pyplot, overlay_label_image, save_figure_atomic, save_instance_panels
from .mask_runs import runs_from_rles
from .metrics import AJI_MODES, STAT_NAMES, aji_from_overlaps, category_overlaps, evaluate_images, normalize_images

MAX_DETS = (1, 10, 100)
AJI_KINDS = ("aji", "aji_kumar", "aji_plus")


class EvaluationError(ValueError):
    """Invalid evaluation input (results or ground truth); the message names the ids and the fix."""


# ----------------------------------------------------------------------------------------------- instances
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

    def compute(self, category_ids, aji_mode: str = "clean", with_boxes: bool = True) -> dict:
        """{"segm": evaluate_images dict, "bbox": same or None, "aji"/"aji_kumar"/"aji_plus": aji dicts}."""
        if aji_mode not in AJI_MODES:
            raise EvaluationError(f"test.aji_mode must be one of {AJI_MODES}, got {aji_mode!r}")
        ids = sorted(self.images)
        images, overlaps = [self.images[i][0] for i in ids], [self.images[i][1] for i in ids]
        out = {"segm": evaluate_images(images, category_ids, "segm", MAX_DETS, overlaps),
               "bbox": evaluate_images(images, category_ids, "bbox", MAX_DETS) if with_boxes else None}
        for kind in AJI_KINDS:  # METRICS.md: `aji` uses the top 100 per category, Kumar/AJI+ all detections
            out[kind] = aji_from_overlaps(images, overlaps, category_ids, kind, aji_mode,
                                          MAX_DETS[-1] if kind == "aji" else None)
        if all(im.gt_masks is not None or not len(im.gt_labels) for im in images):
            out["strata"] = stratified_metrics_images(images, category_ids, max_dets=MAX_DETS)
        return out


# ----------------------------------------------------------------------------------------------- summary
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
    """The metrics.json dict: AP values in % (None = undefined: no ground truth), AJI values as fractions."""
    segm, bbox = raw["segm"], raw["bbox"]
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
           "mAP": _pct(segm["stats"][0]), "AP50": _pct(segm["stats"][1]), "AP75": _pct(segm["stats"][2]),
           **{k: _frac(raw[k]["mean"]) for k in AJI_KINDS},
           "box_AP": _pct(bbox["stats"][0]) if bbox else None,
           "box_AP50": _pct(bbox["stats"][1]) if bbox else None,
           "box_AP75": _pct(bbox["stats"][2]) if bbox else None,
           "segm_stats": {k: _pct(v) for k, v in zip(STAT_NAMES, segm["stats"])},
           "bbox_stats": {k: _pct(v) for k, v in zip(STAT_NAMES, bbox["stats"])} if bbox else None,
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
    notes = []
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
    lines = [f"== {m['split']}: {m['num_images']} images, {m['num_detections']} detections ({thresh}) ==",
             f"mask AP: COCO AP (%);  AJI: aji mode '{m['aji_mode']}' x100 ({thresh}, top 100 per category)",
             f"{'category':<22}{'mAP':>7} {'AP50':>7} {'AP75':>7} {'AJI':>7}"]
    rows = list(m["per_category"].items()) + [("average", m)]
    if "cell_nuclei_average" in m:
        rows.append(("Cell/Nuclei mean", m["cell_nuclei_average"]))
    for name, r in rows:
        lines.append(f"{name[:21]:<22}{f(r['mAP'])} {f(r['AP50'])} {f(r['AP75'])} {f(r['aji'], 100)}")
    lines.append(f"box AP {f(m['box_AP']).strip()} | aji_kumar {f(m['aji_kumar'], 100).strip()} | "
                 f"aji_plus {f(m['aji_plus'], 100).strip()} (x100)")
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


# ----------------------------------------------------------------------------------------------- model runs
def evaluate_model(model: torch.nn.Module, cfg, split: str, output_dir, *, vis: int | None = None,
                   batch_size: int = 4, expected_category_map: CategoryMap | None = None,
                   verbose: bool = True) -> dict:
    """Run `model` over `split` and score it at the original image resolution.

    Every rank of a torchrun job calls this; rank r predicts images r, r+W, ... of the split (each image
    exactly once), the compact per-image results are gathered to rank 0 and de-duplicated by image id, and
    rank 0 writes `output_dir/results_{split}.json` + `metrics.json`, prints the table and returns the
    metrics dict (layout: `summarize`); the other ranks return {}. `vis` (default `test.vis`) images of rank
    0's shard are drawn as ground truth | prediction PNGs into `output_dir/vis/`. Detections with score <
    `test.score_thresh` are dropped before scoring and writing (the model's own
    `model.roi_heads.score_thresh_test` has already applied). `expected_category_map`: the checkpoint's;
    an error if the split's json declares other categories. The model's train/eval mode is restored.

    Images the Predictor would tile (`test.tiling`; 'auto': larger than `test.tile_size` on a side) are
    predicted by `Predictor.from_config(model, cfg)` on the original image instead of the resized batch,
    scored from runs (no dense [N,H,W] masks) and listed under `tiled_images` with a note; the rest take
    the batched whole-image path unchanged.
    """
    dataset = build_dataset(cfg, split, is_train=False)
    cmap = dataset.category_map
    if expected_category_map is not None and tuple(expected_category_map.json_ids) != tuple(cmap.json_ids):
        raise EvaluationError(f"the model was trained on categories {list(expected_category_map.json_ids)} "
                              f"{list(expected_category_map.names)} but the {split} json declares "
                              f"{list(cmap.json_ids)} {list(cmap.names)}; evaluate on data of the same categories")
    aji_mode, thresh = str(cfg.test.aji_mode), float(cfg.test.score_thresh)
    if aji_mode not in AJI_MODES:
        raise EvaluationError(f"test.aji_mode must be one of {AJI_MODES}, got {aji_mode!r}")
    rank, world = dist.get_rank(), dist.get_world_size()
    vis = int(cfg.test.vis if vis is None else vis) if rank == 0 else 0
    vis_thresh = float(cfg.test.vis_score_thresh)
    indices = shard_indices(len(dataset), rank, world)
    acc, results, tiled = MetricAccumulator(), [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            predictor = Predictor.from_config(unwrap_model(model), cfg, progress=False, device=model_device(model))
            large = [i for i in indices if predictor._tiles(dataset.records[i].height, dataset.records[i].width)]
            big = set(large)
            small = [i for i in indices if i not in big] if large else indices
            for n, (index, pred) in enumerate(_predictions(model, predictor, dataset, small, large, thresh,
                                                           batch_size, int(cfg.data.num_workers),
                                                           verbose and rank == 0)):
                record = dataset.records[index]
                if "tiled" in pred:  # a large image: runs and crops only, never [N,H,W]
                    tiled.append(int(record.image_id))
                    rles = pred["masks"].to_rles()
                    acc.add(gt_instances(record, as_runs=True), det_instances({**pred, "masks": rles}, cmap))
                    results.extend(encode_results({**pred, "masks": rles}, record.image_id, cmap))
                    if n < vis:
                        _save_label_panels(pred, record, cfg, vis_thresh,
                                           Path(output_dir) / "vis" / f"image_{record.image_id}.png",
                                           f"{split} image {record.image_id} (tiled)")
                    continue
                gt = gt_instances(record)
                acc.add(gt, det_instances(pred, cmap))
                results.extend(encode_results(pred, record.image_id, cmap))
                if n < vis:
                    keep = ~gt["iscrowd"]
                    shown = (pred["scores"] >= vis_thresh).numpy()  # a readable picture, not every detection
                    panels = [(f"ground truth ({int(keep.sum())})", gt["masks"][keep]),
                              (f"prediction ({int(shown.sum())}, score >= {vis_thresh:g})",
                               pred["masks"].numpy()[shown])]
                    save_instance_panels(read_image(record.path, str(cfg.data.normalize)).numpy(), panels,
                                         Path(output_dir) / "vis" / f"image_{record.image_id}.png",
                                         f"{split} image {record.image_id}")
    finally:
        model.train(was_training)
    gathered = dist.all_gather_object((acc.images, results, tiled))
    if rank != 0:
        return {}
    acc = MetricAccumulator()
    kept: set[int] = set()
    results, tiled = [], set()
    # rank order; an image id already taken from an earlier rank is skipped
    for images, res, tiled_ids in gathered:
        new = set(images) - kept
        acc.merge({i: images[i] for i in new})
        results.extend(r for r in res if r["image_id"] in new)
        tiled |= new & set(tiled_ids)
        kept |= new
    results.sort(key=lambda r: r["image_id"])  # stable: each image keeps its score order
    missing = sorted({r.image_id for r in dataset.records} - kept)
    if missing:
        raise RuntimeError(f"evaluation lost images {missing[:20]}: every rank must run evaluate_model")
    metrics = summarize(acc.compute(list(cmap.json_ids), aji_mode), list(cmap.json_ids), list(cmap.names),
                        split=split, num_images=len(kept), num_detections=len(results), score_thresh=thresh,
                        aji_mode=aji_mode)
    if tiled:
        ids = sorted(tiled)
        metrics["tiled_images"] = ids
        metrics["notes"].append(
            f"{len(ids)} image(s) larger than test.tile_size={int(cfg.test.tile_size)} px were predicted tile by "
            f"tile at their original resolution (test.tiling={cfg.test.tiling}) and scored from runs: image ids "
            f"{ids[:20]}{' ...' if len(ids) > 20 else ''}")
    write_outputs(output_dir, metrics, results, split)
    if verbose:
        print(format_table(metrics), flush=True)
    return metrics


def _predictions(model, predictor, dataset, small: list[int], large: list[int], thresh: float, batch_size: int,
                 num_workers: int, progress: bool):
    """Yield (index, pred): the `small` images through the batched whole-image path (`predict_dataset`,
    dense masks), then the `large` ones through `predictor` on the original image (`_predict_large`)."""
    if small or not large:
        yield from predict_dataset(model, dataset, small, thresh, batch_size, num_workers, progress=progress)
    for index in large:
        yield index, _predict_large(predictor, dataset, index, thresh)


def _predict_large(predictor, dataset, index: int, thresh: float) -> dict:
    """One large image predicted tile by tile at its original size (read and normalised like the data set,
    `data.normalize`), detections with score < thresh dropped: `boxes`, `labels`, `scores` tensors and
    `masks` a CropMasks, plus a `tiled` marker."""
    record = dataset.records[index]
    array = read_image_array(record.path)
    if tuple(array.shape[:2]) != (record.height, record.width):
        raise DataError(f"{record.path}: image id {record.image_id} is {tuple(array.shape[:2])} but the "
                        f"json says {(record.height, record.width)}; fix the json's height/width")
    pred = predictor([array])[0]
    keep = pred["scores"] >= thresh
    return {"boxes": pred["boxes"][keep], "labels": pred["labels"][keep], "scores": pred["scores"][keep],
            "masks": pred["masks"].select(keep.numpy()), "tiled": True}


def _save_label_panels(pred: dict, record: ImageRecord, cfg, vis_thresh: float, path, title: str) -> None:
    """Ground truth | prediction overlays of a large image drawn from label images (O(H x W), subsampled
    beyond 2048 px by `overlay_label_image`), never from [N,H,W] masks."""
    array = read_image_array(record.path)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    image = to_float_rgb(array, str(cfg.data.normalize)).numpy()
    anns = [a for a in record.annotations if not a.iscrowd]
    gt = CropMasks.from_segmentations([a.segmentation for a in anns], record.height, record.width)
    shown = (pred["scores"] >= vis_thresh).numpy()
    det = pred["masks"].select(shown)
    panels = [(f"ground truth ({len(gt)})", gt.label_image()),
              (f"prediction ({int(shown.sum())}, score >= {vis_thresh:g})",
               det.label_image(pred["scores"].numpy()[shown]))]
    plt = pyplot()
    h, w = record.height, record.width
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.5 * h / max(w, 1) + 0.6), squeeze=False)
    for ax, (name, labels) in zip(axes[0], panels):
        ax.imshow(overlay_label_image(image, labels), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    save_figure_atomic(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- results files
def _check_gt(gt: dict, where: str = "ground truth") -> tuple[dict, list[int], list[str]]:
    """Validate a COCO ground-truth dict: ({image_id: image}, category ids, names)."""
    for key in ("images", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationError(f"{where}: missing '{key}' list; a COCO instances file needs 'images', "
                                  "'annotations' and 'categories'")
    images = {}
    for im in gt["images"]:
        if im.get("id") in images:
            raise EvaluationError(f"{where}: image id {im.get('id')} appears twice in 'images'")
        if "height" not in im or "width" not in im:
            raise EvaluationError(f"{where}: image {im.get('id')} lacks 'height'/'width'")
        images[im.get("id")] = im
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise EvaluationError(f"{where}: duplicate category ids {ids}")
    seen = set()
    for n, a in enumerate(gt.get("annotations", [])):
        ann_id = a.get("id")
        if not isinstance(ann_id, int) or ann_id < 1:
            raise EvaluationError(f"{where}: annotation #{n} (image {a.get('image_id')}) has id {ann_id!r}; "
                                  "annotation ids must be integers >= 1 (COCO tools read id 0 as "
                                  "'unmatched'); renumber them 1..N")
        if ann_id in seen:
            raise EvaluationError(f"{where}: annotation id {ann_id} is used twice; ids must be unique")
        seen.add(ann_id)
        if a.get("image_id") not in images or a.get("category_id") not in ids:
            raise EvaluationError(f"{where}: annotation {ann_id} refers to image {a.get('image_id')} / category "
                                  f"{a.get('category_id')}, not listed in 'images' / 'categories'")
    return images, ids, [str(c.get("name", c["id"])) for c in cats]


def _check_results(results, images: dict, cat_ids: list[int], where: str = "results") -> None:
    """Validate a COCO results list; errors name `where` (the file), the image id and the fix."""
    if not isinstance(results, list):
        raise EvaluationError(f"{where}: the top level is a {type(results).__name__}, not a list; COCO results "
                              "are a json list of {image_id, category_id, score, segmentation} (as written by "
                              "evaluate.py / detectron2's COCOEvaluator)")
    for n, r in enumerate(results):
        if not isinstance(r, dict) or not {"image_id", "category_id", "score", "segmentation"} <= set(r):
            raise EvaluationError(f"{where}: result #{n} lacks image_id, category_id, score or segmentation; "
                                  "write COCO segm results (RLE masks)")
        image_id = r["image_id"]
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise EvaluationError(f"{where}: result #{n} has image_id {image_id!r}; use the ground truth's "
                                  "image ids")
        if not isinstance(r["category_id"], (int, str)) or isinstance(r["category_id"], bool):
            raise EvaluationError(f"{where}: a result for image id {image_id} has category_id "
                                  f"{r['category_id']!r}; use the ground truth's json category ids")
        score = r["score"]
        if not is_finite_number(score):
            raise EvaluationError(f"{where}: a result for image id {image_id} (category {r['category_id']}) "
                                  f"has score {score!r}; scores must be finite numbers — fix or drop that "
                                  "detection where the results are written")
        if not isinstance(r["segmentation"], (dict, list)):
            raise EvaluationError(f"{where}: a result for image id {image_id} has a "
                                  f"{type(r['segmentation']).__name__} segmentation; write an RLE dict "
                                  "{size: [H, W], counts: ...} (or polygons)")
        box = r.get("bbox")
        if box is not None and not (isinstance(box, list) and len(box) == 4
                                    and all(is_finite_number(v) for v in box)):
            raise EvaluationError(f"{where}: a result for image id {image_id} has bbox {box!r}; a bbox is 4 "
                                  "finite numbers [x, y, width, height] (or leave it out)")
    bad = sorted({r["image_id"] for r in results} - set(images), key=str)
    if bad:
        raise EvaluationError(f"{where}: results refer to image ids {bad[:20]} that are not in the ground truth; "
                              "score them against the annotation file the predictions were made for")
    bad = sorted({r["category_id"] for r in results} - set(cat_ids), key=str)
    if bad:
        raise EvaluationError(f"{where}: results use category ids {bad[:20]} that the ground truth does not "
                              f"declare ({cat_ids[:20]}); write the dataset's json category ids, not contiguous "
                              "labels")


def _decode(segm, h: int, w: int, what: str) -> np.ndarray:
    try:  # finite, in-image polygons and consistent RLE before pycocotools' C code sees them
        check_segmentation(segm, h, w, what)
    except DataError as e:
        raise EvaluationError(str(e)) from None
    try:
        return segmentation_to_mask(segm, h, w)
    except Exception as e:  # noqa: BLE001 - pycocotools raises assorted types for malformed input
        raise EvaluationError(f"{what}: cannot decode the segmentation ({type(e).__name__}: {e})") from None


def evaluate_results(gt: dict, results: list[dict], aji_mode: str = "clean", score_thresh: float | None = None,
                     split: str = "results", gt_name: str = "ground truth", results_name: str = "results") -> dict:
    """Score a COCO results list against a COCO ground-truth dict (the `evaluate.py --gt --pred` mode).

    gt: COCO instances dict (annotation ids >= 1; 'area' drives the area ranges, the mask pixel count when
    absent). results: [{image_id, category_id (json id), score, segmentation RLE, optional bbox xywh}]; an
    empty list scores AP 0 / AJI 0 with a note. Box AP is computed when every result has a bbox.
    `score_thresh`: drop results below it first (None: score them all). Returns the `summarize` dict; mask
    AP equals pycocotools COCOeval(iouType='segm') on the same files. `gt_name` / `results_name` (the files)
    start the EvaluationError messages about either input.
    """
    images, cat_ids, names = _check_gt(gt, gt_name)
    _check_results(results, images, cat_ids, results_name)
    if score_thresh is not None:
        results = [r for r in results if r["score"] >= score_thresh]
    anns = {i: [] for i in images}
    dets = {i: [] for i in images}
    for a in gt.get("annotations", []):
        anns[a["image_id"]].append(a)
    for r in results:
        dets[r["image_id"]].append(r)
    with_boxes = all("bbox" in r for r in results)
    acc = MetricAccumulator()
    for n, image_id in enumerate(sorted(images)):
        h, w, ga, dr = int(images[image_id]["height"]), int(images[image_id]["width"]), anns[image_id], dets[image_id]
        gm = np.array([_decode(a["segmentation"], h, w, f"{gt_name}: annotation {a['id']} (image id {image_id})")
                       for a in ga], np.uint8)
        dm = np.array([_decode(r["segmentation"], h, w, f"{results_name}: a result for image id {image_id}")
                       for r in dr], bool)
        gb = [a["bbox"] if "bbox" in a else mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m))).tolist()
              for a, m in zip(ga, gm)]
        acc.add({"image_id": n, "labels": [a["category_id"] for a in ga], "masks": gm.reshape(-1, h, w),
                 "iscrowd": [bool(a.get("iscrowd", 0)) for a in ga],
                 "areas": [a["area"] if a.get("area") is not None else float(m.sum()) for a, m in zip(ga, gm)],
                 "boxes_xywh": np.array(gb, np.float64).reshape(-1, 4)},
                {"labels": [r["category_id"] for r in dr], "scores": [r["score"] for r in dr],
                 "masks": dm.reshape(-1, h, w),
                 "boxes_xywh": np.array([r.get("bbox", [0, 0, 0, 0]) for r in dr], np.float64).reshape(-1, 4)})
    # Images were added under their position in sorted-id order, so score ties across images resolve as in
    # pycocotools (which sorts image ids) even for non-integer ids.
    return summarize(acc.compute(cat_ids, aji_mode, with_boxes), cat_ids, names, split=split,
                     num_images=len(images), num_detections=len(results), score_thresh=score_thresh,
                     aji_mode=aji_mode)
