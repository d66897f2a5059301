"""The data set: validated COCO records -> (image, target) items in torchvision's format (gains/README.md, Contracts).

Item: `image` float32 [3,H,W] in [0,1] (cropped/resized/flipped); `target` = {
    boxes float32 [N,4] xyxy pixels (the annotation's box through the same transform, as detectron2; see
    gains/transforms.py), labels int64 [N] in 1..K,
    masks uint8 [N,H,W], ga float32 [N,H,W] (only when GA maps are used), image_id int,
    ann_ids int64 [N], orig_size (H0, W0), dropped_fragments int (instances cut by a random crop whose
    visible part was below `data.crop_min_area`) }.
With `data.target_format: sparse` (the default) `masks` and `ga` are `SparseMaps` (gains/sparse_maps.py):
each instance's mask and GA map is a patch on its box, so memory grows with the instances' area, not with
N x H x W, and the model computes the same losses as with the dense tensors (`target_format: dense`).
Crowd annotations are not instances to learn; they are left out of targets (as detectron2 does) and kept in
the records for evaluation. Instances whose box or mask is empty after the transforms (a tiny instance in a
downscale, a box clipped away) are left out too, as detectron2's filter_empty_instances does.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .annotations import CategoryMap, DataError, ImageRecord, load_coco, segmentation_to_mask
from .ga_manifest import prepare_map_folder
from .ga_store import GAMapStore, GammParams
from .imageio import read_image
from .instances import CropMasks
from .sparse_maps import sparse_masks_from_crops
from .synthetic import make_synthetic_dataset
from .transforms import (EvalTransform, RandomCrop, TrainTransform, nonempty_instances, resized_shape, select,
                         xywh_to_xyxy)

SPLITS = ("train", "val", "test")
TARGET_FORMATS = ("sparse", "dense")
MODES_WITH_MAPS = ("reweight_only", "branch_only", "gains")


class InstanceDataset(torch.utils.data.Dataset):
    """Records -> (image, target). `ga_store` is None when the model needs no GA maps; `crop` is an
    optional RandomCrop applied before `transform`; `target_format` "sparse" | "dense" (see module doc)."""

    def __init__(self, records: list[ImageRecord], category_map: CategoryMap, transform,
                 ga_store: GAMapStore | None = None, normalize: str = "dtype", target_format: str = "sparse",
                 crop: RandomCrop | None = None):
        if target_format not in TARGET_FORMATS:
            raise ValueError(f"data.target_format must be one of {TARGET_FORMATS}, got {target_format!r}")
        self.records = records
        self.category_map = category_map
        self.transform = transform
        self.ga_store = ga_store
        self.normalize = normalize
        self.target_format = target_format
        self.crop = crop

    def __len__(self) -> int:
        return len(self.records)

    def _instances(self, record: ImageRecord, anns: list):
        """(masks, ga) of `anns` at the original size: dense uint8 / float32 [N,H,W] or SparseMaps."""
        h, w = record.height, record.width
        if self.target_format == "sparse":
            masks = sparse_masks_from_crops(CropMasks.from_segmentations([a.segmentation for a in anns], h, w))
            ga = self.ga_store.sparse_maps(record, [a.id for a in anns]) if self.ga_store is not None else None
            return masks, ga
        if anns:
            masks = torch.from_numpy(np.stack([segmentation_to_mask(a.segmentation, h, w) for a in anns]))
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        ga = torch.from_numpy(self.ga_store.maps(record, [a.id for a in anns])) if self.ga_store else None
        return masks, ga

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            image = read_image(record.path, self.normalize)
        except DataError as e:  # corrupt / truncated file: name the image id too (the message names the file)
            raise DataError(f"image id {record.image_id}: {e}") from None
        if tuple(image.shape[-2:]) != (record.height, record.width):
            raise DataError(f"{record.path}: image id {record.image_id} is {tuple(image.shape[-2:])} but the "
                            f"json says {(record.height, record.width)}; fix the json's height/width")
        anns = [a for a in record.annotations if not a.iscrowd]
        masks, ga = self._instances(record, anns)
        # the json's box (or pycocotools' box of the segmentation, annotations.load_coco), not the mask's
        boxes = xywh_to_xyxy([a.bbox for a in anns])
        dropped = 0
        if self.crop is not None:
            image, masks, ga, boxes, keep, dropped = self.crop(image, masks, ga, boxes)
            anns = [anns[i] for i in keep.tolist()]
        sample = self.transform.draw(*image.shape[-2:])
        image, masks, ga = sample.apply(image, masks, ga)
        boxes = sample.apply_boxes(boxes)
        keep = nonempty_instances(boxes, masks)
        if not bool(keep.all()):
            keep = torch.nonzero(keep)[:, 0]
            masks, ga = select(masks, ga, keep)
            boxes, anns = boxes[keep], [anns[i] for i in keep.tolist()]
        target = {
            "boxes": boxes,
            "labels": torch.tensor([a.label for a in anns], dtype=torch.int64),
            "masks": masks,
            "image_id": record.image_id,
            "ann_ids": torch.tensor([a.id for a in anns], dtype=torch.int64),
            "orig_size": (record.height, record.width),
            "dropped_fragments": dropped,
        }
        if ga is not None:
            target["ga"] = ga
        return image, target


def collate(batch):
    """[(image, target), ...] -> (list of images, list of targets): images keep their own sizes."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def split_paths(cfg, split: str) -> tuple[Path, Path]:
    """(json path, image folder) of a split from `data.root` + `data.{split}_json/_images`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(cfg.data.root)
    return root / cfg.data[f"{split}_json"], root / cfg.data[f"{split}_images"]


def ensure_synthetic(cfg) -> None:
    """Generate the synthetic data set into `data.root` when `data.synthetic` is on and it is missing."""
    if not cfg.data.synthetic:
        return
    if all(split_paths(cfg, s)[0].is_file() for s in SPLITS):
        return
    make_synthetic_dataset(cfg.data.root, seed=0)


def gamm_params(cfg) -> GammParams:
    g = cfg.gamm
    return GammParams(str(g.variant), int(g.window_size), float(g.ga_factor), float(g.overlap_hl),
                      int(g.target_category_id))


def build_ga_store(cfg, train_images: Path) -> GAMapStore:
    params = gamm_params(cfg)
    map_dir = Path(cfg.gamm.map_dir) if cfg.gamm.map_dir else train_images / params.folder_name
    return GAMapStore(map_dir, params, on_the_fly=bool(cfg.gamm.on_the_fly), dtype=str(cfg.gamm.dtype),
                      layout=str(cfg.gamm.layout))


def uses_ga_maps(cfg) -> bool:
    return cfg.model.mode in MODES_WITH_MAPS


MAX_TRAIN_SHRINK = 2.0  # beyond this the whole-image resize makes objects much smaller than on the slide


def warn_if_shrunk(records: list[ImageRecord], min_sizes, max_size: int, json_path) -> None:
    """One warning when whole-image training would shrink images by more than MAX_TRAIN_SHRINK (large
    fields of view squeezed into max_size_train), naming the largest case and the option that avoids it."""

    sizes = min_sizes if isinstance(min_sizes, (list, tuple)) else [min_sizes]
    worst = None
    for r in records:
        nh, nw = resized_shape(r.height, r.width, int(max(sizes)), int(max_size))
        shrink = max(r.height / nh, r.width / nw)
        if shrink > MAX_TRAIN_SHRINK and (worst is None or shrink > worst[0]):
            worst = (shrink, r, nh, nw)
    if worst is not None:
        shrink, r, nh, nw = worst
        warnings.warn(f"{json_path}: training images are shrunk up to {shrink:.1f}x by data.min_size_train / "
                      f"max_size_train (image id {r.image_id}: {r.height}x{r.width} -> {nh}x{nw}), so objects "
                      "are that much smaller than on the slide; train on full-resolution crops with "
                      "data.crop_size=[S,S] (e.g. 512) and predict with test.tiling=auto test.tile_size=S")


def build_dataset(cfg, split: str, is_train: bool) -> InstanceDataset:
    """The data set of `split`. Training applies the random resize/flip and attaches GA maps when the model
    mode uses them; evaluation resizes to `data.min_size_test` and keeps images without annotations."""
    ensure_synthetic(cfg)
    json_path, image_dir = split_paths(cfg, split)
    skip_empty = bool(cfg.data.skip_empty_images) and is_train
    records, category_map, _ = load_coco(json_path, image_dir, skip_empty=skip_empty)
    if category_map.num_classes != int(cfg.model.num_classes):
        raise DataError(f"{json_path} declares {category_map.num_classes} categories "
                        f"{list(category_map.names)} but model.num_classes is {cfg.model.num_classes}; "
                        f"set model.num_classes={category_map.num_classes}")
    if is_train and not records:
        raise DataError(f"{json_path}: no training image left after validation; check the warnings above")
    d = cfg.data
    crop = None
    if is_train and not d.crop_size:
        warn_if_shrunk(records, d.min_size_train, d.max_size_train, json_path)
    if is_train:
        transform = TrainTransform(d.min_size_train, d.max_size_train, d.hflip_prob, vflip_prob=d.vflip_prob,
                                   rot90_prob=d.rot90_prob, intensity_scale=d.intensity_scale)
        crop = RandomCrop(d.crop_size, d.crop_min_area) if d.crop_size else None
    else:
        transform = EvalTransform(d.min_size_test, d.max_size_test)
    ga_store = None
    if is_train and uses_ga_maps(cfg):
        ga_store = build_ga_store(cfg, split_paths(cfg, "train")[1])
        prepare_map_folder(ga_store, records)  # refuses maps of other parameters, drops stale ones
        if split != "train":
            warnings.warn(f"GA maps requested for split {split!r}; GAMM maps are defined for training data")
    return InstanceDataset(records, category_map, transform, ga_store, str(d.normalize),
                           target_format=str(d.target_format), crop=crop)
