"""Large synthetic fluorescence fields crowded with touching and overlapping nuclei, fast and deterministic.

`gains.synthetic` draws small 128 px scenes with a handful of instances. Large-image training, tiled
prediction and the sparse mask code (`CropMasks`) need something else: a whole field of view, e.g.
4096 x 4096 px with 2,000 nuclei, where most nuclei touch a neighbour and some overlap one, generated in a
few seconds and in O(H*W + sum of instance areas) memory. No [N, H, W] array and no per-instance full-size
array is ever built.

What a field holds:

- Nuclei are wobbly ellipses (32-vertex polygons, xy in pixels, 2 decimals like the COCO json stores them),
  of mean radius drawn from ``radius`` and aspect ratio 0.7..1.
- They are grown in clusters of ``cluster_size`` members: each new nucleus is placed against a random
  earlier member of its cluster (its ``partner``), either TOUCHING it (the two outlines are separated by a
  line, 0.2..0.8 px apart -- up to 1.6 px where pixel quantisation would otherwise join the masks -- so the
  centre distance is about the sum of the radii and the pixel masks are disjoint but adjacent) or
  OVERLAPPING it (it reaches 35..80% of the smaller radius into the partner, so the masks share pixels).
  About ``overlap_fraction`` of all nuclei are in an overlapping pair; every other pair of masks is
  disjoint, which is what touching nuclei look like in DSB2018-style ground truth. Only COCO can represent
  the overlaps; a label image cannot (see `field_label_image`).
- Masks are the project evaluator's rasterisation of those very polygons (pycocotools, as in
  `gains.annotations.segmentation_to_mask`), computed on each instance's box only: the polygon is shifted by an
  integer offset into a small canvas. That shift is exact only because vertex coordinates whose scaled value
  ``5 * x`` ends in .5 are nudged by 0.01 px (see `field_layout.snap`); without the nudge about one polygon in five
  rasterises differently once shifted.
- The image is fluorescence-like: dark, unevenly lit background, bright textured nuclei whose rim is dimmer
  (so touching borders stay visible), intensities adding up where nuclei overlap, a Gaussian PSF blur, then
  shot noise (Gaussian approximation of Poisson) plus read noise, as uint8 or uint16.

Everything comes from ``numpy.random.default_rng([*seed, stream])`` (stream 0: layout, 1: pixels), so the
same arguments give byte-identical fields and the layout does not depend on the pixel model or dtype.
`write_field_dataset` writes such fields as a COCO data set, atomically like `gains.synthetic`.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from .atomic import atomic_folder
from .field_layout import ASPECT, MARGIN, WOBBLE, place_nuclei, shared_pixels
from .instances import CropMasks

FIELD_CATEGORIES = [{"id": 1, "name": "nucleus"}]
DTYPES = ("uint8", "uint16")
IMAGE_FORMATS = ("tif", "png")
FORMAT_VERSION = 1

_MAX_COVERAGE = 0.5          # nuclei area / field area above which placement is refused up front


@dataclass
class Field:
    """One synthetic field of view.

    image: uint8 or uint16 [H, W], bright nuclei on a dark background.
    polygons: N float64 [32, 2] xy outlines (pixels, x right / y down, 2 decimals, inside [1, W-1] x [1, H-1]).
    masks: CropMasks of the N instances, tight boxes; mask i is pycocotools' rasterisation of polygons[i].
    partner: int64 [N], the nucleus each one was placed against (-1 for the first of a cluster).
    cluster: int64 [N], cluster index of each nucleus.
    overlap_pairs: int64 [P, 2], the pairs (i < j) whose masks share pixels; all other masks are disjoint.
    category_id: every instance is a nucleus (FIELD_CATEGORIES).
    """

    image: np.ndarray
    polygons: list
    masks: CropMasks
    partner: np.ndarray
    cluster: np.ndarray
    overlap_pairs: np.ndarray
    category_id: int = 1

    def __len__(self) -> int:
        return len(self.polygons)


# ---------------------------------------------------------------------------------------------- pixels
def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit std: float32 of `shape`."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="reflect")
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _illumination(rng: np.random.Generator, length: int) -> np.ndarray:
    """Slow 1-D intensity profile around 1 (+-10%): float32 [length]; two of them make uneven lighting."""
    t = np.linspace(0.0, 1.0, length, dtype=np.float32)
    return 1.0 + 0.1 * np.sin(2 * np.pi * (rng.uniform(0.3, 1.0) * t + rng.uniform(0, 1))).astype(np.float32)


def _render(rng: np.random.Generator, masks: CropMasks, dtype: str) -> np.ndarray:
    """Fluorescence image of the masks: `dtype` [H, W]. Signal in relative units: background ~0.04,
    a nucleus 0.25..0.45 (overlaps add up), then photons = 200 per unit for the shot noise."""
    height, width = masks.image_size
    signal = rng.uniform(0.03, 0.05) * _illumination(rng, height)[:, None] * _illumination(rng, width)[None, :]
    for (x0, y0, x1, y1), crop in zip(masks.boxes.tolist(), masks.crops):
        texture = 1.0 + 0.22 * _smooth_noise(rng, crop.shape, 1.3)
        # dimmer rim: the dark seam between touching nuclei that lets a human (and a model) split them
        depth = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
        rim = 0.55 + 0.45 * (1.0 - np.exp(-depth / 2.0))
        region = signal[y0:y1, x0:x1]
        region[crop] += (rng.uniform(0.25, 0.45) * texture * rim)[crop]
    photons = ndimage.gaussian_filter(signal, 1.0, truncate=3.0)  # microscope PSF
    del signal
    photons *= np.float32(200.0)
    read_noise = np.float32(rng.uniform(1.5, 3.0))
    # Poisson shot noise by its Gaussian approximation (a Poisson draw costs 6x more at 16 Mpx) + read
    # noise; in place, so that at most three float32 [H, W] arrays are alive at a time
    noise = rng.standard_normal((height, width), dtype=np.float32)
    spread = photons + read_noise ** 2
    np.sqrt(spread, out=spread)
    noise *= spread
    del spread
    photons += noise
    del noise
    baseline, gain, top = {"uint8": (2.0, 1.65, 255), "uint16": (100.0, 40.0, 65535)}[dtype]
    photons *= np.float32(gain)
    photons += np.float32(baseline)
    np.rint(photons, out=photons)
    np.clip(photons, 0, top, out=photons)
    return photons.astype(dtype)


# ------------------------------------------------------------------------------------------- arguments
def _check_args(height, width, num_instances, radius, overlap_fraction, cluster_size, dtype):
    """Validate and normalise make_field's arguments; raises ValueError naming the offending values."""
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise ValueError(f"height and width must be positive integers, got {height}x{width}")
    if int(num_instances) != num_instances or num_instances < 0:
        raise ValueError(f"num_instances must be an integer >= 0, got {num_instances}")
    radius = tuple(float(r) for r in radius)
    if len(radius) != 2 or not 2.0 <= radius[0] <= radius[1]:
        raise ValueError(f"radius must be (min, max) with 2 <= min <= max (px), got {radius}")
    if not 0.0 <= float(overlap_fraction) <= 1.0:
        raise ValueError(f"overlap_fraction must be in [0, 1], got {overlap_fraction}")
    cluster_size = tuple(int(c) for c in cluster_size)
    if len(cluster_size) != 2 or not 1 <= cluster_size[0] <= cluster_size[1]:
        raise ValueError(f"cluster_size must be (min, max) with 1 <= min <= max, got {cluster_size}")
    if np.dtype(dtype).name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    # the largest nucleus: semi-major axis r / sqrt(min aspect), times the wobble's largest swing
    extent = 2.0 * radius[1] / math.sqrt(ASPECT[0]) * (1.0 + WOBBLE * (1 + 1 / 2 + 1 / 3)) + 2 * MARGIN + 2
    if num_instances and min(height, width) < extent:
        raise ValueError(f"a {height}x{width} field is too small for nuclei of radius up to {radius[1]:g} px: "
                         f"both sides must be >= {math.ceil(extent)}")
    mean_area = np.pi * (radius[0] ** 2 + radius[0] * radius[1] + radius[1] ** 2) / 3.0  # E[pi r^2]
    coverage = num_instances * mean_area / ((height - 2 * MARGIN) * (width - 2 * MARGIN))
    if coverage > _MAX_COVERAGE:
        raise ValueError(f"{num_instances} nuclei of radius {radius[0]:g}..{radius[1]:g} px (about "
                         f"{mean_area:.0f} px^2 each) would cover {coverage:.0%} of the {height}x{width} field; "
                         f"at most {_MAX_COVERAGE:.0%} can be packed: use a larger field or fewer or smaller "
                         f"nuclei")
    return int(height), int(width), int(num_instances), radius, float(overlap_fraction), cluster_size, \
        np.dtype(dtype).name


def _entropy(seed) -> list[int]:
    """seed (int or sequence of ints, all >= 0) -> list of ints for default_rng."""
    values = [seed] if np.isscalar(seed) else list(seed)
    if not values or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in values):
        raise ValueError(f"seed must be an integer >= 0 or a non-empty sequence of them, got {seed!r}")
    return [int(v) for v in values]


# ------------------------------------------------------------------------------------------------ API
def make_field(height: int, width: int, num_instances: int, *, seed: int | Sequence[int] = 0,
               radius: tuple[float, float] = (7.0, 14.0), overlap_fraction: float = 0.1,
               cluster_size: tuple[int, int] = (3, 12), dtype: str = "uint8") -> Field:
    """Draw one field of view of `num_instances` clustered nuclei (see the module docstring).

    Args:
        height, width: field size in pixels.
        num_instances: exact number of nuclei (>= 0).
        seed: int or sequence of ints; the field is a pure function of (seed, the other arguments).
        radius: (min, max) mean nucleus radius in px, drawn uniformly per nucleus.
        overlap_fraction: wanted fraction of nuclei whose mask overlaps a neighbour's (pairs; the rest only
            touch). Reached to within a few nuclei when clusters leave room; ``len(field.overlap_pairs) * 2 /
            N`` is the exact value.
        cluster_size: (min, max) nuclei per cluster, drawn uniformly per cluster; a crowded cluster may close
            early, the next cluster takes over.
        dtype: "uint8" or "uint16" image.
    Returns:
        A Field: image dtype [height, width]; N polygons float64 [32, 2]; CropMasks; partner/cluster int64
        [N]; overlap_pairs int64 [P, 2].
    Raises:
        ValueError for bad arguments, and when the nuclei cannot fit the field (the message names the sizes).
    """
    height, width, num_instances, radius, overlap_fraction, cluster_size, dtype = _check_args(
        height, width, num_instances, radius, overlap_fraction, cluster_size, dtype)
    entropy = _entropy(seed)
    layout, partner, cluster, pairs = place_nuclei(np.random.default_rng([*entropy, 0]), height, width,
                                              num_instances, radius, overlap_fraction, cluster_size)
    masks = CropMasks.from_crops(np.array(layout.boxes, dtype=np.int64).reshape(-1, 4), layout.crops,
                                 (height, width), tighten=True)
    image = _render(np.random.default_rng([*entropy, 1]), masks, dtype)
    overlap_pairs = np.sort(np.array(pairs, dtype=np.int64).reshape(-1, 2), axis=1)
    return Field(image=image, polygons=layout.polygons, masks=masks, partner=partner, cluster=cluster,
                 overlap_pairs=overlap_pairs[np.lexsort(overlap_pairs.T[::-1])])


def field_label_image(field: Field) -> np.ndarray:
    """Ground-truth instance label image of a field: uint16 [H, W] (uint32 from 65,535 nuclei on).

    Pixel = 1 + instance index, 0 = background. Where two nuclei overlap the LATER instance (higher index)
    wins the shared pixels, so the earlier one of an overlapping pair loses part of its mask here: a label
    image cannot hold overlaps, use `field.masks` or the COCO json for the full masks.
    """
    return field.masks.label_image(scores=np.arange(len(field.masks), dtype=np.float64))


def neighbour_pairs(masks: CropMasks, pad: int = 0) -> np.ndarray:
    """int64 [P, 2] pairs (i < j) of masks whose boxes, grown by `pad` px, meet.

    A cKDTree over the box centres finds the candidates, so this is O(N log N), never an N x N matrix.
    """
    from scipy.spatial import cKDTree

    boxes = masks.boxes.astype(np.float64)
    if len(boxes) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    half = (boxes[:, 2:] - boxes[:, :2]) / 2.0 + pad
    # boxes meet only if their centres are closer than the two half-diagonals together
    pairs = cKDTree(centres).query_pairs(2.0 * float(np.linalg.norm(half, axis=1).max()), output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    meet = (np.abs(centres[i] - centres[j]) < half[i] + half[j]).all(1)
    pairs = np.sort(pairs[meet].astype(np.int64), axis=1)
    return pairs[np.lexsort(pairs.T[::-1])]


def contact_stats(field: Field, max_gap: int = 1) -> dict[str, float]:
    """How crowded a field is, measured on its masks (not on the layout's intentions).

    touching: fraction of nuclei whose mask comes within `max_gap` px (chessboard distance: the mask
    dilated by a (2*max_gap+1)^2 square meets it) of another nucleus's mask without sharing a pixel with
    it; overlapping: fraction sharing pixels with another; in_contact: either.
    """
    if int(max_gap) != max_gap or max_gap < 1:  # binary_dilation reads iterations < 1 as "until stable"
        raise ValueError(f"max_gap must be an integer >= 1, got {max_gap}")
    masks = field.masks
    n = len(masks)
    touching, overlapping = np.zeros(n, bool), np.zeros(n, bool)  # a nucleus may be both
    for i, j in neighbour_pairs(masks, max_gap).tolist():
        box_i, box_j = masks.boxes[i].tolist(), masks.boxes[j].tolist()
        if shared_pixels(box_i, masks.crops[i], box_j, masks.crops[j]):
            overlapping[[i, j]] = True
            continue
        x0, y0, x1, y1 = box_i
        grown = ndimage.binary_dilation(np.pad(masks.crops[i], max_gap), np.ones((3, 3), bool),
                                        iterations=int(max_gap))
        # the grown crop's box may stick out of the image; shared_pixels only reads where both boxes are
        if shared_pixels((x0 - max_gap, y0 - max_gap, x1 + max_gap, y1 + max_gap), grown, box_j, masks.crops[j]):
            touching[[i, j]] = True
    if n == 0:
        return {"touching": 0.0, "overlapping": 0.0, "in_contact": 0.0}
    return {"touching": float(touching.mean()), "overlapping": float(overlapping.mean()),
            "in_contact": float((touching | overlapping).mean())}


# ------------------------------------------------------------------------------------------------- COCO
def _save_image(path: Path, image: np.ndarray, image_format: str) -> None:
    if image_format == "tif":
        import tifffile
        # no metadata: the file is then a pure function of the pixels (no shape json, no timestamp)
        tifffile.imwrite(path, image, photometric="minisblack", metadata=None)
    else:
        from PIL import Image
        Image.fromarray(image).save(path, format="PNG")


def _annotations(field: Field, image_id: int, first_id: int) -> list[dict]:
    """COCO annotations of a field: polygon segmentation, pycocotools area, polygon-extent bbox (xywh)."""
    height, width = field.masks.image_size
    out = []
    areas = field.masks.areas()
    for i, polygon in enumerate(field.polygons):
        flat = [round(float(v), 2) for v in polygon.ravel()]
        # the full-size RLE is cheap (its runs, not its pixels); its area doubles as a check of the crop
        area = float(mask_utils.area(mask_utils.frPyObjects([flat], height, width))[0])
        if area != areas[i]:
            raise RuntimeError(f"mask {i}: crop area {areas[i]} != pycocotools area {area}; "
                               "the bbox-canvas rasterisation diverged from the full-size one")
        x0, y0 = polygon.min(0)
        x1, y1 = polygon.max(0)
        out.append({"id": first_id + i, "image_id": image_id, "category_id": field.category_id,
                    "segmentation": [flat], "area": area,
                    "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)], "iscrowd": 0})
    return out


def _write_split(root: Path, split: str, count: int, seed: int, image_format: str, field_args: dict) -> None:
    """Write root/<split>.json and root/<split>/field_XXXX.<ext>. A field's seed is (seed, crc32(split),
    index), so it does not change when other splits or the split's size change."""
    (root / split).mkdir()
    split_key = zlib.crc32(split.encode())
    images, annotations = [], []
    for index in range(count):
        field = make_field(seed=(seed, split_key, index), **field_args)
        file_name = f"field_{index:04d}.{image_format}"
        _save_image(root / split / file_name, field.image, image_format)
        images.append({"id": index + 1, "file_name": file_name, "height": field_args["height"],
                       "width": field_args["width"]})
        annotations += _annotations(field, index + 1, len(annotations) + 1)
    coco = {"info": {"description": f"gains synthetic field {split} split", "version": FORMAT_VERSION,
                     "seed": seed, **{k: list(v) if isinstance(v, tuple) else v for k, v in field_args.items()}},
            "images": images, "annotations": annotations, "categories": FIELD_CATEGORIES}
    with open(root / f"{split}.json", "w") as f:
        json.dump(coco, f, separators=(",", ":"))


def write_field_dataset(root: str | os.PathLike, *,
                        splits: Mapping[str, int] = MappingProxyType({"train": 2, "val": 1, "test": 1}),
                        height: int = 1024, width: int = 1024, num_instances: int = 200, seed: int = 0,
                        image_format: str = "tif", dtype: str = "uint16", radius: tuple[float, float] = (7.0, 14.0),
                        overlap_fraction: float = 0.1, cluster_size: tuple[int, int] = (3, 12),
                        overwrite: bool = False) -> dict[str, Path]:
    """Write fields as a COCO instances data set: ``root/{split}.json`` + ``root/{split}/field_XXXX.{tif,png}``.

    Each split holds `splits[split]` fields of `num_instances` nuclei (category 1 "nucleus"); image and
    annotation ids start at 1 within a split; segmentations are single polygons, ``area`` is pycocotools'
    area and ``bbox`` the polygon's extent. The json's ``info`` records the generation arguments.

    Built in a temporary folder beside `root` and renamed into place, so an interrupted run never leaves a
    half data set. An existing `root` holding the same splits generated with the same arguments is returned
    untouched; any other existing non-empty `root` is refused unless `overwrite` is True.

    Returns:
        {"<split>_json": Path, "<split>_images": Path} for every split.
    """
    root = Path(root)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    splits = {str(s): n for s, n in splits.items()}
    if not splits or any(int(n) != n or n < 0 for n in splits.values()) or any(
            not s or os.sep in s or s.startswith(".") for s in splits):
        raise ValueError(f"splits must map plain split names to image counts >= 0, got {splits}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    field_args = dict(height=height, width=width, num_instances=num_instances, radius=tuple(radius),
                      overlap_fraction=overlap_fraction, cluster_size=tuple(cluster_size), dtype=dtype)
    _check_args(**field_args)  # fail before writing anything
    paths = {key: value for s in splits
             for key, value in ((f"{s}_json", root / f"{s}.json"), (f"{s}_images", root / s))}
    if _matches(root, splits, seed, image_format, field_args) and not overwrite:
        return paths
    if root.exists() and not overwrite and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists but does not hold this field data set (same splits and "
                              f"arguments); pass overwrite=True to replace it or choose another folder")
    def fill(tmp: Path) -> None:
        for split, count in splits.items():
            _write_split(tmp, split, int(count), int(seed), image_format, field_args)

    # another process may finish first: its set is identical for these arguments
    atomic_folder(root, fill, already_done=lambda: _matches(root, splits, seed, image_format, field_args))
    return paths


def _matches(root: Path, splits: dict, seed: int, image_format: str, field_args: dict) -> bool:
    """Whether root already holds these splits, generated with these arguments."""
    expected = {"version": FORMAT_VERSION, "seed": int(seed),
                **{k: list(v) if isinstance(v, tuple) else v for k, v in field_args.items()}}
    for split, count in splits.items():
        try:
            with open(root / f"{split}.json") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False
        info = data.get("info", {})
        if any(info.get(k) != v for k, v in expected.items()) or len(data.get("images", [])) != count or any(
                not im["file_name"].endswith(f".{image_format}") for im in data["images"]):
            return False
    return True
