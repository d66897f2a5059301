"""COCO instance json -> validated records, and the json <-> contiguous category mapping.

Validation happens here, once, at the boundary (gains/README.md, Habits; detectron2's load_coco_json checklist):
errors stop loading with a message naming the file, image id or annotation id and the fix; data that can be
dropped safely is dropped with ONE counted warning per kind of problem, listing the first offending ids.
Downstream code trusts the records.

One validator per kind of COCO input, one error type (DataError): `check_coco_gt` for a ground-truth
instances dict (load_coco for training, evaluation.evaluate_results and metrics.coco_evaluate for scoring)
and `check_coco_results` for a results list (both scorers). Scoring refuses (DataError) what training drops
with a warning: an annotation without a segmentation, a polygon of fewer than 3 points.

What is an error (DataError), not a drop: a json that is not a COCO instances mapping (missing or non-list
'images' / 'annotations' / 'categories'; an empty list is fine), fields of the wrong type (ids, sizes,
coordinates that are not numbers), coordinates that are not finite or lie outside the image by more than
the tolerance below, malformed RLE (size other than the image's, counts that do not decode to exactly H*W
pixels), and image files whose header cannot be read. None of these can be fixed by guessing, and all of
them used to reach C code (pycocotools, the GAMM lattice) that crashes or silently clips on them.

Coordinate convention and tolerance: COCO polygon vertices and boxes are in pixel-edge coordinates, the image
spans [0, W] x [0, H]. Annotation tools often put border vertices slightly outside (-0.5, W + 0.5), so vertices
and box corners may lie up to `coordinate_tolerance(H, W)` = max(1 px, 1 % of the side) outside the image;
beyond that the annotation belongs to another image size (or is garbage) and loading stops.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .errors import DataError
from .imageio import read_image_array, read_image_size


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


COCO_KEYS = ("images", "annotations", "categories")


def _read_json(json_path: Path) -> Any:
    """The parsed json file; its structure is checked by `check_coco_gt`."""
    if not json_path.is_file():
        raise DataError(f"annotation file not found: {json_path}; put the data set there (README, "
                        "'Data and your own annotations': train.json/val.json/test.json + train/ val/ test/ image folders) or point to it "
                        "(training: data.root=DIR; preprocess.py: --json/--images)")
    try:
        with open(json_path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{json_path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """A JSON number that is finite as a float64 (not bool, NaN, inf, or an int beyond float range)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) < 1e300 if isinstance(v, int) else math.isfinite(v)


INT64_MAX = 2 ** 63 - 1


def _is_int64(value: Any) -> bool:
    """An integer (or integral float) in the int64 range that COCO tools and tensors hold ids in."""
    if not is_finite_number(value) or (isinstance(value, float) and not value.is_integer()):
        return False
    return -INT64_MAX - 1 <= int(value) <= INT64_MAX


def _as_int(value: Any, what: str, fix: str = "fix the json") -> int:
    """`value` as an int: JSON integers (and integral floats such as 3.0) in the int64 range that COCO tools
    and tensors hold ids in; anything else is a DataError."""
    if _is_int64(value):
        return int(value)
    raise DataError(f"{what} is {_short(value)}, not a (64-bit) integer; {fix}")


def coordinate_tolerance(height: int, width: int) -> tuple[float, float]:
    """(x, y) distance that polygon vertices / box corners may lie outside [0, W] x [0, H]: max(1 px, 1 %)."""
    return max(1.0, 0.01 * width), max(1.0, 0.01 * height)


def _image_path(image_dir: Path, image: dict, json_path: Path, image_id: int) -> Path:
    name = image.get("file_name")
    if not name:
        raise DataError(f"{json_path}: image id {image_id} has no file_name; give the image file's path "
                        "relative to the image folder")
    if not isinstance(name, str) or "\x00" in name:
        raise DataError(f"{json_path}: image id {image_id} has file_name {_short(name)}, not a file name; give "
                        "the image file's path relative to the image folder as a string")
    root = image_dir.resolve()
    path = (root / name).resolve()
    if root != path and root not in path.parents:
        raise DataError(f"{json_path}: image id {image_id} file_name {name!r} points outside the image "
                        f"folder {root}; use a path relative to that folder")
    return path


def _rle_string_counts(counts: str | bytes) -> np.ndarray | None:
    """Run lengths of a compressed COCO RLE string, or None when it is malformed.

    The format of pycocotools' rleToString/rleFrString: each count is a little-endian series of 5-bit groups,
    one char each (char - 48; bit 0x20 = more groups follow, bit 0x10 of the last = negative), and counts from
    the fourth on are stored as differences to the count two places earlier. Decoding it here (numpy) lets us
    check the runs before pycocotools' C code, which reads past the string's end on a dangling group and
    trusts the counts."""
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            return None
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if ((c < 0) | (c > 63)).any():
        return None
    more = (c & 0x20) != 0
    if more[-1]:
        return None
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 7:  # > 35 bits: no image has such a run, and pycocotools' int shifts overflow
        return None
    pos = np.arange(c.size) - np.repeat(starts, lengths)
    x = np.add.reduceat((c & 0x1F) << (5 * pos), starts)
    x = np.where((c[ends] & 0x10) != 0, x - (np.int64(1) << (5 * lengths)), x)
    out = x.copy()
    out[1::2] = np.cumsum(x[1::2])
    if len(x) > 2:
        out[2::2] = np.cumsum(x[2::2])
    return out


def check_segmentation(seg: Any, height: int, width: int, where: str) -> None:
    """Raise DataError (message starts with `where`) unless `seg` is well-formed for an H x W image: polygons
    are lists of finite numbers within `coordinate_tolerance` of the image, RLE has `size` [H, W] and counts
    (compressed or not) of non-negative runs summing to H*W. Structure only: polygons with < 3 points pass
    (load_coco drops them with a counted warning)."""
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise DataError(f"{where}: RLE segmentation needs 'counts' and 'size'; write it with "
                            "pycocotools.mask.encode (compressed) or as {'size': [H, W], 'counts': [runs]}")
        size = seg["size"]
        if (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int64(v) for v in size)
                or [int(v) for v in size] != [height, width]):
            raise DataError(f"{where}: RLE size {_short(size)} differs from the image size {[height, width]} "
                            "(HxW); re-encode the mask at the image's resolution")
        counts = seg["counts"]
        if isinstance(counts, (str, bytes)):
            runs = _rle_string_counts(counts)
            if runs is None:
                raise DataError(f"{where}: compressed RLE counts {_short(counts)} are not a valid COCO RLE "
                                "string; re-encode the mask with pycocotools.mask.encode")
            kind = "compressed"
        elif isinstance(counts, list):
            if not all(_is_int64(v) for v in counts):
                bad = next(v for v in counts if not _is_int64(v))
                raise DataError(f"{where}: uncompressed RLE counts hold {_short(bad)}; counts are integer run "
                                "lengths (column-major, starting with background)")
            runs = [int(v) for v in counts]  # Python ints: exact sums, whatever the values
            kind = "uncompressed"
        else:
            raise DataError(f"{where}: RLE counts are a {type(counts).__name__}; they must be a string "
                            "(compressed) or a list of run lengths (uncompressed)")
        lowest = (int(runs.min()) if isinstance(runs, np.ndarray) else min(runs)) if len(runs) else 0
        if lowest < 0:
            raise DataError(f"{where}: {kind} RLE has a negative run length ({lowest}); re-encode the mask "
                            "with pycocotools.mask.encode")
        total = int(runs.sum()) if isinstance(runs, np.ndarray) else sum(runs)
        if total != height * width:
            raise DataError(f"{where}: {kind} RLE runs sum to {total} pixels but the image has "
                            f"{height}x{width} = {height * width}; the counts are truncated or belong to "
                            "another image size — re-encode the mask at the image's resolution")
        return
    if not isinstance(seg, list):
        raise DataError(f"{where}: segmentation is a {type(seg).__name__} ({_short(seg)}); it must be a list of "
                        "polygons [[x0, y0, x1, y1, ...], ...] or an RLE dict {'size': [H, W], 'counts': ...}")
    polygons = [seg] if seg and all(_is_number(v) for v in seg) else seg
    tx, ty = coordinate_tolerance(height, width)
    for n, poly in enumerate(polygons):
        if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
            bad = poly if not isinstance(poly, list) else next(v for v in poly if not _is_number(v))
            raise DataError(f"{where}: polygon #{n} holds {_short(bad)}; a polygon is a flat list of numbers "
                            "[x0, y0, x1, y1, ...]")
        if not all(is_finite_number(v) for v in poly):
            raise DataError(f"{where}: polygon #{n} has non-finite coordinates (NaN, infinity or beyond the "
                            "float range); fix or remove this annotation")
        xy = np.asarray(poly, dtype=np.float64)
        xs, ys = xy[0::2], xy[1::2]
        if (xs.size and (xs.min() < -tx or xs.max() > width + tx)) or \
                (ys.size and (ys.min() < -ty or ys.max() > height + ty)):
            def span(v):
                return f"{v.min():g}..{v.max():g}" if v.size else "-"
            raise DataError(
                f"{where}: polygon #{n} spans x {span(xs)}, y {span(ys)}, "
                f"outside the {height}x{width} (HxW) image by more than {tx:g}/{ty:g} px; the coordinates "
                "belong to another image size or are wrong — fix this annotation (or the image's height/width)")


def _check_bbox(bbox: Any, height: int, width: int, where: str) -> tuple | None:
    """A COCO xywh box as 4 floats, or None when absent / not of length 4 (it is then taken from the mask)."""
    if bbox is None:
        return None
    if not isinstance(bbox, (list, tuple)) or not all(_is_number(v) for v in bbox):
        raise DataError(f"{where}: bbox {_short(bbox)} is not a list of numbers [x, y, width, height]; fix it "
                        "or leave it out (it is then computed from the mask)")
    if len(bbox) != 4:
        return None
    if not all(is_finite_number(v) for v in bbox):
        raise DataError(f"{where}: bbox {_short(bbox)} has non-finite values; fix it or leave it out")
    x, y, w, h = (float(v) for v in bbox)
    tx, ty = coordinate_tolerance(height, width)
    if x < -tx or y < -ty or x + max(w, 0) > width + tx or y + max(h, 0) > height + ty:
        raise DataError(f"{where}: bbox {_short(bbox)} (xywh) lies outside the {height}x{width} (HxW) image by "
                        f"more than {tx:g}/{ty:g} px; fix it or leave it out (it is then computed from the mask)")
    return x, y, w, h


# ------------------------------------------------------------------------ COCO files: one validator per kind
# Every COCO json the library reads passes one of these two: `check_coco_gt` for a ground-truth instances
# dict (load_coco for training, evaluation.evaluate_results and metrics.coco_evaluate for scoring) and
# `check_coco_results` for a results list (both scorers). So each malformed input gets one rule, one
# DataError and one message, whichever way it came in.

GEOMETRIES = (None, "segmentation", "bbox")
RESULT_KEYS = ("image_id", "category_id", "score")


@dataclass(frozen=True)
class CocoGroundTruth:
    """A validated COCO instances dict: the json image entries by (int) id, with integer `height` / `width`
    >= 1; the category map; each image's annotation entries in json order (every image id has a list)."""

    images: dict[int, dict]
    categories: CategoryMap
    annotations: dict[int, list[dict]]

    def size(self, image_id: int) -> tuple[int, int]:
        """(height, width) of an image, as ints."""
        image = self.images[image_id]
        return int(image["height"]), int(image["width"])


def polygon_list(seg: list) -> list:
    """A polygon segmentation as a list of polygons: a single flat [x0, y0, ...] polygon is wrapped (COCO
    files hold both forms; pycocotools reads only the list)."""
    return [seg] if seg and all(_is_number(v) for v in seg) else seg


def coco_box(bbox: Any) -> tuple | None:
    """A validated annotation 'bbox' as 4 floats xywh, or None when absent or not 4 long (it is then taken
    from the mask)."""
    if bbox is None or len(bbox) != 4:
        return None
    return tuple(float(v) for v in bbox)


def _check_top_level(data: Any, where: str) -> None:
    """A mapping with 'images', 'annotations' and 'categories' lists of dicts; DataError otherwise."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: the top level is a {type(data).__name__}, not a COCO instances mapping "
                        "with 'images', 'annotations' and 'categories' lists")
    for key in COCO_KEYS:
        if key not in data:
            raise DataError(f"{where}: missing top-level '{key}'; a COCO instances file needs "
                            "'images', 'annotations' and 'categories' (an empty 'annotations' list is fine)")
        if not isinstance(data[key], list):
            raise DataError(f"{where}: top-level '{key}' is a {type(data[key]).__name__}, not a list; "
                            "a COCO instances file holds lists of dicts there")
        for n, item in enumerate(data[key]):
            if not isinstance(item, dict):
                raise DataError(f"{where}: '{key}' entry #{n} is a {type(item).__name__} ({_short(item)}), "
                                "not a dict; every entry is a JSON object")


def _check_categories(categories: list[dict], where: str) -> CategoryMap:
    """At least one category, integer ids, none twice -> the category map (the json is not modified)."""
    if not categories:
        raise DataError(f"{where}: 'categories' is empty; list every category with its id and name")
    ids = [_as_int(c.get("id"), f"{where}: category #{n} ({_short(c)}) id", "give every category an integer id")
           for n, c in enumerate(categories)]
    category_map = CategoryMap.from_categories([{**c, "id": i} for c, i in zip(categories, ids)])
    if len(set(ids)) != len(ids):
        raise DataError(f"{where}: duplicate category ids {category_map.json_ids}; category ids must be unique")
    return category_map


def _check_images(images: list[dict], where: str) -> dict[int, dict]:
    """Integer image ids, none twice, integer height / width >= 1 -> {image id: json entry}."""
    out: dict[int, dict] = {}
    for n, image in enumerate(images):
        image_id = _as_int(image.get("id"), f"{where}: image #{n} ({_short(image.get('file_name'))}) id",
                           "give every image a unique integer id")
        if image_id in out:
            raise DataError(f"{where}: duplicate image id {image_id}; image ids must be unique")
        height, width = (_as_int(image.get(k), f"{where}: image id {image_id} {k}",
                                 "give the image's size in pixels") for k in ("height", "width"))
        if height < 1 or width < 1:
            raise DataError(f"{where}: image id {image_id} is {height}x{width} (HxW) in the json; give the "
                            "image's size in pixels (both >= 1)")
        out[image_id] = image
    return out


def _require_whole_polygons(seg: list, where: str) -> None:
    """Scoring refuses what load_coco drops with a warning: a polygon of < 3 points or an odd coordinate count.
    pycocotools would read a 2-point polygon as a box and ignore a dangling coordinate, and dropping it would
    change the scores without a word."""
    for n, poly in enumerate(polygon_list(seg)):
        if len(poly) < 6 or len(poly) % 2:
            raise DataError(f"{where}: polygon #{n} has {len(poly)} coordinates; a polygon needs >= 3 (x, y) "
                            "points (an even count >= 6) — fix or remove it")


def _check_geometry(seg: Any, height: int, width: int, where: str, required: bool) -> None:
    """A present segmentation is well-formed (check_segmentation); a `required` one must be present, not
    empty, and its polygons whole. Absent or empty, not required: load_coco drops it with a counted warning."""
    empty = seg is None or (isinstance(seg, list) and not seg)
    if not empty:
        check_segmentation(seg, height, width, where)
    if not required:
        return
    if empty:
        raise DataError(f"{where}: no segmentation (missing, null or empty); mask scores need a polygon list "
                        "or an RLE mask {'size': [H, W], 'counts': ...} for each — add it or remove the entry")
    if isinstance(seg, list):
        _require_whole_polygons(seg, where)


def _annotation_id(ann: dict, n: int, seen: set[int], where: str) -> int:
    """Annotation #n's id: an integer >= 1 not in `seen` (which it joins); DataError otherwise."""
    ann_id = ann.get("id")
    if not _is_int64(ann_id) or int(ann_id) < 1:
        raise DataError(f"{where}: annotation #{n} (image {_short(ann.get('image_id'))}) has id "
                        f"{_short(ann_id)}; annotation ids must be integers >= 1 (id 0 is treated as "
                        "'unmatched' by COCO tools and names GA map files); renumber them")
    ann_id = int(ann_id)
    if ann_id in seen:
        raise DataError(f"{where}: duplicate annotation id {ann_id}; annotation ids must be unique "
                        "(GA maps are stored as <annotation id>.npy)")
    seen.add(ann_id)
    return ann_id


def _check_annotation(ann: dict, ann_id: int, images: dict[int, dict], categories: CategoryMap, where: str,
                      geometry: str | None) -> int:
    """The fields of annotation `ann_id` -> its image id; DataError naming the annotation id and the fix."""
    image_id = ann.get("image_id")
    if not _is_int64(image_id) or int(image_id) not in images:
        raise DataError(f"{where}: annotation id {ann_id} refers to image id {_short(image_id)}, "
                        "which is not in 'images'")
    image_id = int(image_id)
    category_id = ann.get("category_id")
    if not _is_number(category_id) or category_id not in categories.json_ids:
        raise DataError(f"{where}: annotation id {ann_id} has category_id {_short(category_id)}, "
                        f"not among the declared categories {list(categories.json_ids)}")
    at = f"{where}: annotation id {ann_id} (image {image_id})"
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd is not None and (iscrowd not in (0, 1) or not (_is_number(iscrowd) or isinstance(iscrowd, bool))):
        raise DataError(f"{at}: iscrowd is {_short(iscrowd)}; it must be 0 or 1")
    area = ann.get("area")
    if area is not None and not (is_finite_number(area) and area >= 0):
        raise DataError(f"{at}: area is {_short(area)}; it must be a finite number >= 0 (the mask's "
                        "pixel count), or leave it out to have it computed")
    height, width = int(images[image_id]["height"]), int(images[image_id]["width"])
    box = _check_bbox(ann.get("bbox"), height, width, at)
    if geometry == "bbox" and box is None:
        raise DataError(f"{at}: no 'bbox' [x, y, width, height]; box AP (iou_type 'bbox') needs one for each "
                        "annotation")
    _check_geometry(ann.get("segmentation"), height, width, at, geometry == "segmentation")
    return image_id


def check_coco_gt(data: Any, where: str = "ground truth", *, geometry: str | None = None) -> CocoGroundTruth:
    """THE validator of a COCO ground-truth instances dict; DataError whose message starts with `where` (the
    file) and names the image id / annotation id and the fix.

    Checks: a mapping with 'images', 'annotations', 'categories' lists of dicts; >= 1 category, integer
    category ids, none twice; integer image ids, none twice, integer height / width >= 1; annotation ids
    integers >= 1, none twice; each annotation's image_id and category_id declared; iscrowd 0 / 1 (or
    null); area finite >= 0 (or absent); bbox finite, within the image (`coordinate_tolerance`); a present
    segmentation well-formed (`check_segmentation`). `geometry`: what every annotation must carry — None
    (load_coco: a missing or empty segmentation is dropped later, with a counted warning), "segmentation"
    (mask scores: present, polygons of >= 3 points) or "bbox" (box AP: 4 numbers)."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    _check_top_level(data, where)
    categories = _check_categories(data["categories"], where)
    images = _check_images(data["images"], where)
    annotations: dict[int, list[dict]] = {i: [] for i in images}
    seen: set[int] = set()
    for n, ann in enumerate(data["annotations"]):
        ann_id = _annotation_id(ann, n, seen, where)
        annotations[_check_annotation(ann, ann_id, images, categories, where, geometry)].append(ann)
    return CocoGroundTruth(images, categories, annotations)


def _check_result(r: Any, n: int, where: str, geometry: str) -> None:
    """The fields of result #n: keys present, integer ids, a finite score, a bbox (when given) of 4 finite
    numbers. Its references and segmentation are checked by `check_coco_results` afterwards."""
    if not isinstance(r, dict):
        raise DataError(f"{where}: result #{n} is a {type(r).__name__} ({_short(r)}), not a dict; COCO results "
                        f"are a json list of {{image_id, category_id, score, {geometry}}}")
    missing = [k for k in (*RESULT_KEYS, geometry) if k not in r]
    if missing:
        raise DataError(f"{where}: result #{n} lacks {', '.join(missing)}; COCO results are a json list of "
                        f"{{image_id, category_id, score, {geometry}}} (as written by evaluate.py / "
                        "detectron2's COCOEvaluator)")
    if not _is_int64(r["image_id"]):
        raise DataError(f"{where}: result #{n} has image_id {_short(r['image_id'])}; use the ground truth's "
                        "(integer) image ids")
    at = f"{where}: result #{n} (image id {r['image_id']})"
    if not _is_int64(r["category_id"]):
        raise DataError(f"{at} has category_id {_short(r['category_id'])}; use the ground truth's json "
                        "category ids")
    at = f"{where}: result #{n} (image id {r['image_id']}, category {r['category_id']})"
    if not is_finite_number(r["score"]):
        raise DataError(f"{at} has score {_short(r['score'])}; scores must be finite numbers — fix or drop "
                        "that detection where the results are written")
    box = r.get("bbox")
    if (box is not None or geometry == "bbox") and not (
            isinstance(box, list) and len(box) == 4 and all(is_finite_number(v) for v in box)):
        raise DataError(f"{at} has bbox {_short(box)}; a bbox is 4 finite numbers [x, y, width, height]"
                        f"{'' if geometry == 'bbox' else ' (or leave it out)'}")


def check_coco_results(results: Any, gt: CocoGroundTruth, where: str = "results", *,
                       geometry: str = "segmentation") -> dict[int, list[dict]]:
    """THE validator of a COCO results list against validated ground truth; DataError whose message starts
    with `where` (the file) and names the result's index, image id and the fix.

    Checks: a list of dicts with image_id, category_id, score and `geometry` ("segmentation": mask scores,
    "bbox": box AP); integer ids; finite scores; a bbox (when given, or `geometry` "bbox") of 4 finite
    numbers; every image id and category id declared by the ground truth; a segmentation well-formed for
    its image's size when given, and for "segmentation" present, not empty, polygons of >= 3 points.
    Returns the results of each ground-truth image (every image id has a list), in input order: the order
    that decides score ties, as in pycocotools."""
    if geometry not in GEOMETRIES[1:]:
        raise ValueError(f"geometry must be one of {GEOMETRIES[1:]}, got {geometry!r}")
    if not isinstance(results, list):
        raise DataError(f"{where}: the top level is a {type(results).__name__}, not a list; COCO results "
                        "are a json list of {image_id, category_id, score, segmentation} (as written by "
                        "evaluate.py / detectron2's COCOEvaluator)")
    for n, r in enumerate(results):
        _check_result(r, n, where, geometry)
    bad = sorted({r["image_id"] for r in results} - set(gt.images))
    if bad:
        raise DataError(f"{where}: results refer to image ids {bad[:20]} that are not in the ground truth; "
                        "score them against the annotation file the predictions were made for")
    cat_ids = list(gt.categories.json_ids)
    bad = sorted({r["category_id"] for r in results} - set(cat_ids))
    if bad:
        raise DataError(f"{where}: results use category ids {bad[:20]} that the ground truth does not declare "
                        f"({cat_ids[:20]}); map the model's contiguous labels back to the json category ids")
    for n, r in enumerate(results):  # box AP ignores a segmentation, but a present one must still be sound
        _check_geometry(r.get("segmentation"), *gt.size(int(r["image_id"])),
                        f"{where}: result #{n} (image id {r['image_id']})", geometry == "segmentation")
    by_image: dict[int, list[dict]] = {i: [] for i in gt.images}
    for r in results:
        by_image[int(r["image_id"])].append(r)
    return by_image


def _clean_segmentation(seg: Any, problems: _Problems, where: str) -> Any | None:
    """A validated (check_coco_gt) segmentation -> a usable one, or None (problem recorded): empty ones and
    polygons with < 3 points are dropped."""
    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        problems.add("annotations with an empty segmentation dropped", where,
                     "give each instance a polygon or an RLE mask")
        return None
    if isinstance(seg, dict):  # RLE
        return seg
    polygons = []
    for poly in polygon_list(seg):
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
              check_image_sizes: bool = True, check_pixels: bool = False
              ) -> tuple[list[ImageRecord], CategoryMap, dict[str, int]]:
    """Load and validate a COCO instances json.

    Args:
        json_path: the COCO file. image_dir: the folder `file_name`s are relative to.
        skip_empty: drop images without (valid) annotations (counted warning) instead of keeping them.
        check_image_sizes: open each image header to compare its size with the json (cheap: header only).
        check_pixels: also decode every image, so a truncated or corrupt pixel stream is reported now, naming
            the image id, rather than when the image is first used (preprocess.py: data set preparation).
    Returns:
        (records in json image order, category map, {problem kind: count of dropped items}).
    Raises:
        DataError naming the file, image id or annotation id and the fix, for: everything `check_coco_gt`
        refuses (a json that is not a COCO instances mapping, fields of the wrong type, duplicate or
        non-positive ids, unknown category or image ids, polygons or boxes with non-finite coordinates or
        outside the image (module docstring: tolerance), malformed RLE, a non-finite or negative area), and
        a file_name missing or escaping the image folder, a missing or unreadable image file, an image size
        that differs from the json.
    """

    json_path, image_dir = Path(json_path), Path(image_dir)
    data = _read_json(json_path)
    gt = check_coco_gt(data, str(json_path))  # the json itself; what follows checks the image files
    categories, problems = gt.categories, _Problems(json_path)

    records: dict[int, ImageRecord] = {}
    for image_id, image in gt.images.items():
        path = _image_path(image_dir, image, json_path, image_id)
        if not path.is_file():
            raise DataError(f"{json_path}: image id {image_id}: file {path} not found; put the image there "
                            "or fix file_name / the images folder setting")
        height, width = gt.size(image_id)
        if check_image_sizes:
            try:
                real = read_image_size(path)
            except DataError as e:
                raise DataError(f"{json_path}: image id {image_id}: {e}") from None
            if real != (height, width):
                raise DataError(f"{json_path}: image id {image_id} ({path.name}) is {real[0]}x{real[1]} "
                                f"(HxW) on disk but {height}x{width} in the json; fix the json's height/width")
        if check_pixels:
            try:
                read_image_array(path)
            except DataError as e:
                raise DataError(f"{json_path}: image id {image_id}: {e}") from None
        records[image_id] = ImageRecord(image_id, path, height, width)

    for ann in data["annotations"]:  # json order, validated by check_coco_gt: only dropping is left
        ann_id, record = int(ann["id"]), records[int(ann["image_id"])]
        where = f"annotation id {ann_id} (image {record.image_id})"
        seg = _clean_segmentation(ann.get("segmentation"), problems, where)
        if seg is None:
            continue
        rle = segmentation_to_rle(seg, record.height, record.width)
        pixels = float(mask_utils.area(rle))
        bbox = coco_box(ann.get("bbox"))
        if bbox is None:
            bbox = tuple(float(v) for v in mask_utils.toBbox(rle))
        if pixels == 0 or bbox[2] <= 0 or bbox[3] <= 0:
            problems.add("annotations with a degenerate box or no pixel dropped", where,
                         "such instances cover no pixel; remove them or fix the polygon/box")
            continue
        area = float(ann["area"]) if ann.get("area") is not None else pixels
        category_id = ann["category_id"]
        record.annotations.append(AnnotationRecord(
            ann_id, int(category_id), categories.to_label(category_id), seg, bbox, bool(ann.get("iscrowd")), area))

    out = []
    for record in records.values():
        if skip_empty and not any(not a.iscrowd for a in record.annotations):
            problems.add("images without annotations skipped", f"image id {record.image_id}",
                         "set data.skip_empty_images=false to keep them as background-only images")
            continue
        out.append(record)
    return out, categories, problems.warn()


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Any COCO segmentation -> one compressed RLE dict (polygons united; a flat polygon is one polygon)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(polygon_list(segmentation), height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation
