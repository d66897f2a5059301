"""Evaluating: a model over a split, or a COCO results file, -> metrics.json, a COCO results json and one
printed table.

Two entry points:
- `evaluate_model(model, cfg, split, output_dir)`: run the model over a split (sharded over torchrun ranks,
  every image exactly once, gathered to rank 0 and de-duplicated by image id) and score it. Called by the
  training loop's periodic evaluation and by `evaluate.py --ckpt`.
- `evaluate_results(gt, results)`: score an existing COCO results list against a COCO ground-truth dict
  (`evaluate.py --gt --pred`), no model involved.

The metrics, their table and metrics.json come from gains.scoring (gains/METRICS.md), all on per-instance masks
at the ORIGINAL image resolution. Categories are the json's ids; an average is the mean over categories
that have ground truth. For ISBI2014-like data (one category named like 'cell', one like 'nucle...') the
paper's "Cell/Nuclei average" is added: the plain mean of the two category rows. Images are streamed: each image's masks are reduced to
compact runs with exact overlap counts at once, so memory does not grow with the pixels of the split.

Every metric scores the top `test.max_dets_eval` detections per image and category (null: all; the paper
configs: 100, the authors' evaluator), and a warning names images with more ground truths or detections
than that (gains.scoring).

Large images (those `gains.predictor.Predictor` would tile: `test.tiling`, `test.tile_size`) are predicted
by the Predictor tile by tile, every tile resized by the scale the model was trained at (`test.tile_scale`:
a `data.crop_size` crop's test resize, else the whole image's, so tiles see what the whole-image path
would); their ground truth and detections reach the metrics as runs (COCO RLE -> `gains.mask_runs`), never
as dense [N,H,W] arrays, so a 4096 px field with thousands of nuclei costs memory per instance, not per
pixel. Smaller images take the batched whole-image path (`inference.predict_dataset`) exactly as before.
The paper configs set `test.tiling: never`: whole images, as the authors' detectron2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from . import dist
from .annotations import (CategoryMap, DataError, ImageRecord, check_coco_gt, check_coco_results, coco_box,
                          segmentation_to_rle)
from .checkpoint import unwrap_model
from .data import build_dataset
from .devices import model_device
from .errors import EvaluationError
from .imageio import read_image, read_image_array
from .inference import encode_results, predict_dataset, shard_indices
from .instances import CropMasks
from .mask_runs import runs_from_rles
from .metrics import AJI_MODES
from .predictor import Predictor, to_model_image
from .scoring import (MetricAccumulator, check_max_dets, det_instances, format_table, gt_instances, summarize,
                      write_outputs)
from .visualize import overlay_label_image, pyplot, save_figure_atomic, save_instance_panels


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
    `model.roi_heads.score_thresh_test` has already applied). Every metric scores the top
    `test.max_dets_eval` detections per image and category (null: all). `expected_category_map`: the
    checkpoint's; an error if the split's json declares other categories. The model's train/eval mode is
    restored.

    Images the Predictor would tile (`test.tiling`; 'auto': larger than `test.tile_size` on a side) are
    predicted by `Predictor.from_config(model, cfg)` tile by tile, each tile resized by the training scale
    (`test.tile_scale`, `Predictor.scale_of`), instead of the resized batch, scored from runs (no dense
    [N,H,W] masks) and listed under `tiled_images` with a note; the rest take the batched whole-image path
    unchanged.
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
    max_dets = check_max_dets(cfg.test.get("max_dets_eval"))  # before the predictions, not after
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
    raw = acc.compute(list(cmap.json_ids), aji_mode, max_dets=max_dets)
    metrics = summarize(raw, list(cmap.json_ids), list(cmap.names), split=split, num_images=len(kept),
                        num_detections=len(results), score_thresh=thresh, aji_mode=aji_mode)
    if tiled:
        ids = sorted(tiled)
        metrics["tiled_images"] = ids
        if predictor.tile_scale is None:  # the rule in words: a reader must see which scale the model saw
            scale = "by their whole image's test resize (test.tile_scale=auto without data.crop_size)"
        else:
            origin = f", the data.crop_size={cfg.data.crop_size} crop's" if cfg.test.tile_scale == "auto" else ""
            scale = f"by x{predictor.tile_scale:.4g} (test.tile_scale={cfg.test.tile_scale}{origin})"
        metrics["notes"].append(
            f"{len(ids)} image(s) larger than test.tile_size={int(cfg.test.tile_size)} px were predicted tile by "
            f"tile (test.tiling={cfg.test.tiling}), each tile resized {scale}, and scored from runs: image ids "
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
    image = to_model_image(read_image_array(record.path), str(cfg.data.normalize)).numpy()
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
def _rle(segm, h: int, w: int, what: str) -> dict:
    """A segmentation validated by check_coco_gt / check_coco_results -> one COCO RLE; DataError naming `what`
    if pycocotools still cannot read it."""
    try:
        return segmentation_to_rle(segm, h, w)
    except Exception as e:  # noqa: BLE001 - pycocotools raises assorted types for malformed input
        raise DataError(f"{what}: cannot decode the segmentation ({type(e).__name__}: {e})") from None


def evaluate_results(gt: dict, results: list[dict], aji_mode: str = "clean", score_thresh: float | None = None,
                     split: str = "results", gt_name: str = "ground truth", results_name: str = "results",
                     max_dets: int | None = None) -> dict:
    """Score a COCO results list against a COCO ground-truth dict (the `evaluate.py --gt --pred` mode).

    gt: COCO instances dict (annotation ids >= 1; 'area' drives the area ranges, the mask pixel count when
    absent). results: [{image_id, category_id (json id), score, segmentation RLE, optional bbox xywh}]; an
    empty list scores AP 0 / AJI 0 with a note. Box AP is computed when every result has a bbox.
    `score_thresh`: drop results below it first (None: score them all). `max_dets`: every metric scores the
    top max_dets results per image and category (None: all; 100 = the authors' evaluator). Returns the
    `summarize` dict; mask AP equals pycocotools COCOeval(iouType='segm') with maxDets = its
    `coco_max_dets` on the same files. Malformed input of either kind is a DataError from
    `annotations.check_coco_gt` / `check_coco_results`, its message starting with `gt_name` / `results_name`
    (the files).
    """
    max_dets = check_max_dets(max_dets, "max_dets (evaluate.py --max-dets)")
    truth = check_coco_gt(gt, gt_name, geometry="segmentation")
    dets = check_coco_results(results, truth, results_name)
    images, anns = truth.images, truth.annotations
    cat_ids, names = list(truth.categories.json_ids), list(truth.categories.names)
    if score_thresh is not None:
        dets = {i: [r for r in rs if r["score"] >= score_thresh] for i, rs in dets.items()}
    with_boxes = all(r.get("bbox") is not None for rs in dets.values() for r in rs)
    acc = MetricAccumulator()
    for n, image_id in enumerate(sorted(images)):
        (h, w), ga, dr = truth.size(image_id), anns[image_id], dets[image_id]
        # RLEs -> runs, never [N, H, W]: a 2k x 2k field with 2,000 nuclei would be 8 GB per side dense
        gr = [_rle(a["segmentation"], h, w, f"{gt_name}: annotation id {a['id']} (image {image_id})") for a in ga]
        dr_rles = [_rle(r["segmentation"], h, w, f"{results_name}: a result for image id {image_id}") for r in dr]
        gb = [box if (box := coco_box(a.get("bbox"))) is not None else mask_utils.toBbox(rle).tolist()
              for a, rle in zip(ga, gr)]
        acc.add({"image_id": n, "labels": [a["category_id"] for a in ga], "masks": runs_from_rles(gr, h, w),
                 "iscrowd": [bool(a.get("iscrowd", 0)) for a in ga],
                 "areas": [a["area"] if a.get("area") is not None else float(mask_utils.area(rle))
                           for a, rle in zip(ga, gr)],
                 "boxes_xywh": np.array(gb, np.float64).reshape(-1, 4)},
                {"labels": [r["category_id"] for r in dr], "scores": [r["score"] for r in dr],
                 "masks": dr_rles,
                 "boxes_xywh": np.array([r.get("bbox") or [0, 0, 0, 0] for r in dr], np.float64).reshape(-1, 4)})
    # Images were added under their position in sorted-id order, so score ties across images resolve as in
    # pycocotools (which sorts image ids).
    raw = acc.compute(cat_ids, aji_mode, with_boxes, max_dets, {n: i for n, i in enumerate(sorted(images))})
    return summarize(raw, cat_ids, names, split=split,
                     num_images=len(images), num_detections=sum(map(len, dets.values())), score_thresh=score_thresh,
                     aji_mode=aji_mode)
