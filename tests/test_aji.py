"""AJI family (gains/aji.py): fixtures, the worked table of gains/METRICS.md §4, mode relations, and
instance_metrics (the gains.metrics facade) sharing one intersection pass with them.

Oracles: the expected values of fixtures/metrics/aji_cases.json (a reference AJI implementation checked
against the authors' evaluator, fixtures/metrics/README.md) and the worked table WORKED below.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from gains.aji import (aji, aji_gains_image, aji_image, aji_kumar, aji_kumar_image, aji_plus, aji_plus_image,
                       greedy_aji_matches)
from gains.average_precision import evaluate_instances, pairwise_intersections
from gains.metrics import instance_metrics

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
DATASETS = json.loads((FIXTURES / "aji_cases.json").read_text())["datasets"]
TOL = 1e-9
KINDS = {"donet": aji, "kumar": aji_kumar, "plus": aji_plus}


def _rows(mask_rows) -> np.ndarray:
    return np.array([[ch == "1" for ch in row] for row in mask_rows], dtype=bool)


def _stack(masks, h, w):
    return np.stack(masks) if masks else np.zeros((0, h, w), bool)


def _fixture_images(ds):
    gts, dets = [], []
    for i, im in enumerate(ds["images"]):
        h, w = im["height"], im["width"]
        gts.append({"image_id": i, "labels": [g["category_id"] for g in im["gt"]],
                    "masks": _stack([_rows(g["mask_rows"]) for g in im["gt"]], h, w)})
        dets.append({"labels": [p["category_id"] for p in im["pred"]], "scores": [p["score"] for p in im["pred"]],
                     "masks": _stack([_rows(p["mask_rows"]) for p in im["pred"]], h, w)})
    return gts, dets


@pytest.mark.parametrize("ds", DATASETS, ids=lambda d: d["name"])
def test_fixture_per_image_values(ds):
    gts, dets = _fixture_images(ds)
    results = {key: fn(gts, dets, ds["categories"]) for key, fn in KINDS.items()}
    for i, expected in enumerate(ds["expected"]["per_image_per_category"]):
        for c, values in expected.items():
            for key, value in values.items():
                got = results[key]["per_image"][i].get(int(c))
                assert (got is None) == (value is None), (i, c, key)
                if value is not None:
                    assert abs(got - value) <= TOL, (i, c, key, got, value)


@pytest.mark.parametrize("ds", DATASETS, ids=lambda d: d["name"])
@pytest.mark.parametrize("mode,key", [("clean", "donet_dataset"), ("gains", "donet_dataset_with_area_range_quirk")])
def test_fixture_dataset_values(ds, mode, key):
    gts, dets = _fixture_images(ds)
    out = aji(gts, dets, ds["categories"], mode=mode)
    expected = ds["expected"][key]
    assert abs(out["mean"] - expected["mean"]) <= TOL
    for c, value in expected["per_category"].items():
        assert abs(out["per_category"][int(c)] - value) <= TOL
    assert out["mode"] == mode


# ----------------------------------------------------------------------------------------- worked table
def _box(r0, r1, c0, c1, size=20):
    m = np.zeros((size, size), bool)
    m[r0:r1, c0:c1] = True
    return m


def _one_image(gt_masks, det_masks, size=20):
    gts = [{"labels": [1] * len(gt_masks), "masks": _stack(gt_masks, size, size)}]
    dets = [{"labels": [1] * len(det_masks), "scores": np.linspace(0.9, 0.5, len(det_masks)),
             "masks": _stack(det_masks, size, size)}]
    return gts, dets


WORKED = {  # gains/METRICS.md §4: (GT masks, prediction masks) -> (aji_kumar, aji_plus, aji)
    "perfect_overlapping": ([_box(0, 10, 0, 10), _box(5, 15, 5, 15)], [_box(0, 10, 0, 10), _box(5, 15, 5, 15)],
                            (1, 1, 1)),
    "shifted": ([_box(0, 10, 0, 10)], [_box(0, 10, 2, 12)], (80 / 120,) * 3),
    "shifted_plus_fp": ([_box(0, 10, 0, 10)], [_box(0, 10, 2, 12), _box(15, 18, 0, 10)], (80 / 150,) * 3),
    "low_iou_hit": ([_box(0, 10, 0, 10)], [_box(0, 10, 7, 17)], (30 / 170, 30 / 170, 0)),
    "one_pred_two_gts": ([_box(0, 10, 0, 5), _box(0, 10, 5, 10)], [_box(0, 10, 0, 10)], (0.5, 50 / 150, 50 / 150)),
    "no_prediction": ([_box(0, 10, 0, 10)], [], (0, 0, 0)),
}


@pytest.mark.parametrize("name", WORKED)
def test_worked_table(name):
    gt_masks, det_masks, expected = WORKED[name]
    gts, dets = _one_image(gt_masks, det_masks)
    got = [fn(gts, dets, [1])["mean"] for fn in (aji_kumar, aji_plus, aji)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert aji(gts, dets, [1], mode="gains")["mean"] == pytest.approx(expected[2], abs=1e-12)


def test_per_image_helpers_on_counts():
    """The helpers take exact counts: inter [D,G] (score order), |g| [G], |d| [D]."""
    gt = np.stack([_box(0, 10, 0, 5), _box(0, 10, 5, 10)]).reshape(2, -1)
    det = _box(0, 10, 0, 10).reshape(1, -1)
    inter = pairwise_intersections(det, gt)
    assert inter.dtype == np.int64 and inter.tolist() == [[50, 50]]
    args = (inter, gt.sum(1), det.sum(1))
    assert (aji_kumar_image(*args), aji_plus_image(*args), aji_image(*args)) == (0.5, 50 / 150, 50 / 150)


# ----------------------------------------------------------------------------------------- modes
def test_gains_mode_reproduces_the_area_range_quirk():
    """A big (medium) GT missed, a small one matched: for the 'small' copy the evaluator charges the
    small GT's area for the missed big one (ignored GTs are re-ordered last, the IoU matrix is not)."""
    big, small = _box(0, 40, 0, 50, 64), _box(50, 60, 50, 60, 64)
    gts, dets = _one_image([big, small], [small], size=64)
    clean = aji(gts, dets, [1])["mean"]
    gains = aji(gts, dets, [1], mode="gains")["mean"]
    assert clean == pytest.approx(100 / 2100, abs=1e-15)
    assert gains == pytest.approx((3 * 100 / 2100 + 100 / 200) / 4, abs=1e-15)
    ignore = np.array([[False, False], [True, False], [False, True], [True, True]])
    inter = np.array([[0, 100]])
    assert aji_gains_image(inter, np.array([2000, 100]), np.array([100]), ignore) == pytest.approx(gains)


def _random_images(rng, n_images, all_matched):
    gts, dets = [], []
    for _ in range(n_images):
        gm = []
        for _ in range(rng.integers(1, 6)):
            r, c, hh, ww = rng.integers(0, 40), rng.integers(0, 40), rng.integers(3, 40), rng.integers(3, 40)
            gm.append(_box(r, r + hh, c, c + ww, 64))
        dm = [np.roll(m, 1, axis=1) if rng.random() < 0.5 else m for m in gm]  # IoU well above 0.5
        if not all_matched:
            dm = dm[: rng.integers(0, len(dm) + 1)] + [_box(60, 62, 60, 62, 64)]
        gts.append({"labels": [1] * len(gm), "masks": _stack(gm, 64, 64)})
        dets.append({"labels": [1] * len(dm), "scores": rng.random(len(dm)), "masks": _stack(dm, 64, 64)})
    return gts, dets


def test_modes_equal_when_every_gt_is_matched():
    rng = np.random.default_rng(0)
    gts, dets = _random_images(rng, 8, all_matched=True)
    for gt, det in zip(gts, dets):  # the premise: the greedy matching leaves no GT alone
        masks = [m.reshape(len(m), -1) for m in (det["masks"][np.argsort(-det["scores"], kind="stable")], gt["masks"])]
        assert (greedy_aji_matches(pairwise_intersections(*masks), masks[1].sum(1), masks[0].sum(1)) >= 0).all()
    clean, gains = aji(gts, dets, [1]), aji(gts, dets, [1], mode="gains")
    for image_id, values in clean["per_image"].items():
        assert values[1] == pytest.approx(gains["per_image"][image_id][1], abs=1e-15)
    assert clean["mean"] == pytest.approx(gains["mean"], abs=1e-15)


def test_counting_rules_and_max_dets():
    """An image without GT or prediction of a category is not counted; only the top 100 predictions
    (by score) take part in `aji`; Kumar and AJI+ use them all unless given the same cap."""
    gts = [{"image_id": 1, "labels": [1], "masks": _box(0, 10, 0, 10)[None]},
           {"image_id": 2, "labels": [2], "masks": _box(0, 10, 0, 10)[None]}]
    many = [_box(15, 16, i % 20, i % 20 + 1) for i in range(100)] + [_box(0, 10, 0, 10)]
    dets = [{"labels": [1] * 101, "scores": np.linspace(1, 0.01, 101), "masks": np.stack(many)},
            {"labels": [], "scores": [], "masks": np.zeros((0, 20, 20), bool)}]
    out = aji(gts, dets, [1, 2, 3])
    assert out["per_image"] == {1: {1: 0.0}, 2: {2: 0.0}} and out["per_category"][3] is None
    assert aji_kumar(gts, dets, [1, 2, 3])["per_image"][1][1] == pytest.approx(100 / 200)
    # the evaluator's cap (test.max_dets_eval) applies to every variant: the hit is the 101st detection
    for fn in (aji, aji_kumar, aji_plus):
        assert fn(gts, dets, [1], max_dets=100)["per_image"][1][1] == 0.0, fn.__name__
        assert fn(gts, dets, [1], max_dets=101)["per_image"][1][1] == pytest.approx(100 / 200), fn.__name__
    out = instance_metrics(gts, dets, [1, 2], max_dets=(1, 10, 100))  # one cap for AP and every AJI
    assert out["aji_kumar"]["mean"] == out["aji_plus"]["mean"] == out["aji"]["mean"] == 0.0
    assert instance_metrics(gts, dets, [1, 2], max_dets=(1, 10, 101))["aji_plus"]["per_category"][1] == 0.5


def test_instance_metrics_shares_one_pass():
    rng = np.random.default_rng(1)
    gts, dets = _random_images(rng, 5, all_matched=False)
    out = instance_metrics(gts, dets, [1], aji_mode="gains")
    assert out["aji"]["mean"] == aji(gts, dets, [1], mode="gains")["mean"]
    assert out["aji_kumar"]["mean"] == aji_kumar(gts, dets, [1])["mean"]
    assert out["aji_plus"]["mean"] == aji_plus(gts, dets, [1])["mean"]
    assert out["stats"] == evaluate_instances(gts, dets, [1])["stats"] and 0 < out["stats"][0] <= 1


def test_unknown_mode_is_an_error():
    gts, dets = _one_image([_box(0, 5, 0, 5)], [_box(0, 5, 0, 5)])
    with pytest.raises(ValueError, match="mode"):
        aji(gts, dets, [1], mode="donet")
