"""CTO-stratified metrics (gains.cto): flags against a dilation oracle, strata against pycocotools."""
import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.ndimage import binary_dilation

from gains.cto import cto_flags, dilate_runs, stratified_metrics
from gains.metrics import aji, instance_metrics, runs_from_dense, runs_from_rles

TOL = 1e-9


def _box(r0, r1, c0, c1, h=20, w=20):
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


# ----------------------------------------------------------------------------------------- cto_flags
@pytest.mark.parametrize("name,masks,labels,crowd,expected", [
    ("overlap", [_box(0, 5, 0, 5), _box(3, 8, 3, 8)], [1, 1], None, [True, True]),
    ("edge_touch", [_box(0, 5, 0, 5), _box(0, 5, 5, 9)], [1, 1], None, [True, True]),
    ("diagonal_touch", [_box(0, 3, 0, 3), _box(3, 6, 3, 6)], [1, 1], None, [True, True]),
    ("one_pixel_gap", [_box(0, 5, 0, 5), _box(0, 5, 6, 9)], [1, 1], None, [False, False]),
    ("diagonal_gap", [_box(0, 3, 0, 3), _box(4, 6, 4, 6)], [1, 1], None, [False, False]),
    ("isolated_third", [_box(0, 5, 0, 5), _box(5, 8, 0, 5), _box(12, 15, 12, 15)], [1, 1, 1], None,
     [True, True, False]),
    ("crowd_never", [_box(0, 5, 0, 5), _box(3, 8, 3, 8), _box(0, 5, 5, 9)], [1, 1, 1], [0, 1, 0],
     [True, False, True]),
    ("crowd_alone_makes_nothing", [_box(0, 5, 0, 5), _box(3, 8, 3, 8)], [1, 1], [0, 1], [False, False]),
    ("other_category", [_box(0, 10, 0, 10), _box(3, 6, 3, 6)], [1, 2], None, [False, False]),
    ("empty_mask", [_box(0, 5, 0, 5), np.zeros((20, 20), bool)], [1, 1], None, [False, False]),
    ("wrap_across_lines", [_box(0, 1, 19, 20), _box(1, 2, 0, 1)], [1, 1], None, [False, False]),
    ("full_rows_vertical", [_box(0, 2, 0, 20), _box(2, 3, 7, 8)], [1, 1], None, [True, True]),
    ("border_corner", [_box(19, 20, 19, 20), _box(18, 19, 18, 19)], [1, 1], None, [True, True]),
])
def test_cto_flags_cases(name, masks, labels, crowd, expected):
    m = np.stack(masks)
    assert cto_flags(m, labels, crowd).tolist() == expected
    # torch, [G,1,H,W], and COCO's column-major runs give the same answer
    assert cto_flags(torch.from_numpy(m)[:, None], torch.tensor(labels), crowd).tolist() == expected
    rles = [mask_utils.encode(np.asfortranarray(x.astype(np.uint8))) for x in masks]
    assert cto_flags(runs_from_rles(rles, 20, 20), labels, crowd).tolist() == expected


def test_cto_flags_any_category():
    cell, nucleus, other = _box(0, 10, 0, 10), _box(3, 6, 3, 6), _box(14, 18, 14, 18)
    m = np.stack([cell, nucleus, other])
    assert cto_flags(m, [1, 2, 1]).tolist() == [False, False, False]
    assert cto_flags(m, [1, 2, 1], same_category_only=False).tolist() == [True, True, False]


def test_cto_flags_degenerate():
    assert cto_flags(np.zeros((0, 5, 6), bool), []).tolist() == []
    assert cto_flags(_box(0, 2, 0, 2)[None], [1]).tolist() == [False]
    with pytest.raises(ValueError):
        cto_flags(np.zeros((2, 5, 5), np.float32), [1, 1])


def _oracle_flags(masks, labels, crowd, same_category_only=True):
    """Slow definition: scipy 3x3 dilation, loop over pairs."""
    g = len(masks)
    out = np.zeros(g, bool)
    for i in range(g):
        grown = binary_dilation(masks[i], structure=np.ones((3, 3), bool))
        for j in range(g):
            if i != j and not crowd[i] and not crowd[j] and (labels[i] == labels[j] or not same_category_only):
                out[i] |= bool((grown & masks[j]).any())
    return out


def _blob(rng, h, w):
    kind = rng.integers(0, 3)
    y, x = rng.integers(0, h), rng.integers(0, w)
    if kind == 0:  # rectangle, possibly full width (runs across lines)
        hh, ww = rng.integers(1, 6), (w if rng.random() < 0.1 else rng.integers(1, 8))
        return _box(y, y + hh, 0 if ww == w else x, x + ww, h, w)
    if kind == 1:  # ellipse
        yy, xx = np.mgrid[:h, :w]
        ry, rx = rng.uniform(1, 5, 2)
        return ((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1
    return rng.random((h, w)) < 0.03  # scattered pixels: many diagonal contacts


@pytest.mark.parametrize("seed", range(30))
def test_cto_flags_match_dilation_oracle(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(8, 30)), int(rng.integers(8, 30))
    g = int(rng.integers(0, 12))
    masks = np.stack([_blob(rng, h, w) for _ in range(g)]) if g else np.zeros((0, h, w), bool)
    labels, crowd = rng.integers(1, 3, g), rng.random(g) < 0.1
    for same in (True, False):
        expected = _oracle_flags(masks, labels, crowd, same)
        assert cto_flags(masks, labels, crowd, same).tolist() == expected.tolist()
        col_major = runs_from_dense(masks.transpose(0, 2, 1).reshape(g, h * w), line=h)
        assert cto_flags(col_major, labels, crowd, same).tolist() == expected.tolist()
    if g:  # dilate_runs covers exactly the 3x3 dilation
        runs = runs_from_dense(masks.reshape(g, h * w), line=w)
        dil = dilate_runs(runs)
        for i in range(g):
            dense = np.zeros(h * w, bool)
            for s, e in zip(dil.starts[dil.ptr[i]:dil.ptr[i + 1]], dil.ends[dil.ptr[i]:dil.ptr[i + 1]]):
                dense[s:e] = True
            grown = binary_dilation(masks[i], structure=np.ones((3, 3), bool))
            assert (dense.reshape(h, w) == grown).all()


# ----------------------------------------------------------------------------------------- strata, by hand
# one 30x30 image: a CTO pair (overlapping), a CTO trio (touching chain) and two isolated instances
H = W = 30
SCENE = [_box(0, 6, 0, 6, H, W), _box(4, 10, 4, 10, H, W),  # overlap
         _box(20, 24, 0, 4, H, W), _box(20, 24, 4, 8, H, W), _box(24, 28, 8, 12, H, W),  # touch chain
         _box(0, 5, 20, 25, H, W), _box(12, 16, 20, 25, H, W)]  # isolated
SCENE_CTO = [True] * 5 + [False] * 2


def _image(gt_masks, det_masks, scores=None, gt_labels=None, det_labels=None):
    gt = {"labels": gt_labels or [1] * len(gt_masks), "masks": np.stack(gt_masks)}
    dm = np.stack(det_masks) if det_masks else np.zeros((0, H, W), bool)
    det = {"labels": det_labels or [1] * len(det_masks), "masks": dm,
           "scores": scores if scores is not None else np.linspace(0.9, 0.5, len(det_masks))}
    return [gt], [det]


def _key(out):
    return {s: (out[s]["AP"], out[s]["AP50"], out[s]["AP75"], out[s]["aji"]) for s in ("all", "cto", "non_cto")}


def test_scene_flags_and_perfect_predictions():
    out = stratified_metrics(*_image(SCENE, SCENE), [1])
    assert out["cto_flags"][0].tolist() == SCENE_CTO
    assert out["cto"]["num_gt"] == 5 and out["non_cto"]["num_gt"] == 2 and out["all"]["num_gt"] == 7
    for s in ("all", "cto", "non_cto"):
        assert out[s]["AP"] == pytest.approx(100) and out[s]["aji"] == pytest.approx(1)


def test_perfect_on_isolated_missing_cto():
    out = stratified_metrics(*_image(SCENE, SCENE[5:]), [1])
    assert out["non_cto"]["AP"] == pytest.approx(100) and out["non_cto"]["aji"] == pytest.approx(1)
    assert out["cto"]["AP"] == 0 and out["cto"]["aji"] == 0
    assert 0 < out["all"]["AP"] < 100


def test_far_false_positive_charged_to_non_cto_only():
    far = _box(26, 29, 24, 29, H, W)  # touches no GT at all
    base = stratified_metrics(*_image(SCENE, SCENE), [1])
    out = stratified_metrics(*_image(SCENE, [far] + SCENE, scores=[1.0] + [0.5] * 7), [1])
    assert _key(out)["cto"] == _key(base)["cto"]
    assert out["non_cto"]["AP"] < 100 and out["non_cto"]["aji"] < 1


def test_false_positive_over_cto_cluster_charged_to_cto_only():
    merged = SCENE[2] | SCENE[3]  # one detection over two touching instances, IoU 0.5 with each
    base = stratified_metrics(*_image(SCENE, SCENE), [1])
    out = stratified_metrics(*_image(SCENE, [merged] + SCENE, scores=[1.0] + [0.5] * 7), [1])
    assert _key(out)["non_cto"] == _key(base)["non_cto"]
    assert out["cto"]["AP"] < 100 and out["cto"]["aji"] < 1


def test_no_cto_instance_anywhere():
    out = stratified_metrics(*_image(SCENE[5:], SCENE[5:]), [1])
    assert out["cto"]["AP"] == -100 and out["cto"]["aji"] == -1 and out["cto"]["num_gt"] == 0
    assert out["cto"]["per_category"][1]["aji"] is None
    assert out["non_cto"]["AP"] == pytest.approx(100)


def test_same_category_only_switch():
    cell, nucleus = _box(0, 12, 0, 12, H, W), _box(4, 8, 4, 8, H, W)
    data = _image([cell, nucleus], [cell, nucleus], gt_labels=[1, 2], det_labels=[1, 2])
    assert stratified_metrics(*data, [1, 2])["cto"]["num_gt"] == 0
    out = stratified_metrics(*data, [1, 2], same_category_only=False)
    assert out["cto"]["num_gt"] == 2 and out["cto"]["AP"] == pytest.approx(100)


def test_unknown_category_and_missing_masks_are_refused():
    with pytest.raises(ValueError, match="category ids"):
        stratified_metrics(*_image(SCENE, SCENE), [2])
    gts, dets = _image(SCENE, SCENE)
    del dets[0]["masks"]
    with pytest.raises(ValueError, match="masks"):
        stratified_metrics(gts, dets, [1])


# ----------------------------------------------------------------------------------------- pycocotools oracle
def _random_dataset(seed):
    """Clustered instances (many overlaps and touches), 2 categories, some crowd; detections: jittered
    GTs, merges, random blobs, score ties."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for i in range(int(rng.integers(1, 5))):
        h, w = int(rng.integers(16, 40)), int(rng.integers(16, 40))
        g = int(rng.integers(0, 10))
        masks = [_blob(rng, h, w) for _ in range(g)]
        masks = [m if m.any() else _box(0, 2, 0, 2, h, w) for m in masks]  # pycocotools dislikes area 0
        labels = rng.integers(1, 3, g).tolist()
        crowd = (rng.random(g) < 0.08).astype(int).tolist()
        dm, dl = [], []
        for m, c in zip(masks, labels):
            for _ in range(int(rng.integers(0, 3))):
                shift = [(0, 0), (0, 0), (0, 0), (0, 1), (1, 0), (-1, -1)][int(rng.integers(0, 6))]
                dm.append(np.roll(m, shift, axis=(0, 1)))
                dl.append(c if rng.random() < 0.9 else 3 - c)
        if g >= 2 and rng.random() < 0.5:
            dm.append(masks[0] | masks[1])
            dl.append(labels[0])
        for _ in range(int(rng.integers(0, 3))):
            dm.append(_blob(rng, h, w))
            dl.append(int(rng.integers(1, 3)))
        keep = [n for n, m in enumerate(dm) if m.any()]
        dm, dl = [dm[n] for n in keep], [dl[n] for n in keep]
        scores = rng.choice([0.3, 0.6, 0.9], len(dm)) if seed % 3 == 0 else rng.random(len(dm))
        gts.append({"image_id": 10 + i, "labels": labels, "iscrowd": crowd,
                    "masks": np.stack(masks) if g else np.zeros((0, h, w), bool)})
        dets.append({"labels": dl, "scores": scores,
                     "masks": np.stack(dm) if dm else np.zeros((0, h, w), bool)})
    return gts, dets


def _oracle(gts, dets, stratum, same_category_only=True):
    """pycocotools with 'area' = -1 for everything outside the stratum; returns (stats, per-category AP,
    the detections that stratum AP counts at IoU 0.5 per image id)."""
    gt = {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 2}]}
    results, det_index = [], []
    for g, d in zip(gts, dets):
        i, (_, h, w) = g["image_id"], g["masks"].shape
        gt["images"].append({"id": i, "height": h, "width": w})
        flags = _oracle_flags(g["masks"], g["labels"], g["iscrowd"], same_category_only)
        for n, (m, c, cr, f) in enumerate(zip(g["masks"], g["labels"], g["iscrowd"], flags)):
            inside = stratum == "all" or (f == (stratum == "cto") and not cr)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": c,
                                      "iscrowd": cr, "area": float(m.sum()) if inside else -1.0,
                                      "segmentation": mask_utils.encode(np.asfortranarray(m.astype(np.uint8))),
                                      "bbox": [0, 0, 1, 1]})
        for n, (m, c, s) in enumerate(zip(d["masks"], d["labels"], d["scores"])):
            touches_cto = any((m & gm).any() for gm, gc, f in zip(g["masks"], g["labels"], flags)
                              if f and gc == c)
            inside = stratum == "all" or touches_cto == (stratum == "cto")
            results.append({"image_id": i, "category_id": c, "score": float(s),
                            "segmentation": mask_utils.encode(np.asfortranarray(m.astype(np.uint8))),
                            "_area": float(m.sum()) if inside else -1.0})
            det_index.append((i, n))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if k != "_area"} for r in results])
        for n, r in enumerate(results):  # loadRes numbers results 1..N in order
            coco_dt.anns[n + 1]["area"] = r["_area"]
        ev = COCOeval(coco_gt, coco_dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    p = ev.eval["precision"]
    per_cat = {c: float(np.mean(p[:, :, k, 0, -1][p[:, :, k, 0, -1] > -1])) if (p[:, :, k, 0, -1] > -1).any()
               else -1.0 for k, c in enumerate(ev.params.catIds)}
    counted = {}
    for e in ev.evalImgs:
        if e is not None and e["aRng"] == [0, 1e10] and e["maxDet"] == 100:
            for did, ignored in zip(e["dtIds"], e["dtIgnore"][0]):
                if not ignored:
                    counted.setdefault(e["image_id"], set()).add(det_index[did - 1][1])
    return list(ev.stats), per_cat, counted


def _filtered_aji(gts, dets, stratum, counted, same_category_only=True):
    """`aji` on hand-filtered data: the stratum's GTs, the detections its AP counts at IoU 0.5."""
    fg, fd = [], []
    for g, d in zip(gts, dets):
        flags = _oracle_flags(g["masks"], g["labels"], g["iscrowd"], same_category_only)
        kg = [n for n in range(len(flags)) if not g["iscrowd"][n] and flags[n] == (stratum == "cto")]
        kd = sorted(counted.get(g["image_id"], ()))
        fg.append({"image_id": g["image_id"], "labels": [g["labels"][n] for n in kg], "masks": g["masks"][kg]})
        fd.append({"labels": [d["labels"][n] for n in kd], "scores": np.asarray(d["scores"])[kd],
                   "masks": d["masks"][kd]})
    return aji(fg, fd, [1, 2])


@pytest.mark.parametrize("seed", range(30))
def test_strata_match_pycocotools_and_filtered_aji(seed):
    gts, dets = _random_dataset(seed)
    if sum(len(d["labels"]) for d in dets) == 0:
        pytest.skip("pycocotools' loadRes cannot take zero results")
    same = seed % 5 != 4
    out = stratified_metrics(copy.deepcopy(gts), copy.deepcopy(dets), [1, 2], same_category_only=same)
    ref = instance_metrics(gts, dets, [1, 2])
    assert out["all"]["stats"] == ref["stats"] and out["all"]["aji"] == ref["aji"]["mean"]
    for stratum in ("all", "cto", "non_cto"):
        stats, per_cat, counted = _oracle(gts, dets, stratum, same)
        np.testing.assert_allclose(out[stratum]["stats"], stats, atol=TOL, rtol=0)
        for c in (1, 2):
            assert abs(out[stratum]["per_category"][c]["AP"] - per_cat[c]) <= TOL
        if stratum != "all":
            expected = _filtered_aji(gts, dets, stratum, counted, same)
            assert abs(out[stratum]["aji"] - expected["mean"]) <= TOL, (stratum, out[stratum]["aji"], expected)
            for c in (1, 2):
                got, want = out[stratum]["per_category"][c]["aji"], expected["per_category"][c]
                assert (got is None) == (want is None) and (got is None or abs(got - want) <= TOL)
