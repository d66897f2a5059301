"""COCO instance json -> validated records, and the json <-> contiguous category mapping.

Validation happens here, once, at the boundary (DESIGN.md §5.2, detectron2's load_coco_json checklist):
errors stop loading with a message naming the file, image id or annotation id and the fix; data that can be
dropped safely is dropped with ONE counted warning per kind of problem, listing the first offending ids.
Downstream code trusts the records.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


class DataError(ValueError):
    """Invalid data set input; the message names the file / image id / annotation id and the fix."""


@dataclass(frozen=True)
class CategoryMap:
    """Json category ids (any integers, e.g. ISBI's 0 and 1) <-> contiguous labels 1..K (0 = background)."""

    json_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: list[dict]) -> "CategoryMap":
        cats = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c.get("name", c["id"])) for c in cats))

    @classmethod
    def from_dict(cls, d: dict) -> "CategoryMap":
        return cls(tuple(d["json_ids"]), tuple(d["names"]))

    def to_dict(self) -> dict:
        return {"json_ids": list(self.json_ids), "names": list(self.names)}

    @property
    def num_classes(self) -> int:
        return len(self.json_ids)

    def to_label(self, json_id: int) -> int:
        """Json category id -> contiguous label in 1..K."""
        return self.json_ids.index(int(json_id)) + 1

    def to_json_id(self, label: int) -> int:
        """Contiguous label in 1..K -> json category id."""
        return self.json_ids[int(label) - 1]


@dataclass
class AnnotationRecord:
    """One validated instance. `segmentation` is a list of polygons (each a flat [x0,y0,...] list with
    >= 3 points) or an RLE dict (counts str/bytes for compressed, list for uncompressed)."""

    id: int
    category_id: int          # the json's id
    label: int                # contiguous 1..K
    segmentation: Any
    bbox: tuple               # xywh as in the json (GAMM's nuclei grouping uses it)
    iscrowd: bool
    area: float


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    height: int
    width: int
    annotations: list[AnnotationRecord] = field(default_factory=list)


class _Problems:
    """Collects droppable problems by kind, then warns once per kind with a total and example ids."""

    def __init__(self, json_path: Path):
        self.json_path = json_path
        self.kinds: dict[str, list[str]] = defaultdict(list)
        self.fixes: dict[str, str] = {}

    def add(self, kind: str, where: str, fix: str) -> None:
        self.kinds[kind].append(where)
        self.fixes[kind] = fix

    def warn(self) -> dict[str, int]:
        for kind, wheres in self.kinds.items():
            shown = ", ".join(wheres[:5]) + (" ..." if len(wheres) > 5 else "")
            warnings.warn(f"{self.json_path}: {len(wheres)} {kind} ({shown}); {self.fixes[kind]}",
                          stacklevel=3)
        return {kind: len(w) for kind, w in self.kinds.items()}


def _read_json(json_path: Path) -> dict:
    if not json_path.is_file():
        raise DataError(f"annotation file not found: {json_path}; put the data set there (README, section "
                        "Data: train.json/val.json/test.json + train/ val/ test/ image folders) or point to it "
                        "(training: data.root=DIR; preprocess.py: --json/--images)")
    try:
        with open(json_path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: not valid JSON ({e})") from None
    for key in ("images", "categories"):
        if key not in data:
            raise DataError(f"{json_path}: missing top-level '{key}'; a COCO instances file needs "
                            "'images', 'annotations' and 'categories'")
    return data


def _image_path(image_dir: Path, image: dict, json_path: Path) -> Path:
    name = image.get("file_name")
    if not name:
        raise DataError(f"{json_path}: image id {image.get('id')} has no file_name")
    root = image_dir.resolve()
    path = (root / name).resolve()
    if root != path and root not in path.parents:
        raise DataError(f"{json_path}: image id {image['id']} file_name {name!r} points outside the image "
                        f"folder {root}; use a path relative to that folder")
    return path


def _clean_segmentation(ann: dict, height: int, width: int, problems: _Problems) -> Any | None:
    """Return a usable segmentation or None (problem recorded). Polygons with < 3 points are dropped."""
    seg = ann.get("segmentation")
    where = f"annotation id {ann['id']} (image {ann['image_id']})"
    if isinstance(seg, dict):  # RLE
        if "counts" not in seg or "size" not in seg:
            raise DataError(f"{where}: RLE segmentation needs 'counts' and 'size'")
        if [int(s) for s in seg["size"]] != [height, width]:
            raise DataError(f"{where}: RLE size {seg['size']} differs from the image size {[height, width]}; "
                            "re-encode the mask at the image's resolution")
        return seg
    if not isinstance(seg, list) or len(seg) == 0:
        problems.add("annotations with an empty segmentation dropped", where,
                     "give each instance a polygon or an RLE mask")
        return None
    if all(isinstance(v, (int, float)) for v in seg):  # a single flat polygon not wrapped in a list
        seg = [seg]
    polygons = []
    for poly in seg:
        if len(poly) % 2 == 0 and len(poly) >= 6:
            polygons.append([float(v) for v in poly])
        else:
            problems.add("polygons with fewer than 3 points (or an odd coordinate count) dropped", where,
                         "polygons need >= 3 (x, y) points")
    if not polygons:
        problems.add("annotations without a valid polygon dropped", where,
                     "fix or remove these annotations")
        return None
    return polygons


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO polygons / RLE -> uint8 [H,W] mask (pycocotools' rasteriser; polygons are united)."""
    return mask_utils.decode(segmentation_to_rle(segmentation, height, width))


def load_coco(json_path: str | os.PathLike, image_dir: str | os.PathLike, *, skip_empty: bool = False,
              check_image_sizes: bool = True) -> tuple[list[ImageRecord], CategoryMap, dict[str, int]]:
    """Load and validate a COCO instances json.

    Args:
        json_path: the COCO file. image_dir: the folder `file_name`s are relative to.
        skip_empty: drop images without (valid) annotations (counted warning) instead of keeping them.
        check_image_sizes: open each image header to compare its size with the json (cheap: header only).
    Returns:
        (records in json image order, category map, {problem kind: count of dropped items}).
    Raises:
        DataError naming the file, image id or annotation id, for: a missing image file, an image size that
        differs from the json, duplicate or zero annotation ids, duplicate image ids, unknown category or
        image ids, a file_name escaping the image folder, malformed RLE.
    """
    from .imageio import read_image_size  # local import: keeps this module usable without pillow/tifffile

    json_path, image_dir = Path(json_path), Path(image_dir)
    data = _read_json(json_path)
    if not data["categories"]:
        raise DataError(f"{json_path}: 'categories' is empty; list every category with its id and name")
    categories = CategoryMap.from_categories(data["categories"])
    if len(set(categories.json_ids)) != len(categories.json_ids):
        raise DataError(f"{json_path}: duplicate category ids {categories.json_ids}")
    problems = _Problems(json_path)

    records: dict[int, ImageRecord] = {}
    for image in data["images"]:
        image_id = int(image["id"])
        if image_id in records:
            raise DataError(f"{json_path}: duplicate image id {image_id}; image ids must be unique")
        path = _image_path(image_dir, image, json_path)
        if not path.is_file():
            raise DataError(f"{json_path}: image id {image_id}: file {path} not found; put the image there "
                            "or fix file_name / the images folder setting")
        height, width = int(image["height"]), int(image["width"])
        if check_image_sizes:
            real = read_image_size(path)
            if real != (height, width):
                raise DataError(f"{json_path}: image id {image_id} ({path.name}) is {real[0]}x{real[1]} "
                                f"(HxW) on disk but {height}x{width} in the json; fix the json's height/width")
        records[image_id] = ImageRecord(image_id, path, height, width)

    seen_ann_ids: set[int] = set()
    for ann in data.get("annotations", []):
        ann_id = ann.get("id")
        if ann_id is None or int(ann_id) == 0:
            raise DataError(f"{json_path}: an annotation of image {ann.get('image_id')} has id {ann_id}; "
                            "annotation ids must be integers >= 1 (id 0 is treated as 'unmatched' by COCO "
                            "tools and names GA map files); renumber them")
        ann_id = int(ann_id)
        if ann_id in seen_ann_ids:
            raise DataError(f"{json_path}: duplicate annotation id {ann_id}; annotation ids must be unique "
                            "(GA maps are stored as <annotation id>.npy)")
        seen_ann_ids.add(ann_id)
        record = records.get(int(ann.get("image_id", -1)))
        if record is None:
            raise DataError(f"{json_path}: annotation id {ann_id} refers to image id {ann.get('image_id')}, "
                            "which is not in 'images'")
        if ann.get("category_id") not in categories.json_ids:
            raise DataError(f"{json_path}: annotation id {ann_id} has category_id {ann.get('category_id')}, "
                            f"not among the declared categories {list(categories.json_ids)}")
        seg = _clean_segmentation(ann, record.height, record.width, problems)
        if seg is None:
            continue
        rle = segmentation_to_rle(seg, record.height, record.width)
        pixels = float(mask_utils.area(rle))
        bbox = tuple(float(v) for v in ann.get("bbox", ()))
        if len(bbox) != 4:
            bbox = tuple(float(v) for v in mask_utils.toBbox(rle))
        if pixels == 0 or bbox[2] <= 0 or bbox[3] <= 0:
            problems.add("annotations with a degenerate box or no pixel dropped",
                         f"annotation id {ann_id} (image {record.image_id})",
                         "such instances cover no pixel; remove them or fix the polygon/box")
            continue
        area = float(ann["area"]) if ann.get("area") is not None else pixels
        record.annotations.append(AnnotationRecord(
            ann_id, int(ann["category_id"]), categories.to_label(ann["category_id"]), seg, bbox,
            bool(ann.get("iscrowd", 0)), area))

    out = []
    for record in records.values():
        if skip_empty and not any(not a.iscrowd for a in record.annotations):
            problems.add("images without annotations skipped", f"image id {record.image_id}",
                         "set data.skip_empty_images=false to keep them as background-only images")
            continue
        out.append(record)
    return out, categories, problems.warn()


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Any COCO segmentation -> one compressed RLE dict."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation
