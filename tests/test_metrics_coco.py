"""Native COCO AP (gains.metrics) against pycocotools COCOeval: fixtures and random parity."""
import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gains.errors import DataError
from gains.metrics import STAT_NAMES, coco_evaluate, evaluate_instances

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
CASES = json.loads((FIXTURES / "coco_segm_cases.json").read_text())["cases"]
TOL = 1e-9


def _rows(mask_rows) -> np.ndarray:
    return np.array([[ch == "1" for ch in row] for row in mask_rows], dtype=np.uint8)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()  # json-style string counts
    return rle


def _fixture_dataset(case):
    """Fixture case -> (COCO gt dict, results list) following the fixture README's conventions."""
    gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in case["categories"]]}
    results, n = [], 0
    for im in case["images"]:
        gt["images"].append({"id": im["id"], "height": im["height"], "width": im["width"]})
        for g in im["gt"]:
            n += 1
            m = _rows(g["mask_rows"])
            gt["annotations"].append({"id": g.get("id", n), "image_id": im["id"], "category_id": g["category_id"],
                                      "iscrowd": g["iscrowd"], "segmentation": _rle(m),
                                      "area": g.get("area", int(m.sum()))})
        for p in im["pred"]:
            results.append({"image_id": im["id"], "category_id": p["category_id"], "score": p["score"],
                            "segmentation": _rle(_rows(p["mask_rows"]))})
    return gt, results


def _assert_close(out, stats, per_category):
    assert np.allclose(out["stats"], stats, rtol=0, atol=TOL), (out["stats"], stats)
    for c, expected in per_category.items():
        for key, value in expected.items():
            assert abs(out["per_category"][int(c)][key] - value) <= TOL, (c, key)


@pytest.mark.parametrize("case", [c for c in CASES if c["name"] != "gt_annotation_id_zero"], ids=lambda c: c["name"])
def test_fixture_cases(case):
    gt, results = _fixture_dataset(case)
    out = coco_evaluate(gt, results)
    expected = case["expected_pycocotools"]
    _assert_close(out, [expected["stats"][k] for k in STAT_NAMES], expected["per_category"])
    assert out["AP"] == pytest.approx(100 * expected["stats"]["AP"], abs=1e-7)


def test_annotation_id_zero_is_rejected():
    gt, results = _fixture_dataset(next(c for c in CASES if c["name"] == "gt_annotation_id_zero"))
    with pytest.raises(DataError, match=r"ids must be integers >= 1"):
        coco_evaluate(gt, results)


# ----------------------------------------------------------------------------------------- random data
def _random_mask(rng, h, w):
    m = np.zeros((h, w), dtype=np.uint8)
    y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
    y1, x1 = rng.integers(y0 + 1, min(h, y0 + h // 2 + 2) + 1), rng.integers(x0 + 1, min(w, x0 + w // 2 + 2) + 1)
    if rng.random() < 0.5:
        m[y0:y1, x0:x1] = 1
    else:  # an ellipse in that box
        yy, xx = np.mgrid[:h, :w]
        cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, max((y1 - y0) / 2, 1), max((x1 - x0) / 2, 1)
        m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    return m


def _jitter(rng, m):
    """A detection near a GT: shifted, grown or shrunk a little."""
    if rng.random() < 0.2:
        return m.copy()
    out = np.roll(m, (rng.integers(-1, 2), rng.integers(-1, 2)), axis=(0, 1))
    if rng.random() < 0.3:
        out[:, :-1] |= out[:, 1:]
    return out


def _random_box(rng, h, w, integral):
    x, y = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
    bw, bh = rng.uniform(1, w / 2), rng.uniform(1, h / 2)
    box = [x, y, min(bw, w - x), min(bh, h - y)]  # inside the image: GT boxes beyond it are refused
    return [float(round(v)) or 1.0 for v in box] if integral else box


def _segmentation(rng, m, h, w):
    """Encode a GT mask as compressed RLE, uncompressed RLE or (for rectangles) a polygon."""
    r = rng.random()
    ys, xs = np.nonzero(m)
    if r < 0.2 and len(ys) and m.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1):
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        return [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]
    if r < 0.35:
        flat = m.reshape(-1, order="F")
        change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])) != 0)
        return {"size": [h, w], "counts": np.diff(np.concatenate([[0], change])).tolist()}
    return _rle(m)


def random_dataset(seed: int, iou_type: str):
    """A small random COCO dataset with overlaps, crowd regions, ties, empty images and a category
    that has detections but no GT. Returns (gt dict, results list)."""
    rng = np.random.default_rng(seed)
    cats = sorted(rng.choice([1, 2, 3, 5, 9], size=rng.integers(1, 4), replace=False).tolist())
    gt = {"images": [], "annotations": [], "categories": [{"id": int(c)} for c in cats]}
    results, ann_id = [], 0
    gt_free_cat = cats[-1] if len(cats) > 1 and rng.random() < 0.5 else None
    scores = [0.3, 0.5, 0.5, 0.7, 0.9] if rng.random() < 0.5 else None  # quantised -> ties
    for image_id in rng.permutation(np.arange(1, rng.integers(2, 6)) * 3).tolist():
        h, w = (int(rng.integers(12, 40)), int(rng.integers(12, 40))) if rng.random() < 0.8 else (110, 100)
        gt["images"].append({"id": image_id, "height": h, "width": w})
        for _ in range(rng.integers(0, 7) if rng.random() > 0.2 else 0):
            c = int(rng.choice([c for c in cats if c != gt_free_cat]))
            crowd = int(rng.random() < 0.12)
            ann_id += 1
            ann = {"id": ann_id, "image_id": image_id, "category_id": c, "iscrowd": crowd}
            if iou_type == "segm":
                m = _random_mask(rng, h, w)
                ann["segmentation"] = _rle(m) if crowd else _segmentation(rng, m, h, w)
                area = float(m.sum())
            else:
                ann["bbox"] = _random_box(rng, h, w, rng.random() < 0.5)
                area = ann["bbox"][2] * ann["bbox"][3]
            # the 'area' field drives the ranges; sometimes place it on a boundary or far from the mask
            ann["area"] = float(rng.choice([area, 1024, 9216, 30.5, 5000.0, 20000.0], p=[.7, .06, .06, .06, .06, .06]))
            gt["annotations"].append(ann)
            if rng.random() < 0.15:  # annotated twice: equal IoUs, so the GT tie rule matters
                ann_id += 1
                gt["annotations"].append(dict(ann, id=ann_id, area=float(rng.choice([ann["area"], 2000.0]))))
            for _ in range(rng.integers(0, 3)):  # detections of this GT
                results.append({"image_id": image_id, "category_id": c, "_near": ann})
        for _ in range(rng.integers(0, 4)):  # free-floating detections, any category
            results.append({"image_id": image_id, "category_id": int(rng.choice(cats)), "_near": None})
    order = rng.permutation(len(results))
    out = []
    for i in order:
        r = results[i]
        im = next(x for x in gt["images"] if x["id"] == r["image_id"])
        h, w = im["height"], im["width"]
        near = r.pop("_near")
        r["score"] = float(rng.choice(scores)) if scores else float(np.round(rng.random(), 3))
        if iou_type == "segm":
            base = mask_utils.decode(_rles_of(near["segmentation"], h, w)) if near else None
            r["segmentation"] = _rle(_jitter(rng, base) if near else _random_mask(rng, h, w))
        else:
            b = near["bbox"] if near else _random_box(rng, h, w, True)
            r["bbox"] = [float(v) for v in (b[0] + rng.choice([0, 0.5, -1]), b[1] + rng.choice([0, 1]), b[2],
                                             b[3] + rng.choice([0, 1]))]
        out.append(r)
    if rng.random() < 0.1:
        out = []
    return gt, out


def _rles_of(segm, h, w):
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    return mask_utils.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm


def pycocotools_eval(gt, results, iou_type, max_dets=(1, 10, 100)):
    """(stats, per-category {AP, AP50, AP75}) from pycocotools, or None when loadRes cannot run."""
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # pycocotools' summarize() hard-codes maxDets=100 for stats[0] (-1 when 100 is not in maxDets); ours is
    # AP at the largest maxDets: the mean of pycocotools' own precision there
    p = ev.eval["precision"][:, :, :, 0, -1]
    at_cap = float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
    assert ev.stats[0] == (pytest.approx(at_cap, abs=1e-12) if max_dets[-1] == 100 else -1.0)
    stats = [at_cap] + list(ev.stats[1:])
    per_category = {}
    for k, c in enumerate(ev.params.catIds):
        p = ev.eval["precision"]
        per_category[c] = {key: (lambda v: float(np.mean(v[v > -1])) if (v > -1).any() else -1.0)(s)
                           for key, s in (("AP", p[:, :, k, 0, -1]), ("AP50", p[0, :, k, 0, -1]),
                                          ("AP75", p[5, :, k, 0, -1]))}
    return stats, per_category


def _expected_without_predictions(gt):
    """What COCOeval would report with no detections: 0 where a range has non-ignored GT, else -1."""
    areas = [a["area"] for a in gt["annotations"] if not a.get("iscrowd")]
    ranges = [(0, 1e10), (0, 1024), (1024, 9216), (9216, 1e10)]
    has = [any(lo <= a <= hi for a in areas) for lo, hi in ranges]
    v = [0.0 if h else -1.0 for h in has]
    return [v[0], v[0], v[0], v[1], v[2], v[3], v[0], v[0], v[0], v[1], v[2], v[3]]


def _check_parity(seed, iou_type):
    gt, results = random_dataset(seed, iou_type)
    max_dets = (1, 2, 3) if seed % 4 == 3 else (1, 10, 100)  # small caps exercise the truncation
    out = coco_evaluate(copy.deepcopy(gt), copy.deepcopy(results), iou_type, max_dets)
    reference = pycocotools_eval(gt, results, iou_type, max_dets)
    if reference is None:
        expected = _expected_without_predictions(gt)
        assert out["stats"] == expected
        return
    _assert_close(out, *reference)


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_random_parity_with_pycocotools(iou_type):
    for seed in range(60):
        _check_parity(seed, iou_type)


@pytest.mark.slow
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_random_parity_with_pycocotools_many(iou_type):
    for seed in range(1000, 1300):
        _check_parity(seed, iou_type)


# ----------------------------------------------------------------------------------------- edge cases
def _simple():
    gt, results = _fixture_dataset(next(c for c in CASES if c["name"] == "duplicate_prediction"))
    return gt, results


def test_no_predictions_gives_zero():
    gt, _ = _simple()
    out = coco_evaluate(gt, [])
    assert out["stats"][:3] == [0.0, 0.0, 0.0] and out["AP"] == 0.0
    assert out["per_category"][1] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_unknown_ids_in_results_are_named():
    gt, results = _simple()
    with pytest.raises(DataError, match=r"image ids \[77\]"):
        coco_evaluate(gt, results + [dict(results[0], image_id=77)])
    with pytest.raises(DataError, match=r"category ids \[4\].*map the model"):
        coco_evaluate(gt, results + [dict(results[0], category_id=4)])


def test_bbox_in_segm_results_is_ignored():
    gt, results = _simple()
    with_box = [dict(r, bbox=[0, 0, 1000, 1000]) for r in results]  # box area would move it to 'large'
    assert coco_evaluate(gt, with_box)["stats"] == coco_evaluate(gt, results)["stats"]


def test_in_memory_entry_point_matches_json_path():
    """evaluate_instances on bool masks (numpy and torch) gives the numbers of coco_evaluate."""
    gt, results = random_dataset(7, "segm")
    expected = coco_evaluate(gt, results)
    gts, dets = [], []
    for im in gt["images"]:
        h, w = im["height"], im["width"]
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
        res = [r for r in results if r["image_id"] == im["id"]]
        gm = np.zeros((len(anns), h, w), np.uint8)
        for i, a in enumerate(anns):
            gm[i] = mask_utils.decode(_rles_of(a["segmentation"], h, w))
        dm = np.zeros((len(res), 1, h, w), np.uint8)
        for i, r in enumerate(res):
            dm[i, 0] = mask_utils.decode(r["segmentation"])
        gts.append({"image_id": im["id"], "labels": [a["category_id"] for a in anns], "masks": torch.from_numpy(gm).bool(),
                    "iscrowd": [a["iscrowd"] for a in anns], "areas": [a["area"] for a in anns]})
        dets.append({"labels": np.array([r["category_id"] for r in res]), "scores": [r["score"] for r in res], "masks": dm})
    out = evaluate_instances(gts, dets, [c["id"] for c in gt["categories"]])
    assert out["stats"] == expected["stats"]


def test_float_masks_are_refused():
    gts = [{"labels": [1], "masks": np.ones((1, 4, 4), bool)}]
    dets = [{"labels": [1], "scores": [0.5], "masks": np.full((1, 4, 4), 0.7, np.float32)}]
    with pytest.raises(ValueError, match="binarise"):
        evaluate_instances(gts, dets, [1])


def test_iou_tie_between_gts_goes_to_the_later_gt():
    """det1 has IoU 70/130 with both GTs; taking the later one (B) leaves det2 (= B) unmatched."""
    a, b, d1 = (np.zeros((12, 20), np.uint8) for _ in range(3))
    a[:10, 0:10], b[:10, 6:16], d1[:10, 3:13] = 1, 1, 1
    gt = {"images": [{"id": 1, "height": 12, "width": 20}], "categories": [{"id": 1}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 100.0,
                           "segmentation": _rle(m)} for i, m in enumerate((a, b))]}
    results = [{"image_id": 1, "category_id": 1, "score": s, "segmentation": _rle(m)} for s, m in ((0.9, d1), (0.8, b))]
    out = coco_evaluate(gt, results)
    stats, per_category = pycocotools_eval(gt, results, "segm")
    _assert_close(out, stats, per_category)
    assert out["stats"][1] < 1.0  # AP50: the tie went to B, so det2 is a false positive


# ----------------------------------------------------------------------------------------- mask runs
def _random_dense(rng, n, h, w):
    """Masks with blobs, full lines (runs that cross line ends), noise and empties: bool [n, h, w]."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        kind = rng.integers(5)
        if kind == 0:
            masks[i] = rng.random((h, w)) < 0.3
        elif kind == 1:
            masks[i, rng.integers(h): rng.integers(h) + 3] = True  # whole rows
            masks[i, :, rng.integers(w)] = True  # a whole column
        elif kind in (2, 3):
            masks[i] = _random_mask(rng, h, w).astype(bool)
    return masks


@pytest.mark.parametrize("h,w", [(7, 9), (32, 32), (64, 33), (150, 200)])
def test_mask_runs_intersections_are_exact(h, w):
    """Runs from dense arrays (row-major) and from RLE (column-major) against a dense matrix product."""
    from gains.mask_runs import runs_from_dense, runs_from_rles
    from gains.metrics import pairwise_intersections

    rng = np.random.default_rng(h * w)
    a, b = _random_dense(rng, 12, h, w), _random_dense(rng, 9, h, w)
    expected = pairwise_intersections(a.reshape(12, -1), b.reshape(9, -1))
    dense_a, dense_b = runs_from_dense(a.reshape(12, -1), w), runs_from_dense(b.reshape(9, -1), w)
    assert np.array_equal(dense_a.intersections(dense_b), expected)
    assert np.array_equal(dense_a.areas(), a.reshape(12, -1).sum(1))
    rles_a = [_rle(m) for m in a]
    rles_b = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in b]  # compressed bytes ...
    rles_b[::2] = [{"size": [h, w], "counts": _uncompressed(m)} for m in b[::2]]  # ... and lists mixed in
    rle_a, rle_b = runs_from_rles(rles_a, h, w), runs_from_rles(rles_b, h, w)
    assert np.array_equal(rle_a.intersections(rle_b), expected)
    assert np.array_equal(rle_b.take([3, 0]).areas(), b[[3, 0]].reshape(2, -1).sum(1))


def _uncompressed(m):
    flat = m.reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])) != 0)
    return np.diff(np.concatenate([[0], change])).tolist()


def test_bad_rle_is_reported():
    gt, results = _simple()
    results[0]["segmentation"] = {"size": [32, 32], "counts": [5, 10]}
    with pytest.raises(DataError, match=r"results: result #0 \(image id 1\): uncompressed RLE runs sum to 15"):
        coco_evaluate(gt, results)
    results[0]["segmentation"] = _rle(np.ones((16, 32), np.uint8))
    with pytest.raises(DataError, match="differs from the image size"):
        coco_evaluate(gt, results)


def test_missing_fields_are_named():
    gt, results = _simple()
    with pytest.raises(DataError, match=r"annotation id 1 \(image 1\): no 'bbox'.*iou_type 'bbox'"):
        coco_evaluate(gt, [dict(r, bbox=[0, 0, 4, 4]) for r in results], iou_type="bbox")
    boxed = dict(gt, annotations=[dict(a, bbox=[0, 0, 4, 4]) for a in gt["annotations"]])
    with pytest.raises(DataError, match=r"result #0 lacks bbox"):
        coco_evaluate(boxed, results, iou_type="bbox")
    with pytest.raises(DataError, match=r"ids must be unique"):
        coco_evaluate(dict(gt, annotations=gt["annotations"] + gt["annotations"][:1]), results)
