"""Running a trained model over images: test-time batches, predictions at the ORIGINAL image size, COCO
results entries, loading a checkpoint for inference, and the unlabelled-folder mode of evaluate.py.

Coordinates: the model sees images resized by `data.min_size_test` / `max_size_test` and answers in those
pixels; everything leaving this module is in the original image's pixels (boxes scaled by original/resized
size, 28x28 mask probabilities pasted into the scaled box at full resolution and thresholded at 0.5), the
convention of the ground truth and of the COCO results json.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from . import dist
from .annotations import CategoryMap
from .atomic import write_json_atomic
from .checkpoint import load_checkpoint, read_checkpoint, unwrap_model
from .config import ConfigError, dump_config, load_config
from .data import collate
from .devices import model_device, resolve_device
from .errors import CheckpointError, DataError
from .exports import coco_results, write_imagej_rois, write_instances_npz, write_label_image
from .geojson_io import write_geojson
from .imageio import read_image_array, read_image_size
from .model import build_model
from .predictor import Predictor, boxes_to_original, paste_masks, to_model_image
from .visualize import save_label_overlay

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The items of an n-item data set that `rank` processes: rank, rank + W, rank + 2W, ...

    Disjoint across ranks and together every index exactly once (no padding, unlike DistributedSampler,
    whose repeated items would be scored twice)."""
    return list(range(rank, n, world_size))


def postprocess(det: dict, resized_size, orig_size, score_thresh: float, mask_threshold: float = 0.5) -> dict:
    """One image's eval output of the model -> predictions at the original image size, on the CPU.

    det: `boxes` float [N,4] xyxy in the resized input's pixels, `labels` int64 [N] in 1..K, `scores` float
    [N], `masks` float [N,1,M,M] probabilities (GAInS.forward in eval mode). resized_size / orig_size: (H, W).
    Returns `boxes` float32 [n,4] xyxy original pixels (clamped to the image), `labels` int64 [n], `scores`
    float32 [n], `masks` bool [n,H0,W0]; n = detections with score >= score_thresh, in the model's order.
    """
    h0, w0 = (int(s) for s in orig_size)
    keep = det["scores"] >= score_thresh
    boxes = boxes_to_original(det["boxes"][keep].detach().float().cpu(), resized_size, orig_size)
    masks = det["masks"][keep].detach().float().cpu()
    return {"boxes": boxes, "labels": det["labels"][keep].detach().cpu().to(torch.int64),
            "scores": det["scores"][keep].detach().float().cpu(),
            "masks": paste_masks(masks, boxes, (h0, w0), mask_threshold)}


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, dataset, indices: list[int], score_thresh: float,
                    batch_size: int = 4, num_workers: int = 0, progress: bool = False):
    """Yield (index, pred) for `dataset[indices]` in order; `pred` as `postprocess` returns it.

    dataset: items (image float32 [3,h,w] resized, target with `orig_size`) as gains.data. Consecutive images
    of the same resized size share a batch (up to `batch_size`): mixing sizes would zero-pad the smaller
    ones, which changes their predictions near the border, so results do not depend on the batching.
    """
    device = model_device(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         shuffle=False, num_workers=num_workers, collate_fn=collate)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(indices), desc="inference", unit="img", dynamic_ncols=True)
    pending: list[tuple[int, torch.Tensor, tuple]] = []

    def flush():
        outputs = model([image.to(device) for _, image, _ in pending])
        for (index, image, orig), det in zip(pending, outputs):
            yield index, postprocess(det, image.shape[-2:], orig, score_thresh)
        if bar is not None:
            bar.update(len(pending))
        pending.clear()

    try:
        for index, (images, targets) in zip(indices, loader):
            image, orig = images[0], tuple(targets[0]["orig_size"])
            if pending and (len(pending) >= batch_size or pending[0][1].shape != image.shape):
                yield from flush()
            pending.append((index, image, orig))
        if pending:
            yield from flush()
    finally:
        if bar is not None:
            bar.close()


def encode_results(pred: dict, image_id: int, category_map: CategoryMap | None) -> list[dict]:
    """Predictions of one image (original size, as `postprocess`) -> COCO results entries
    {image_id int, category_id (the json's id), score, bbox [x, y, w, h], segmentation compressed RLE with
    str counts}. Without a category map the contiguous labels are written as they are.

    pred["masks"]: bool [n,H0,W0] (tensor or array), a `gains.instances.CropMasks` (the Predictor's output:
    encoded from the crops, never a full-size array) or a list of n COCO RLE dicts; the entries are the same.
    """
    rles = mask_rles(pred["masks"])
    if not len(rles):
        return []
    out = []
    for rle, box, label, score in zip(rles, pred["boxes"].tolist(), pred["labels"].tolist(),
                                      pred["scores"].tolist()):
        x0, y0, x1, y1 = box
        out.append({"image_id": int(image_id),
                    "category_id": int(category_map.to_json_id(label)) if category_map else int(label),
                    # full precision: re-scoring the file reproduces the in-memory numbers, ties included
                    "score": float(score), "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "segmentation": {"size": [int(s) for s in rle["size"]],
                                     "counts": rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes)
                                     else rle["counts"]}})
    return out


def mask_rles(masks) -> list[dict]:
    """One image's masks -> COCO compressed RLEs (pycocotools.mask.encode of the dense masks): from dense
    bool [n,H,W] (tensor or array), from a CropMasks (its crops only) or a list of RLE dicts (as given)."""
    if isinstance(masks, (list, tuple)):
        return list(masks)
    if hasattr(masks, "to_rles"):
        return masks.to_rles()
    masks = masks.numpy() if hasattr(masks, "numpy") else np.asarray(masks)
    if not len(masks):
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


# ----------------------------------------------------------------------------------------------- checkpoints
def config_from_checkpoint(ckpt: dict, path, config_path=None, overrides=()):
    """The config of an inference run: `config_path` + overrides when given, else the resolved config
    saved in the checkpoint + overrides (validated against base.yaml like any config file)."""
    if config_path is not None:
        return load_config(config_path, overrides)
    saved = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} holds no saved config (not written by train.py?); pass --config CONFIG "
                          "with the model settings it was trained with")
    with tempfile.TemporaryDirectory() as tmp:
        dump_config(saved, Path(tmp) / "checkpoint_config.yaml")
        return load_config(Path(tmp) / "checkpoint_config.yaml", overrides)


def load_for_inference(ckpt_path, config_path=None, overrides=()):
    """(cfg, model in eval mode on `cfg.device`, CategoryMap or None) from a checkpoint.

    Raises CheckpointError for a missing/unreadable file or one whose tensors do not fit the model built
    from the config (the message names the missing, unexpected and mis-shaped keys and the differing
    `model.*` config values), ConfigError for a bad config.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; pass the model_final.pth (or model_*.pth) "
                              "of a training run's output_dir")
    ckpt = read_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, path, config_path, overrides)
    build_cfg = copy.deepcopy(cfg)
    # The checkpoint replaces every weight, so ImageNet initial weights (a local file that may not exist on
    # this machine) are not needed to build the model.
    build_cfg.model.backbone.weights = None
    model = build_model(build_cfg)
    load_checkpoint(path, model, config=cfg)
    category_map = ckpt.get("category_map")
    category_map = CategoryMap.from_dict(category_map) if category_map else None
    model.to(resolve_device(str(cfg.device), dist.get_local_rank())).eval()
    return cfg, model, category_map


# ----------------------------------------------------------------------------------------------- folders
def list_images(images_dir) -> list[Path]:
    """Image files (PNG/JPEG/TIFF, any case) directly inside `images_dir`, sorted by file name.

    Outputs are named after the file's stem (X.tif -> X_labels.tif), so two images sharing a stem (X.png and
    X.tif) are a DataError naming them, raised before anything is predicted."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}; pass --images DIR holding "
                                "PNG/JPEG/TIFF files")
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {images_dir}: expected files ending in "
                                f"{', '.join(IMAGE_SUFFIXES)} (sub-folders are not searched)")
    by_stem: dict[str, list[str]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p.name)
    shared = [names for names in by_stem.values() if len(names) > 1]
    if shared:
        raise DataError(f"{images_dir}: images {', '.join(' and '.join(n) for n in shared[:5])} share a name "
                        "stem, and their outputs (X_labels.tif, X_rois.zip, ...) would overwrite each other; "
                        "rename one of each or move it to another folder")
    return files


@torch.no_grad()
def predict_folder(model: torch.nn.Module, cfg, images_dir, out_dir, category_map: CategoryMap | None) -> dict:
    """Predict every image of `images_dir` (any size — tiled per `test.tiling` —, 8/16-bit, grey/RGB,
    PNG/JPEG/TIFF) and write into `out_dir`, for detections with score >= test.score_thresh:

    - `labels/X_labels.tif` (X = the image's file name without its suffix): instance label image (uint16,
      uint32 from 65,536 instances), pixel = 1 + the instance's index in this image's results, 0 =
      background; where instances overlap the higher score wins the pixel (the others keep the overlaps);
    - `rois/X_rois.zip`: ImageJ / Fiji ROI set, one polygon per instance named like its label;
    - `geojson/X.geojson`: QuPath objects (File > Import objects), one detection per instance named like its
      label, classified by category name, with its score; holes and overlaps kept (gains.geojson_io);
    - `masks/X.npz`: the exact masks as crops with scores, labels (json category ids) and boxes
      (`gains.exports.read_instances_npz`; layout documented there);
    - `overlays/X.png`: the image with the instances scoring >= test.vis_score_thresh;
    - `results.json`: COCO results of the folder; `images.json`: {"images": [{id, file_name, height,
      width}], "categories": [...]}, ids 1..N in sorted file-name order.
    Memory is O(sum of instance areas) per image, never N x H x W. Under torchrun each rank predicts a
    disjoint shard and writes its images' files; rank 0 writes the jsons.
    Returns {"num_images", "num_detections", "out_dir"} (rank 0; {} elsewhere).
    """
    files = list_images(images_dir)
    for path in files:  # unreadable files are reported before anything is written
        try:
            read_image_size(path)
        except Exception as e:  # noqa: BLE001 - any decoder error: name the file
            raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); convert it to PNG/TIFF "
                            "or move it out of the folder") from None
    out_dir = Path(out_dir)
    for sub in ("overlays", "masks", "labels", "rois", "geojson"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_config(unwrap_model(model), cfg, progress=dist.is_main_process())
    to_json = category_map.to_json_id if category_map else int
    entries, results = [], []
    for n in shard_indices(len(files), dist.get_rank(), dist.get_world_size()):
        path, image_id = files[n], n + 1
        try:
            array = read_image_array(path)
        except Exception as e:  # noqa: BLE001 - any decoder error: name the file
            raise DataError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
        pred = predictor([array])[0]
        keep = (pred["scores"] >= float(cfg.test.score_thresh)).numpy()
        masks = pred["masks"].select(keep)
        scores = pred["scores"].numpy()[keep].astype(np.float32)
        contiguous = pred["labels"].numpy()[keep].tolist()
        labels = np.array([to_json(v) for v in contiguous], dtype=np.int64)
        names = [category_map.names[v - 1] if category_map else str(v) for v in contiguous]
        boxes = pred["boxes"].numpy()[keep].astype(np.float32)
        h, w = masks.image_size
        write_instances_npz(out_dir / "masks" / f"{path.stem}.npz", masks, scores, labels, boxes)
        label_image = masks.label_image(scores)
        write_label_image(out_dir / "labels" / f"{path.stem}_labels.tif", masks, scores)
        write_imagej_rois(out_dir / "rois" / f"{path.stem}_rois.zip", masks)
        write_geojson(out_dir / "geojson" / f"{path.stem}.geojson", masks, classes=names, scores=scores)
        shown = scores >= float(cfg.test.vis_score_thresh)  # the other outputs keep them all
        shown_labels = np.where(np.isin(label_image, np.flatnonzero(shown) + 1), label_image, 0)
        save_label_overlay(to_model_image(array, str(cfg.data.normalize)).numpy(), shown_labels, out_dir / "overlays" / f"{path.stem}.png",
                           f"{path.name}: {int(shown.sum())} instances "
                           f"(score >= {float(cfg.test.vis_score_thresh):g})")
        entries.append({"id": image_id, "file_name": path.name, "height": int(h), "width": int(w)})
        results.extend(coco_results(masks, boxes, scores, labels, image_id))
    gathered = dist.all_gather_object((entries, results))
    if not dist.is_main_process():
        return {}
    entries = sorted((e for part in gathered for e in part[0]), key=lambda e: e["id"])
    # a stable sort keeps each image's detections in score order
    results = sorted((r for part in gathered for r in part[1]), key=lambda r: r["image_id"])
    cats = ([{"id": i, "name": nm} for i, nm in zip(category_map.json_ids, category_map.names)]
            if category_map else [{"id": k, "name": str(k)} for k in range(1, int(cfg.model.num_classes) + 1)])
    write_json_atomic(out_dir / "results.json", results)
    write_json_atomic(out_dir / "images.json", {"images": entries, "categories": cats})
    return {"num_images": len(entries), "num_detections": len(results), "out_dir": str(out_dir)}
