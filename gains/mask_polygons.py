"""Binary masks <-> polygons, pixel-exact: trace a mask's rings, fill rings by pixel centres, and one mask
crop -> one COCO annotation. The shared core of every annotation converter (label images, ImageJ ROIs,
GeoJSON, instance stacks).

Coordinates follow COCO (and ImageJ, QuPath): x right, y down, pixel (row r, col c) is the square
[c, c+1] x [r, r+1], its centre (c + 0.5, r + 0.5). The fill rule is the one ImageJ's polygon filler and
Java2D (QuPath) use: a pixel belongs to a shape when its centre is inside; rings combine even-odd (a ring
inside another cuts a hole). A centre exactly on the boundary is inside when the space just right of it
(x increasing) is inside, or, on a horizontal edge, the space just below: Java2D's definition. Ties are the
only place where another tool's rasterisation can differ from `fill_rings` (ImageJ's polygon filler for
vertices off the pixel grid, say); they need a centre exactly on an edge, which integer-vertex ROIs with
axis-parallel edges (ImageJ's traced and rectangle ROIs) and traced rings (`trace_rings`) never have, so
tracing then filling gives back exactly the traced pixels.
"""
from __future__ import annotations

from collections import Counter

import contourpy
import numpy as np
from matplotlib.path import Path as MplPath
from pycocotools import mask as mask_utils

from .instances import CropMasks


# ------------------------------------------------------------------------------------------ mask -> rings
def trace_rings(crop: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Boundary of a bool crop [h, w] -> (outer rings, hole rings), each float64 [P, 2] (x, y) in crop
    coordinates, open (the last vertex is not repeated), collinear vertices dropped.

    Marching squares at level 0.5 on the pixel centres: every vertex lies half-way between a foreground and
    a background centre, on a pixel edge, so a ring separates the pixels exactly and filling it by centres
    gives them back. Corners are cut by half a pixel: the polygon's area is the pixel count minus 1/2 per
    outer ring plus 1/2 per hole. Outer rings have a positive shoelace area (x right, y down), holes a
    negative one. Rings never touch each other or themselves (a diagonal-only contact becomes two rings or
    a waist), so every ring is a valid simple polygon ring for GeoJSON / shapely.
    """
    z = np.pad(crop.astype(np.float64), 1)
    gen = contourpy.contour_generator(np.arange(z.shape[1]) - 0.5, np.arange(z.shape[0]) - 0.5, z,
                                      line_type=contourpy.LineType.Separate)
    outers, holes = [], []
    for line in gen.lines(0.5):
        ring, nxt = line[:-1], np.roll(line[:-1], -1, 0)  # closed lines repeat their first point
        d_in, d_out = ring - np.roll(ring, 1, 0), nxt - ring
        cross = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
        ring = ring[(cross != 0) | ((d_in * d_out).sum(1) < 0)]
        area2 = np.sum(ring[:, 0] * np.roll(ring[:, 1], -1) - np.roll(ring[:, 0], -1) * ring[:, 1])
        (outers if area2 > 0 else holes).append(ring)
    return outers, holes


def nest_rings(outers: list[np.ndarray], holes: list[np.ndarray]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Group the rings of `trace_rings` into polygons: [(outer ring, [its holes])], in the order of `outers`.

    A hole belongs to the smallest outer ring containing it (an island inside a hole is its own polygon;
    the holes of that island belong to the island). Containment is tested on one vertex of the hole, which
    is never on another ring."""
    areas = [abs(_shoelace(r)) for r in outers]
    paths = [MplPath(r) for r in outers]
    groups: list[list[np.ndarray]] = [[] for _ in outers]
    for hole in holes:
        inside = [i for i, p in enumerate(paths) if p.contains_point(hole[0])]
        if inside:  # always, for rings traced from one mask
            groups[min(inside, key=lambda i: areas[i])].append(hole)
    return list(zip(outers, groups))


def _shoelace(ring: np.ndarray) -> float:
    return 0.5 * float(np.sum(ring[:, 0] * np.roll(ring[:, 1], -1) - np.roll(ring[:, 0], -1) * ring[:, 1]))


# ------------------------------------------------------------------------------------------ rings -> mask
def fill_rings(rings, height: int, width: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Rasterise closed rings (float [P, 2] (x, y) image coordinates each; even-odd) by pixel centres.

    Returns ((x0, y0, x1, y1) int box, exclusive x1 / y1, clipped to the height x width image; bool crop
    [y1 - y0, x1 - x0]). Parts outside the image are cut off; a shape covering no pixel centre gives an
    empty crop on the box (0, 0, 0, 0). A scan line per pixel row: the crossings of the edges with the row
    of centres toggle the inside state from the first column whose centre is at or right of the crossing.
    Memory O(box area + crossings).
    """
    rings = [np.asarray(r, np.float64).reshape(-1, 2) for r in rings]
    rings = [r for r in rings if len(r) >= 3]
    if not rings or not all(np.isfinite(r).all() for r in rings):
        return (0, 0, 0, 0), np.zeros((0, 0), bool)
    pts = np.concatenate(rings)
    # rows / columns whose centres fall inside the rings' bounds, clipped to the image
    r0, r1 = max(0, int(np.ceil(pts[:, 1].min() - 0.5))), min(height, int(np.floor(pts[:, 1].max() - 0.5)) + 1)
    c0, c1 = max(0, int(np.ceil(pts[:, 0].min() - 0.5))), min(width, int(np.floor(pts[:, 0].max() - 0.5)) + 1)
    if r1 <= r0 or c1 <= c0:
        return (0, 0, 0, 0), np.zeros((0, 0), bool)
    a = np.concatenate(rings)
    b = np.concatenate([np.roll(r, -1, 0) for r in rings])
    keep = a[:, 1] != b[:, 1]  # horizontal edges never cross a row of centres
    a, b = a[keep], b[keep]
    y_lo, y_hi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    # rows r with y_lo <= r + 0.5 < y_hi (half-open: a vertex on a row is counted once)
    first = np.clip(np.ceil(y_lo - 0.5).astype(np.int64), r0, r1)
    stop = np.clip(np.ceil(y_hi - 0.5).astype(np.int64), r0, r1)
    n = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(len(a)), n)
    rows = np.repeat(first, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    ya, yb, xa, xb = a[edge, 1], b[edge, 1], a[edge, 0], b[edge, 0]
    x = xa + (rows + 0.5 - ya) * (xb - xa) / (yb - ya)
    col = np.clip(np.ceil(x - 0.5).astype(np.int64), c0, c1) - c0  # first centre at or right of the crossing
    nc = c1 - c0 + 1
    toggles = np.bincount((rows - r0) * nc + col, minlength=(r1 - r0) * nc).reshape(r1 - r0, nc)
    crop = (np.cumsum(toggles, axis=1)[:, :-1] % 2).astype(bool)
    return (c0, r0, c1, r1), crop


def fill_ellipse(x0: float, y0: float, x1: float, y1: float, height: int, width: int
                 ) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The ellipse inscribed in the box [x0, x1] x [y0, y1] -> (box, bool crop) as fill_rings: the pixels
    whose centre satisfies ((x - cx) / rx)^2 + ((y - cy) / ry)^2 < 1 (ImageJ's oval ROIs)."""
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if not (rx > 0 and ry > 0):
        return (0, 0, 0, 0), np.zeros((0, 0), bool)
    r0, r1 = max(0, int(np.floor(y0))), min(height, int(np.ceil(y1)))
    c0, c1 = max(0, int(np.floor(x0))), min(width, int(np.ceil(x1)))
    if r1 <= r0 or c1 <= c0:
        return (0, 0, 0, 0), np.zeros((0, 0), bool)
    yy = (np.arange(r0, r1) + 0.5 - cy)[:, None] / ry
    xx = (np.arange(c0, c1) + 0.5 - cx)[None, :] / rx
    return (c0, r0, c1, r1), xx * xx + yy * yy < 1


# ------------------------------------------------------------------------------------ mask -> COCO annotation
def crop_annotation(crop: np.ndarray, x0: int, y0: int, height: int, width: int, *, ann_id: int, image_id: int,
                    category_id: int, segmentation: str = "polygon", holes: str = "rle",
                    min_polygon_pixels: int = 3, min_iou: float = 0.95, stats: Counter | None = None
                    ) -> dict | None:
    """One mask, given as bool crop [h, w] at (x0, y0) of a height x width image -> one COCO annotation
    (``bbox`` [x, y, w, h] of its pixels, ``area`` the pixel count, ``iscrowd`` 0), or None when the crop is
    empty. Other masks may overlap it: each annotation is independent.

    segmentation "polygon": one pixel-exact ring per part (trace_rings, half-integer coordinates), all parts
    in one annotation; "rle": compressed RLE (str counts). COCO polygons are united and cannot cut holes:
    holes="rle" stores masks with holes as RLE (exact), "fill" keeps the outer rings (holes filled). Masks
    under ``min_polygon_pixels`` stay RLE, and so do polygons whose pycocotools rasterisation has IoU <
    ``min_iou`` with the pixels (a safety net). ``stats`` gets "instances", "multi_part", "rle_tiny",
    "rle_holes", "rle_fallback" added.
    """
    if segmentation not in ("polygon", "rle") or holes not in ("rle", "fill"):
        raise ValueError(f"segmentation must be 'polygon' or 'rle' and holes 'rle' or 'fill', "
                         f"got {segmentation!r}, {holes!r}")
    crop = np.asarray(crop, bool)
    rows, cols = np.flatnonzero(crop.any(1)), np.flatnonzero(crop.any(0))
    if rows.size == 0:
        return None
    crop = crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    x0, y0 = int(x0) + int(cols[0]), int(y0) + int(rows[0])
    stats = stats if stats is not None else Counter()
    pixels, seg = int(crop.sum()), None
    kind = "rle_tiny" if pixels < min_polygon_pixels else None
    if segmentation == "polygon" and kind is None:
        rings, hole_rings = trace_rings(crop)
        back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
            [r.ravel().tolist() for r in rings], *crop.shape))) > 0
        if hole_rings and holes == "rle":
            kind = "rle_holes"
        elif np.logical_and(back, crop).sum() / np.logical_or(back, crop).sum() < min_iou:
            kind = "rle_fallback"
        else:
            seg = [(r + (x0, y0)).ravel().tolist() for r in rings]
            stats["multi_part"] += len(rings) > 1
    if seg is None:
        h, w = crop.shape
        rle = CropMasks(np.array([[x0, y0, x0 + w, y0 + h]]), [crop], (height, width)).to_rles()[0]
        seg = {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}
        stats[kind] += kind is not None and segmentation == "polygon"
    stats["instances"] += 1
    return {"id": int(ann_id), "image_id": int(image_id), "category_id": int(category_id), "segmentation": seg,
            "area": float(pixels), "bbox": [float(x0), float(y0), float(crop.shape[1]), float(crop.shape[0])],
            "iscrowd": 0}


def masks_to_annotations(masks: CropMasks, category_ids, *, image_id: int, first_id: int = 1,
                         stats: Counter | None = None, **options) -> tuple[list[dict], list[int]]:
    """N masks of one image (overlaps kept) + category ids int [N] -> (COCO annotations with ids first_id,
    first_id + 1, ... in mask order, indices of the empty masks that got none). ``options`` as
    crop_annotation (segmentation, holes, min_polygon_pixels, min_iou)."""
    height, width = masks.image_size
    annotations, empty = [], []
    for i, (crop, (x0, y0, _, _)) in enumerate(zip(masks.crops, masks.boxes.tolist())):
        ann = crop_annotation(crop, x0, y0, height, width, ann_id=first_id + len(annotations), image_id=image_id,
                              category_id=int(category_ids[i]), stats=stats, **options)
        if ann is None:
            empty.append(i)
        else:
            annotations.append(ann)
    return annotations, empty
