"""Deterministic synthetic biomedical instance-segmentation data sets, written as COCO.

Each image is one of three scene kinds, the three situations GAInS is about (crossing, touching,
overlapping -- "CTO"):

- ``cells``: cytology-like ellipses that overlap pairwise, each with a darker nucleus inside (category 2).
  As in ISBI2014 both overlapping cells' masks include the overlap region, and a cell's mask includes its
  nucleus.
- ``rods``: chromosome-like elongated rounded shapes (category 1, with a centromere constriction and
  banding) that cross each other in pairs.
- ``blobs``: round-ish nucleus-like blobs (category 1) packed in a cluster so that they touch; their masks are
  disjoint (a new blob is cut by its neighbours, like touching nuclei in DSB2018).

Scenes may also hold a few isolated instances, and the train and val splits each hold one image with no
instance at all, so downstream code meets that case. Non-empty images hold 3..10 instances.

Pixels are rendered from the very polygons written to the json (rasterised with pycocotools, the same
rasteriser that computes ``area``), with a bright-field absorbance model: intensities multiply by
``exp(-sum of absorbances)``, so overlaps are darker than either instance and nuclei darker than cytoplasm.

Everything is drawn from ``numpy.random.default_rng([seed, split, image])``, so the same seed gives
byte-identical files, and an image does not change when the number of images in its split does.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
import shapely
from shapely.geometry import Polygon
from shapely.ops import unary_union

from .atomic import atomic_folder

SYNTHETIC_CATEGORIES = [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}]
SCENE_KINDS = ("cells", "rods", "blobs")
SPLITS = ("train", "val", "test")
MIN_INSTANCES, MAX_INSTANCES = 3, 10
MIN_SIDE = 64  # below this the shapes (sized for 128 px) no longer fit
_MARGIN = 1.0  # every vertex stays >= 1 px inside the image, so rounding never leaves [0, W] x [0, H]
_CATEGORY = {"cell": 1, "nucleus": 2, "rod": 1, "blob": 1}


# ----------------------------------------------------------------------------------------------- shapes
def _wobbly_ellipse(rng: np.random.Generator, centre, radii, angle: float, n_vertices: int = 40,
                    wobble: float = 0.05) -> np.ndarray:
    """Ellipse with a smooth random radial perturbation (harmonics 2..4): float64 [n_vertices, 2] xy."""
    t = np.linspace(0.0, 2.0 * np.pi, n_vertices, endpoint=False)
    k = np.arange(2, 5)[:, None]
    amp = rng.uniform(0.0, wobble, size=(3, 1)) / (k - 1)  # higher harmonics weaker: no spikes
    r = 1.0 + (amp * np.cos(k * t + rng.uniform(0, 2 * np.pi, size=(3, 1)))).sum(0)
    local = np.stack([radii[0] * r * np.cos(t), radii[1] * r * np.sin(t)], axis=1)
    return np.round(_rigid(local, angle, centre), 2)  # the json's precision from the start


def _rigid(local: np.ndarray, angle: float, offset) -> np.ndarray:
    """Rotate xy points [P, 2] by ``angle`` (radians, counter-clockwise in x-right/y-down axes) and shift."""
    c, s = np.cos(angle), np.sin(angle)
    return local @ np.array([[c, s], [-s, c]]) + np.asarray(offset, dtype=np.float64)


def _rod_outline(length: float, half_width: float, bend: float, centromere: float,
                 n_side: int = 24, n_cap: int = 8) -> tuple[np.ndarray, Callable]:
    """Chromosome-like outline in a local frame: float64 [2*n_side + 2*n_cap, 2] xy, plus the centreline.

    The centreline is the parabola y = bend*L*(1 - (2s/L)^2), s in [-L/2, L/2] (bend = sagitta / length);
    the half-width narrows by 30% around ``s = centromere*L`` and the ends are semicircles.
    Returns (outline, centreline) where centreline(s) -> [.., 2] maps arc parameters to local points.
    """
    def centreline(s):
        s = np.asarray(s, dtype=np.float64)
        return np.stack([s, bend * length * (1.0 - (2.0 * s / length) ** 2)], axis=-1)

    s = np.linspace(-length / 2, length / 2, n_side)
    c = centreline(s)
    tangent = np.stack([np.ones_like(s), -8.0 * bend * s / length], axis=1)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    h = half_width * (1.0 - 0.3 * np.exp(-(((s - centromere * length) / (0.07 * length)) ** 2)))
    left, right = c + h[:, None] * normal, c - h[:, None] * normal
    theta = np.linspace(0.0, np.pi, n_cap + 2)[1:-1, None]
    # end cap turns from +normal through +tangent to -normal; start cap from -normal through -tangent
    end_cap = c[-1] + h[-1] * (np.cos(theta) * normal[-1] + np.sin(theta) * tangent[-1])
    start_cap = c[0] - h[0] * (np.cos(theta) * normal[0] + np.sin(theta) * tangent[0])
    return np.concatenate([left, end_cap, right[::-1], start_cap]), centreline


def _random_rod(rng: np.random.Generator, through, angle: float, scale: float) -> dict:
    """A rod whose centreline passes through the point ``through`` (xy), near its middle."""
    length = rng.uniform(38.0, 60.0) * scale
    outline, centreline = _rod_outline(length, rng.uniform(3.5, 5.0) * scale, rng.uniform(-0.12, 0.12),
                                       rng.uniform(-0.3, 0.3))
    anchor = centreline(rng.uniform(-0.25, 0.25) * length)
    # the anchor lands on `through`; the chord direction (s axis) is the rod's axis, used for banding
    return {"kind": "rod", "polygon": np.round(_rigid(outline - anchor, angle, through), 2),
            "axis": (np.asarray(through, dtype=np.float64), angle)}


def _inside(poly: np.ndarray, height: int, width: int) -> bool:
    return bool(poly.min() >= _MARGIN and poly[:, 0].max() <= width - _MARGIN
                and poly[:, 1].max() <= height - _MARGIN)


# ----------------------------------------------------------------------------------------------- scenes
# Each builder returns a list of instance dicts (kind, polygon [P, 2] xy, optional axis) or None when a
# random draw did not fit; the caller redraws, so the result is still a pure function of the rng.
def _cells_scene(rng, height, width, scale):
    cells: list[dict] = []
    for k in range(int(rng.integers(2, 5))):
        for _ in range(30):
            a = rng.uniform(15.0, 24.0) * scale
            b = a * rng.uniform(0.65, 0.95)
            if k == 0:
                centre = rng.uniform([0.35 * width, 0.35 * height], [0.65 * width, 0.65 * height])
            else:  # overlap a random earlier cell: centres closer than the sum of the radii
                j = int(rng.integers(k))
                partner = cells[j]
                d = (partner["r"] + (a + b) / 2) * rng.uniform(0.5, 0.8)
                phi = rng.uniform(0, 2 * np.pi)
                centre = partner["centre"] + d * np.array([np.cos(phi), np.sin(phi)])
            poly = _wobbly_ellipse(rng, centre, (a, b), rng.uniform(0, np.pi))
            shape = Polygon(poly)
            if not _inside(poly, height, width) or not shape.is_valid:
                continue
            # overlap the partner clearly, but never swallow another cell (ISBI cells stay distinguishable)
            inter = [shape.intersection(c["shape"]).area / min(shape.area, c["shape"].area) for c in cells]
            if k and (inter[j] < 0.08 or max(inter) > 0.45):
                continue
            cells.append({"kind": "cell", "polygon": poly, "shape": shape, "centre": centre,
                          "r": (a + b) / 2, "minor": b})
            break
        else:
            return None
    nuclei: list[dict] = []
    for cell in cells:
        for _ in range(20):
            rn = rng.uniform(0.22, 0.32) * cell["minor"]
            phi = rng.uniform(0, 2 * np.pi)
            centre = cell["centre"] + rng.uniform(0.0, 0.35) * cell["minor"] * np.array([np.cos(phi), np.sin(phi)])
            poly = _wobbly_ellipse(rng, centre, (rn, rn * rng.uniform(0.75, 1.0)), rng.uniform(0, np.pi),
                                   n_vertices=24, wobble=0.04)
            shape = Polygon(poly)
            # well inside its own cell (the cell mask must contain it) and apart from other nuclei
            if cell["shape"].buffer(-1.5 * scale).contains(shape) and all(
                    shape.distance(n["shape"]) > 1.0 for n in nuclei):
                nuclei.append({"kind": "nucleus", "polygon": poly, "shape": shape})
                break
        else:
            return None
    return cells + nuclei


def _rods_scene(rng, height, width, scale):
    rods: list[dict] = []
    for _ in range(int(rng.integers(1, 3))):
        for _ in range(30):
            p = rng.uniform([0.25 * width, 0.25 * height], [0.75 * width, 0.75 * height])
            alpha = rng.uniform(0, np.pi)
            pair = [_random_rod(rng, p, alpha, scale),
                    _random_rod(rng, p, alpha + rng.uniform(np.pi / 4, 3 * np.pi / 4), scale)]
            shapes = [Polygon(r["polygon"]) for r in pair]
            if not all(_inside(r["polygon"], height, width) for r in pair) or not all(s.is_valid for s in shapes):
                continue
            # a pair crosses only its partner: keep clear of earlier pairs
            if rods and unary_union([r["shape"] for r in rods]).distance(unary_union(shapes)) < 3.0 * scale:
                continue
            rods += [dict(r, shape=s) for r, s in zip(pair, shapes)]
            break
        else:
            return None
    return rods


def _blobs_scene(rng, height, width, scale):
    blobs: list[dict] = []
    for k in range(int(rng.integers(3, 8))):
        for _ in range(30):
            r = rng.uniform(6.5, 10.0) * scale
            if k == 0:
                centre = rng.uniform([0.3 * width, 0.3 * height], [0.7 * width, 0.7 * height])
            else:  # touch a random earlier blob: centres a little closer than the sum of the radii
                partner = blobs[int(rng.integers(k))]
                phi = rng.uniform(0, 2 * np.pi)
                d = partner["r"] + r - rng.uniform(0.5, 2.0) * scale
                centre = partner["centre"] + d * np.array([np.cos(phi), np.sin(phi)])
            poly = _wobbly_ellipse(rng, centre, (r, r * rng.uniform(0.75, 1.0)), rng.uniform(0, np.pi),
                                   n_vertices=32, wobble=0.06)
            raw = Polygon(poly)
            if not _inside(poly, height, width) or not raw.is_valid:
                continue
            if blobs:
                others = unary_union([b["shape"] for b in blobs])
                overlap = raw.intersection(others).area / raw.area
                if not raw.intersects(partner["shape"]) or overlap > 0.2:
                    continue
                # cut by the neighbours: touching masks share a border instead of overlapping
                # snapped to the 0.01 px grid of the json, so rounding cannot make it self-intersect
                cut = shapely.set_precision(raw.difference(others), 0.01)
                cut = max(getattr(cut, "geoms", [cut]), key=lambda g: g.area)
                if cut.geom_type != "Polygon" or cut.area < 0.8 * raw.area or len(cut.exterior.coords) < 13:
                    continue
                raw, poly = cut, np.asarray(cut.exterior.coords)[:-1]
            blobs.append({"kind": "blob", "polygon": poly, "shape": raw, "centre": centre, "r": r})
            break
        else:
            return None
    return blobs


def _add_isolated(rng, instances, height, width, scale, wanted):
    """Add up to ``wanted`` isolated instances (blob, rod, or cell + nucleus) at least 4 px from the rest."""
    for _ in range(wanted):
        kind = ("blob", "rod", "cell")[int(rng.integers(3))]
        if len(instances) + (2 if kind == "cell" else 1) > MAX_INSTANCES:
            continue
        taken = unary_union([i["shape"] for i in instances]) if instances else None
        for _ in range(30):
            centre = rng.uniform([0.1 * width, 0.1 * height], [0.9 * width, 0.9 * height])
            if kind == "blob":
                r = rng.uniform(6.5, 10.0) * scale
                new = [{"kind": "blob", "polygon": _wobbly_ellipse(rng, centre, (r, r * rng.uniform(0.75, 1.0)),
                                                                   rng.uniform(0, np.pi), 32, 0.06)}]
            elif kind == "rod":
                new = [_random_rod(rng, centre, rng.uniform(0, np.pi), scale)]
            else:
                a = rng.uniform(14.0, 20.0) * scale
                rn = rng.uniform(0.22, 0.3) * a * 0.8
                new = [{"kind": "cell", "polygon": _wobbly_ellipse(rng, centre, (a, 0.8 * a), rng.uniform(0, np.pi))},
                       {"kind": "nucleus", "polygon": _wobbly_ellipse(rng, centre, (rn, rn), 0.0, 24, 0.04)}]
            shapes = [Polygon(n["polygon"]) for n in new]
            if all(_inside(n["polygon"], height, width) for n in new) and all(s.is_valid for s in shapes) and (
                    taken is None or taken.distance(shapes[0]) >= 4.0 * scale):
                instances += [dict(n, shape=s) for n, s in zip(new, shapes)]
                break
    return instances


def _layout(rng, height, width, kind):
    """Instances (kind, polygon rounded to 2 decimals, optional axis) of one scene; [] for kind 'empty'."""
    if kind == "empty":
        return []
    scale = min(height, width) / 128.0
    builder = {"cells": _cells_scene, "rods": _rods_scene, "blobs": _blobs_scene}[kind]
    for _ in range(100):
        instances = builder(rng, height, width, scale)
        if instances is None:
            continue
        instances = _add_isolated(rng, instances, height, width, scale, int(rng.integers(0, 3)))
        instances = _add_isolated(rng, instances, height, width, scale, MIN_INSTANCES - len(instances))
        for inst in instances:
            inst["polygon"] = np.round(inst["polygon"], 2)  # what the json stores is what gets drawn
        if MIN_INSTANCES <= len(instances) <= MAX_INSTANCES and all(
                len(i["polygon"]) >= 12 and Polygon(i["polygon"]).is_valid for i in instances):
            return instances
    raise RuntimeError(f"could not lay out a {kind!r} scene in a {height}x{width} image")


# ---------------------------------------------------------------------------------------------- pixels
def _rle(polygon: np.ndarray, height: int, width: int) -> dict:
    """pycocotools RLE of one polygon [P, 2] xy (the rasterisation COCO evaluation uses)."""
    return mask_utils.merge(mask_utils.frPyObjects([polygon.ravel().tolist()], height, width))


def _smooth_noise(rng, shape, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit std: float64 [H, W]."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


def _render(rng, instances, height: int, width: int) -> np.ndarray:
    """Bright-field image of the instances: uint8 [H, W]. Absorbances add, so overlaps come out darker."""
    shape = (height, width)
    absorbance = np.zeros(shape)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    for inst in instances:
        mask = mask_utils.decode(_rle(inst["polygon"], height, width)).astype(bool)
        kind = inst["kind"]
        if kind == "cell":    # pale cytoplasm with coarse texture
            texture = rng.uniform(0.18, 0.35) * (1 + 0.25 * _smooth_noise(rng, shape, 3.0))
        elif kind == "nucleus":  # dense chromatin: much darker, fine grain
            texture = rng.uniform(0.6, 0.9) * (1 + 0.2 * _smooth_noise(rng, shape, 1.2))
        elif kind == "blob":  # a denser rim (nuclear envelope) keeps the border between touching blobs visible
            rim = np.exp(-ndimage.distance_transform_edt(mask) / 1.5)
            texture = rng.uniform(0.45, 0.8) * (1 + 0.25 * _smooth_noise(rng, shape, 1.5) + 0.5 * rim)
        else:  # rod: stain bands across the axis, like G-banded chromosomes
            (cx, cy), angle = inst["axis"]
            along = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
            bands = np.sin(2 * np.pi * along / (rng.uniform(5.0, 9.0) * min(shape) / 128) + rng.uniform(0, 2 * np.pi))
            texture = rng.uniform(0.55, 0.85) * (1 + 0.35 * bands + 0.1 * _smooth_noise(rng, shape, 1.5))
        absorbance[mask] += np.clip(texture[mask], 0.02, None)
    absorbance = ndimage.gaussian_filter(absorbance, 0.7)  # optics: edges are soft, not pixel-sharp
    background = rng.uniform(190.0, 225.0) * (1 + 0.04 * _smooth_noise(rng, shape, min(shape) / 6))
    image = background * np.exp(-absorbance) + rng.normal(0.0, rng.uniform(2.0, 5.0), shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def synthetic_scene(rng: np.random.Generator, image_size: tuple[int, int] = (128, 128), *,
                    kind: str | None = None) -> tuple[np.ndarray, list[dict]]:
    """Draw one synthetic image and its instances.

    Args:
        rng: numpy Generator; the result is a pure function of its state.
        image_size: (height, width) in pixels, each >= 64 (shapes are sized for 128 and scale with the
            shorter side).
        kind: "cells", "rods", "blobs" or "empty"; None draws one of the first three uniformly.

    Returns:
        image: uint8 [H, W] greyscale, bright background, darker instances.
        instances: list of dicts with ``category_id`` (int, see SYNTHETIC_CATEGORIES), ``polygon`` (float64
            [P, 2], P >= 12, xy in pixels, x right / y down, rounded to 2 decimals, every vertex inside
            [1, W-1] x [1, H-1]) and ``kind`` ("cell", "nucleus", "rod" or "blob"). 3..10 instances unless
            kind == "empty".
    """
    height, width = (int(v) for v in image_size)
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"image_size {image_size} too small: both sides must be >= {MIN_SIDE}")
    if kind is None:
        kind = SCENE_KINDS[int(rng.integers(len(SCENE_KINDS)))]
    if kind not in SCENE_KINDS + ("empty",):
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {SCENE_KINDS + ('empty',)}")
    instances = _layout(rng, height, width, kind)
    image = _render(rng, instances, height, width)
    return image, [{"category_id": _CATEGORY[i["kind"]], "polygon": i["polygon"], "kind": i["kind"]}
                   for i in instances]


# ------------------------------------------------------------------------------------------------- COCO
def _split_paths(root: Path) -> dict[str, Path]:
    paths = {}
    for split in SPLITS:
        paths[f"{split}_json"] = root / f"{split}.json"
        paths[f"{split}_images"] = root / split
    return paths


def _write_split(root: Path, split_index: int, split: str, num_images: int, image_size, seed: int) -> None:
    """Write ``root/<split>.json`` and ``root/<split>/*.png`` for one split."""
    height, width = image_size
    split_rng = np.random.default_rng([seed, split_index])
    kinds = [SCENE_KINDS[i % len(SCENE_KINDS)] for i in range(num_images)]
    kinds = [kinds[i] for i in split_rng.permutation(num_images)]
    if split != "test" and num_images >= 4:  # one empty image where training/validation code must cope
        kinds[int(split_rng.integers(num_images))] = "empty"
    (root / split).mkdir()
    images, annotations = [], []
    for index, kind in enumerate(kinds):
        image_id, file_name = index + 1, f"{index + 1:05d}.png"
        pixels, instances = synthetic_scene(np.random.default_rng([seed, split_index, index]), image_size,
                                            kind=kind)
        Image.fromarray(pixels, mode="L").save(root / split / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for inst in instances:
            poly = inst["polygon"]
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": inst["category_id"],
                "segmentation": [[round(float(v), 2) for v in poly.ravel()]],
                "area": float(mask_utils.area(_rle(poly, height, width))),
                # the polygon's own extent: float, tight to the vertices
                "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                "iscrowd": 0,
            })
    coco = {"info": {"description": f"gains synthetic {split} split", "seed": seed, "version": 1},
            "images": images, "annotations": annotations, "categories": SYNTHETIC_CATEGORIES}
    with open(root / f"{split}.json", "w") as f:
        json.dump(coco, f, separators=(",", ":"))


def make_synthetic_dataset(out_dir: str | os.PathLike, *, num_train: int = 64, num_val: int = 16,
                           num_test: int = 24, image_size: tuple[int, int] = (128, 128), seed: int = 0,
                           overwrite: bool = False) -> dict[str, Path]:
    """Write a synthetic COCO data set (cells with nuclei, crossing rods, touching blobs) to ``out_dir``.

    Layout: ``out_dir/{train,val,test}.json`` and ``out_dir/{train,val,test}/NNNNN.png`` (8-bit greyscale,
    ``image_size`` = (height, width)). Categories are SYNTHETIC_CATEGORIES; image and annotation ids start at
    1 and are unique within a split; segmentations are single polygons, ``area`` is pycocotools' rasterised
    area and ``bbox`` (xywh) the polygon's extent. Train and val each hold one image with no instance (when
    they have >= 4 images); test holds none.

    The set is built in a temporary folder beside ``out_dir`` and renamed into place, so an interrupted run
    never leaves a half data set. If ``out_dir`` already holds the three json files and ``overwrite`` is
    False it is returned untouched; ``overwrite=True`` replaces the folder. An existing non-empty folder
    without the three json files is refused unless ``overwrite`` is True.

    Returns:
        {"train_json", "train_images", "val_json", "val_images", "test_json", "test_images"} -> Path.
    """
    out_dir = Path(out_dir)
    paths = _split_paths(out_dir)
    complete = all(paths[f"{s}_json"].is_file() for s in SPLITS)
    if complete and not overwrite:
        return paths
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists but does not hold a complete synthetic data set "
                              f"(train/val/test.json); pass overwrite=True to replace it or choose another folder")
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if any(int(n) < 0 for n in counts.values()) or int(seed) < 0:
        raise ValueError(f"image counts and seed must be >= 0, got {counts} and seed={seed}")
    image_size = tuple(int(v) for v in image_size)
    if len(image_size) != 2 or min(image_size) < MIN_SIDE:
        raise ValueError(f"image_size must be (height, width) with both >= {MIN_SIDE}, got {image_size}")

    def fill(tmp: Path) -> None:
        for split_index, split in enumerate(SPLITS):
            _write_split(tmp, split_index, split, int(counts[split]), image_size, int(seed))

    # another process (e.g. a second rank) may finish first: its set is identical for this seed
    atomic_folder(out_dir, fill, already_done=lambda: all(paths[f"{s}_json"].is_file() for s in SPLITS))
    return paths
