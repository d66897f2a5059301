"""Contact-zone IoU (gains/cto_zone.py) against examples computed by hand."""
from __future__ import annotations

import numpy as np
import pytest

from gains.cto_zone import contact_zones, zone_scores


def row(width, *spans):
    """bool [1, width] with columns lo..hi (inclusive) set for each (lo, hi)."""
    m = np.zeros((1, width), bool)
    for lo, hi in spans:
        m[0, lo:hi + 1] = True
    return m


W = 13
# GT a = columns 0-3 and b = 3-6 overlap at column 3; c = 10-11 is isolated (3 px gap to b).
GT = np.stack([row(W, (0, 3)), row(W, (3, 6)), row(W, (10, 11))])
LABELS = [1, 1, 1]


def test_contact_zone_by_hand():
    # radius 1 in a one-row image: D(a) = 0-4, D(b) = 2-7, so Z_a = Z_b = columns 2-4; c meets nothing.
    zones = contact_zones(GT, LABELS, radius=1)
    assert np.array_equal(zones[0], row(W, (2, 4)))
    assert np.array_equal(zones[1], row(W, (2, 4)))
    assert not zones[2].any()


def test_zone_iou_by_hand():
    # prediction of a stops one pixel short of the overlap (0-2), prediction of b leaks one pixel (3-7)
    det = np.stack([row(W, (0, 2)), row(W, (3, 7)), row(W, (10, 11))])
    out = zone_scores(GT, LABELS, det, [1, 1, 1], [0.9, 0.8, 0.7], radius=1)
    assert out["cto"].tolist() == [True, True, False]
    # a: in Z = {2,3,4}, p∩g = {2}, p∪g = {2,3} -> 1/2; b: p∩g = {3,4}, p∪g = {3,4} (column 7 is outside Z) -> 1
    assert out["zone_iou"][0] == pytest.approx(0.5)
    assert out["zone_iou"][1] == pytest.approx(1.0)
    assert np.isnan(out["zone_iou"][2])
    # whole masks: a 3/4, b 4/5, c 2/2
    assert out["mask_iou"].tolist() == pytest.approx([0.75, 0.8, 1.0])


def test_low_scores_and_other_categories_are_not_predictions():
    det = np.stack([row(W, (0, 2)), row(W, (3, 6))])
    out = zone_scores(GT, LABELS, det, [1, 2], [0.9, 0.9], radius=1)  # b's look-alike is another category
    assert out["zone_iou"][1] == 0.0 and out["mask_iou"][1] == 0.0
    out = zone_scores(GT, LABELS, det, [1, 1], [0.9, 0.3], radius=1)  # below score_thresh 0.5
    assert out["zone_iou"][1] == 0.0


def test_other_category_neighbours_make_no_contact_zone():
    zones = contact_zones(GT, [1, 2, 1], radius=1)
    assert not zones.any()


def test_touching_without_overlap_is_a_contact():
    # a = 0-2 and b = 3-5 touch (adjacent columns); radius 2: D(a) = 0-4, D(b) = 1-7 -> zone 1-4
    gt = np.stack([row(8, (0, 2)), row(8, (3, 5))])
    zones = contact_zones(gt, [1, 1], radius=2)
    assert np.array_equal(zones[0], row(8, (1, 4)))
    # a one-pixel gap (0-2 and 4-5) is not touching
    gap = np.stack([row(8, (0, 2)), row(8, (4, 5))])
    assert not contact_zones(gap, [1, 1], radius=2).any()
