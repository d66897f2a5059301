"""gains.mask_polygons against independent oracles: a matplotlib pixel-centre test for the scan-line fill,
pycocotools for the COCO annotations, shapely for ring validity, the pixel count for traced areas."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import shapely
from matplotlib.path import Path as MplPath

from gains.annotations import segmentation_to_mask
from gains.mask_polygons import (crop_annotation, fill_ellipse, fill_rings, masks_to_annotations, nest_rings,
                                 trace_rings)
from gains.instances import CropMasks


def centre_oracle(rings, height: int, width: int) -> np.ndarray:
    """bool [H, W]: pixel centres inside an odd number of rings (matplotlib, one ring at a time)."""
    yy, xx = np.mgrid[0:height, 0:width]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    inside = np.zeros(height * width, int)
    for ring in rings:
        inside += MplPath(np.asarray(ring, np.float64)).contains_points(centres)
    return (inside % 2 == 1).reshape(height, width)


def paste(box, crop, height: int, width: int) -> np.ndarray:
    full = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    full[y0:y1, x0:x1] = crop
    return full


def noise_crops(seed: int, n: int = 60):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = rng.integers(1, 22, 2)
        crop = rng.random((h, w)) < rng.uniform(0.2, 0.95)
        if crop.any():
            yield crop


def test_tracing_then_filling_gives_back_every_pixel():
    """Random noise masks (holes, islands in holes, diagonal contacts): fill(trace(mask)) == mask."""
    for crop in noise_crops(0):
        outers, holes = trace_rings(crop)
        box, got = fill_rings(outers + holes, *crop.shape)
        np.testing.assert_array_equal(paste(box, got, *crop.shape), crop)


def test_traced_rings_are_valid_polygons_with_the_stated_area():
    """Every polygon of nest_rings is valid for shapely (no ring touches another or itself) and its area is
    the pixel count minus 1/2 per outer ring plus 1/2 per hole."""
    for crop in noise_crops(1):
        outers, holes = trace_rings(crop)
        polygons = [shapely.Polygon(outer, inner) for outer, inner in nest_rings(outers, holes)]
        geometry = shapely.MultiPolygon(polygons)
        assert geometry.is_valid, shapely.is_valid_reason(geometry)
        assert geometry.area == pytest.approx(crop.sum() - 0.5 * len(outers) + 0.5 * len(holes))
        assert all(shapely.LinearRing(r).is_ccw for r in outers)  # exteriors CCW in (x, y)
        assert not any(shapely.LinearRing(r).is_ccw for r in holes)


def test_islands_in_holes_nest_to_the_smallest_enclosing_ring():
    crop = np.zeros((9, 9), bool)
    crop[0:9, 0:9] = True
    crop[1:8, 1:8] = False   # hole of the big square
    crop[3:6, 3:6] = True    # island in the hole
    crop[4, 4] = False       # hole of the island
    outers, holes = trace_rings(crop)
    nested = nest_rings(outers, holes)
    assert sorted(len(inner) for _, inner in nested) == [1, 1]
    for outer, inner in nested:  # each hole lies inside its own outer ring and in no smaller one
        assert MplPath(outer).contains_point(inner[0][0])


@pytest.mark.parametrize("seed", range(4))
def test_fill_rings_equals_the_centre_rule_on_random_polygons(seed):
    """Random (self-crossing, overlapping) rings with coordinates off the half-pixel grid, so no centre lies
    on an edge: the scan line equals the even-odd centre oracle; parts outside the image are cut off."""
    rng = np.random.default_rng(seed)
    h, w = 30, 40
    rings = [rng.uniform(-8, 45, (rng.integers(3, 12), 2)) + 0.013 for _ in range(3)]
    box, crop = fill_rings(rings, h, w)
    np.testing.assert_array_equal(paste(box, crop, h, w), centre_oracle(rings, h, w))


def test_fill_rings_breaks_ties_as_java2d():
    """A square with integer corners: pixel centres are never on its edges, the box is exact. Centres on the
    boundary are inside when the space just right of them (or, on a horizontal edge, just below) is inside,
    Java2D's definition (QuPath): a diamond with its vertices and edges on pixel centres, a square whose
    edges run through centres."""
    box, crop = fill_rings([[[2, 1], [6, 1], [6, 4], [2, 4]]], 10, 10)
    assert box == (2, 1, 6, 4) and crop.all()
    diamond = np.array([[4.5, 0.5], [8.5, 4.5], [4.5, 8.5], [0.5, 4.5]])  # vertices on pixel centres
    box, crop = fill_rings([diamond], 10, 10)
    full = paste(box, crop, 10, 10)
    assert full[4, 0] and not full[4, 8]        # left vertex in, right vertex out
    assert not full[0, 4] and not full[8, 4]    # top and bottom vertices: nothing right of them is inside
    assert full[2, 2] and not full[2, 6]        # centre (2.5, 2.5) on the upper-left edge, (6.5, 2.5) upper-right
    box, crop = fill_rings([[[0.5, 0.5], [4.5, 0.5], [4.5, 3.5], [0.5, 3.5]]], 10, 10)
    expected = np.zeros((10, 10), bool)
    expected[0:3, 0:4] = True                   # top and left edges in, bottom and right edges out
    np.testing.assert_array_equal(paste(box, crop, 10, 10), expected)


def test_fill_rings_degenerate_inputs():
    assert fill_rings([], 5, 5)[1].shape == (0, 0)
    assert fill_rings([[[0, 0], [3, 3]]], 5, 5)[1].shape == (0, 0)          # fewer than 3 vertices
    assert fill_rings([[[20, 20], [30, 20], [30, 30]]], 5, 5)[1].shape == (0, 0)  # outside the image
    assert fill_rings([[[0, 0], [np.nan, 3], [3, 3]]], 5, 5)[1].shape == (0, 0)


def test_fill_ellipse_is_the_centre_rule():
    box, crop = fill_ellipse(1.0, 2.0, 9.0, 7.0, 12, 12)
    yy, xx = np.mgrid[0:12, 0:12] + 0.5
    oracle = ((xx - 5) / 4) ** 2 + ((yy - 4.5) / 2.5) ** 2 < 1
    np.testing.assert_array_equal(paste(box, crop, 12, 12), oracle)
    box, crop = fill_ellipse(-3.0, -3.0, 3.0, 3.0, 12, 12)  # clipped at the image corner
    assert box[:2] == (0, 0) and crop.sum() == 8  # a quarter disc of radius 3: 3 + 3 + 2 centres


def test_crop_annotation_decodes_to_exactly_the_pixels():
    """pycocotools' rasterisation of the polygon / RLE annotations equals the mask; bbox and area are the
    pixels' (a crop larger than the mask is tightened)."""
    stats = Counter()
    rng = np.random.default_rng(2)
    for crop in noise_crops(3, 60):
        x0, y0 = (int(v) for v in rng.integers(0, 10, 2))
        padded = np.pad(crop, 2)
        ann = crop_annotation(padded, x0, y0, 40, 40, ann_id=5, image_id=2, category_id=3, stats=stats,
                              min_iou=1.0)
        full = paste((x0, y0, x0 + padded.shape[1], y0 + padded.shape[0]), padded, 40, 40)
        np.testing.assert_array_equal(segmentation_to_mask(ann["segmentation"], 40, 40).astype(bool), full)
        rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
        assert ann["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        assert ann["area"] == full.sum() and (ann["id"], ann["image_id"], ann["category_id"]) == (5, 2, 3)
    assert stats["instances"] == 60 and stats["rle_holes"] > 0 and stats["multi_part"] > 0
    assert crop_annotation(np.zeros((3, 3), bool), 0, 0, 5, 5, ann_id=1, image_id=1, category_id=1) is None


def test_masks_to_annotations_keeps_overlaps_and_skips_empty_masks():
    dense = np.zeros((3, 20, 20), bool)
    dense[0, 2:12, 2:12] = True
    dense[2, 6:16, 6:16] = True  # overlaps mask 0; mask 1 is empty
    anns, empty = masks_to_annotations(CropMasks.from_dense(dense), [1, 2, 3], image_id=4, first_id=10)
    assert empty == [1] and [a["id"] for a in anns] == [10, 11] and [a["category_id"] for a in anns] == [1, 3]
    for ann, m in zip(anns, dense[[0, 2]]):
        np.testing.assert_array_equal(segmentation_to_mask(ann["segmentation"], 20, 20).astype(bool), m)
