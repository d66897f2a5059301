"""gains.evaluation / gains.inference: model runs scored at the original resolution, results files, errors.

The "perfect predictor" returns each image's ground truth (rectangles, exactly representable by an all-ones
28x28 mask) in the RESIZED image's coordinates; scoring it must give mAP 100 and AJI 1, which checks the box
rescaling, the mask pasting, the category-id mapping and the score threshold end to end.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn

from conftest import square, write_coco
from gains import dist
from gains.config import load_config
from gains.data import build_dataset
from gains.errors import DataError
from gains.evaluation import EvaluationError, evaluate_model, evaluate_results, format_table, gt_instances
from gains.inference import postprocess, shard_indices
from gains.scoring import MetricAccumulator, cell_nuclei_pair
from gains.metrics import evaluate_instances, instance_metrics
from gains.transforms import masks_to_boxes

CATEGORIES = [{"id": 3, "name": "Cell"}, {"id": 7, "name": "Nuclei"}]  # json ids far from labels 1, 2


def rect_dataset(root, name="test"):
    """Three images of different sizes: overlapping cells with nuclei (json ids 3/7), a crowd region, and
    an image without annotations."""
    images = [{"id": 11, "file_name": "a.png", "height": 40, "width": 48},
              {"id": 12, "file_name": "b.png", "height": 30, "width": 50},
              {"id": 13, "file_name": "c.png", "height": 36, "width": 36}]
    anns = [
        {"id": 1, "image_id": 11, "category_id": 3, "segmentation": [square(4, 4, 16)], "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 3, "segmentation": [square(12, 10, 18)], "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 7, "segmentation": [square(7, 6, 5)], "iscrowd": 0},
        {"id": 4, "image_id": 11, "category_id": 7, "segmentation": [square(18, 16, 6)], "iscrowd": 0},
        {"id": 5, "image_id": 12, "category_id": 3, "segmentation": [square(30, 3, 14)], "iscrowd": 0},
        {"id": 6, "image_id": 12, "category_id": 7, "segmentation": [square(2, 2, 8)], "iscrowd": 0},
        {"id": 7, "image_id": 12, "category_id": 3, "segmentation": [[0, 20, 10, 20, 10, 29, 0, 29]],
         "iscrowd": 1},
    ]
    write_coco(root, images, anns, CATEGORIES, name=name)
    return root


def rect_cfg(root, *overrides):
    return load_config(None, [f"data.root={root}", "data.num_workers=0", "device=cpu", "model.num_classes=2",
                              "data.min_size_test=64", "data.max_size_test=128", "test.vis=1", *overrides])


def image_key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


class PerfectModel(nn.Module):
    """Answers each (resized) image with its ground truth, scores 0.9, 0.89, ..., plus one junk detection at
    score 0.01 (below test.score_thresh). The crowd region is predicted too: AP ignores a detection on it,
    while AJI (gains.aji) counts a crowd annotation as an ordinary instance. `seen` records the image ids."""

    def __init__(self, dataset):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.records, self.cmap, self.keys, self.seen = {}, dataset.category_map, {}, []
        for i, record in enumerate(dataset.records):
            self.keys[image_key(dataset[i][0])] = record

    def forward(self, images, targets=None):
        assert not self.training
        out = []
        for image in images:
            record = self.keys[image_key(image.cpu())]
            self.seen.append(record.image_id)
            gt = gt_instances(record)
            boxes = masks_to_boxes(torch.from_numpy(gt["masks"]))
            h, w = image.shape[-2:]
            scale = torch.tensor([w / record.width, h / record.height] * 2)
            n = len(boxes)
            out.append({
                "boxes": torch.cat([boxes * scale, torch.tensor([[1.0, 1.0, 9.0, 9.0]])]),
                "labels": torch.tensor([self.cmap.to_label(c) for c in gt["labels"]] + [1]),
                "scores": torch.cat([0.9 - 0.01 * torch.arange(n, dtype=torch.float32), torch.tensor([0.01])]),
                "masks": torch.ones((n + 1, 1, 28, 28))})
        return out


@pytest.fixture
def rect_data(tmp_path):
    return rect_dataset(tmp_path / "data")


def test_perfect_predictor_scores_100_and_aji_1(rect_data, tmp_path, capsys):
    cfg = rect_cfg(rect_data)
    model = PerfectModel(build_dataset(cfg, "test", is_train=False))
    m = evaluate_model(model, cfg, "test", tmp_path / "out")
    assert (m["mAP"], m["AP50"], m["AP75"], m["box_AP"]) == pytest.approx((100, 100, 100, 100))
    assert (m["aji"], m["aji_kumar"], m["aji_plus"]) == pytest.approx((1, 1, 1))
    assert m["num_images"] == 3 and m["num_detections"] == 7 and m["notes"] == []
    assert set(m["per_category"]) == {"Cell", "Nuclei"}
    assert m["per_category"]["Nuclei"]["category_id"] == 7 and m["per_category"]["Nuclei"]["mAP"] == 100
    assert m["cell_nuclei_average"]["mAP"] == 100 and m["cell_nuclei_average"]["aji"] == 1
    assert sorted(model.seen) == [11, 12, 13]
    # the two overlapping cells of image 11 are the CTO stratum; the other 4 non-crowd GTs are not
    assert (m["strata"]["cto"]["num_gt"], m["strata"]["non_cto"]["num_gt"]) == (2, 4)
    assert m["strata"]["cto"]["mAP"] == 100 and m["strata"]["non_cto"]["aji"] == pytest.approx(1)
    assert json.loads((tmp_path / "out/metrics.json").read_text())["mAP"] == 100
    assert (tmp_path / "out/vis/image_11.png").is_file()
    table = capsys.readouterr().out
    assert "aji mode 'clean'" in table and "score >= 0.05" in table and "Cell/Nuclei mean" in table
    assert "CTO instances" in table and "non-CTO instances" in table

    results = json.loads((tmp_path / "out/results_test.json").read_text())
    assert {r["category_id"] for r in results} == {3, 7} and {r["image_id"] for r in results} == {11, 12}
    assert all(isinstance(r["segmentation"]["counts"], str) and len(r["bbox"]) == 4 for r in results)
    # the results file alone reproduces the numbers (the --gt/--pred path)
    gt = json.loads((rect_data / "test.json").read_text())
    again = evaluate_results(gt, results)
    assert (again["mAP"], again["aji"]) == pytest.approx((100, 1))


def test_score_threshold_is_applied_before_scoring(rect_data, tmp_path):
    cfg = rect_cfg(rect_data, "test.score_thresh=0.0", "test.vis=0", "test.aji_mode=gains")
    model = PerfectModel(build_dataset(cfg, "test", is_train=False))
    m = evaluate_model(model, cfg, "test", tmp_path / "out", verbose=False)
    assert m["num_detections"] == 10  # the three junk detections are now kept
    assert m["mAP"] == pytest.approx(100)  # last-ranked false positives do not lower interpolated AP ...
    assert m["aji"] < 1 and m["aji_mode"] == "gains"  # ... but they add their area to the AJI union
    assert not (tmp_path / "out/vis").exists()


def test_evaluation_restores_train_mode_and_rejects_other_categories(rect_data, tmp_path):
    from gains.annotations import CategoryMap

    cfg = rect_cfg(rect_data, "test.vis=0")
    model = PerfectModel(build_dataset(cfg, "test", is_train=False)).train()
    evaluate_model(model, cfg, "test", tmp_path / "out", verbose=False)
    assert model.training
    with pytest.raises(EvaluationError, match=r"trained on categories \[1, 2\].*declares \[3, 7\]"):
        evaluate_model(model, cfg, "test", tmp_path / "x", expected_category_map=CategoryMap((1, 2), ("a", "b")))
    assert not (tmp_path / "x").exists()


def test_postprocess_rescales_boxes_and_pastes_at_original_size():
    det = {"boxes": torch.tensor([[8.0, 16.0, 40.0, 48.0], [0.0, 0.0, 4.0, 4.0]]),
           "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.7, 0.02]), "masks": torch.ones(2, 1, 28, 28)}
    out = postprocess(det, (64, 80), (32, 40), score_thresh=0.05)
    assert out["boxes"].tolist() == [[4.0, 8.0, 20.0, 24.0]] and out["labels"].tolist() == [2]
    assert out["masks"].shape == (1, 32, 40) and out["masks"].dtype == torch.bool
    expected = torch.zeros(32, 40, dtype=torch.bool)
    expected[8:24, 4:20] = True
    assert torch.equal(out["masks"][0], expected)


def test_shards_cover_every_index_once():
    for n in (0, 1, 5, 8):
        for world in (1, 2, 3):
            parts = [shard_indices(n, r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))


def random_instances(rng, n_images=4, h=24, w=20):
    gts, dets = [], []
    for i in range(n_images):
        g, d = int(rng.integers(0, 5)), int(rng.integers(0, 7))
        gm = rng.random((g, h, w)) < 0.3
        dm = np.array([m | (rng.random((h, w)) < 0.1) for m in gm[: min(g, d)]] +
                      [rng.random((h, w)) < 0.3 for _ in range(d - min(g, d))]).reshape(d, h, w)
        box = lambda m: [0.0, 0.0, 1.0, 1.0] if not m.any() else list(mask_utils.toBbox(  # noqa: E731
            mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))))
        gts.append({"image_id": 10 - i, "labels": rng.integers(1, 3, g), "masks": gm,
                    "iscrowd": rng.random(g) < 0.15, "areas": gm.sum((1, 2)) * 1.0,
                    "boxes_xywh": np.array([box(m) for m in gm]).reshape(-1, 4)})
        dets.append({"labels": rng.integers(1, 3, d), "scores": rng.random(d).round(2), "masks": dm,
                     "boxes_xywh": np.array([box(m) for m in dm]).reshape(-1, 4)})
    return gts, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_accumulator_equals_instance_metrics(seed):
    gts, dets = random_instances(np.random.default_rng(seed))
    acc = MetricAccumulator()
    for g, d in zip(gts, dets):
        acc.add(g, d)
    got = acc.compute([1, 2], "gains")
    ref = instance_metrics(gts, dets, [1, 2], aji_mode="gains")
    box = evaluate_instances(gts, dets, [1, 2], iou_type="bbox")
    np.testing.assert_allclose(got["segm"]["stats"], ref["stats"], atol=1e-12)
    np.testing.assert_allclose(got["bbox"]["stats"], box["stats"], atol=1e-12)
    for kind in ("aji", "aji_kumar", "aji_plus"):
        assert got[kind]["mean"] == pytest.approx(ref[kind]["mean"], abs=1e-12)


def test_cell_nuclei_detection_and_table_of_empty_predictions(rect_data):
    assert cell_nuclei_pair(["Cell", "Nuclei"]) == (0, 1)
    assert cell_nuclei_pair(["cytoplasm cell", "nucleus"]) == (0, 1)
    assert cell_nuclei_pair(["chromosome"]) is None and cell_nuclei_pair(["cell", "cell2", "nuclei"]) is None
    gt = json.loads((rect_data / "test.json").read_text())
    m = evaluate_results(gt, [])
    assert (m["mAP"], m["AP50"], m["aji"], m["aji_plus"]) == (0, 0, 0, 0)
    assert "no predictions" in m["notes"][0] and "no predictions" in format_table(m)


def test_results_errors_name_the_ids(rect_data):
    gt = json.loads((rect_data / "test.json").read_text())
    rle = mask_utils.encode(np.asfortranarray(np.ones((40, 48), np.uint8)))
    ok = {"image_id": 11, "category_id": 3, "score": 0.5,
          "segmentation": {"size": [40, 48], "counts": rle["counts"].decode()}}
    with pytest.raises(DataError, match=r"image ids \[99\].*not in the ground truth"):
        evaluate_results(gt, [ok, {**ok, "image_id": 99}])
    with pytest.raises(DataError, match=r"category ids \[1\].*json category ids"):
        evaluate_results(gt, [ok, {**ok, "category_id": 1}])
    with pytest.raises(DataError, match="RLE size"):
        evaluate_results(gt, [{**ok, "image_id": 12}])
    with pytest.raises(DataError, match="result #0 lacks category_id, segmentation"):
        evaluate_results(gt, [{"image_id": 11, "score": 1}])
    bad = {**gt, "annotations": [{**gt["annotations"][0], "id": 0}] + gt["annotations"][1:]}
    with pytest.raises(DataError, match="id 0.*>= 1"):
        evaluate_results(bad, [ok])


# ----------------------------------------------------------------------------------------------- real model
def tiny_model_cfg(root, *overrides):
    """R18-FPN with small heads on 64 px synthetic images: a forward pass takes a fraction of a second."""
    return load_config(None, [f"data.root={root}", "data.num_workers=0", "device=cpu", "model.mode=mask_rcnn",
                              "model.num_classes=2", "model.backbone.depth=18", "model.backbone.norm=gn",
                              "model.backbone.freeze_at=0", "model.backbone.fpn_channels=32",
                              "model.roi_heads.fc_dim=64", "model.roi_heads.mask_conv_dim=32",
                              "data.min_size_test=64", "data.max_size_test=64", "test.vis=1", *overrides])


@pytest.fixture
def synthetic_root(tmp_path):
    from gains.synthetic import make_synthetic_dataset
    make_synthetic_dataset(tmp_path / "syn", num_train=2, num_val=1, num_test=3, image_size=(64, 64))
    return tmp_path / "syn"


def test_real_tiny_model_writes_metrics_results_and_vis(synthetic_root, tmp_path):
    from gains.model import build_model

    cfg = tiny_model_cfg(synthetic_root, "test.score_thresh=0.0")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # an untrained model that still detects: every proposal scores high as class 1
        model.roi_heads.box_head.cls_score.bias.copy_(torch.tensor([-6.0, 6.0, 0.0]))
    m = evaluate_model(model, cfg, "test", tmp_path / "out", verbose=False)
    assert m["num_images"] == 3 and m["split"] == "test"
    for key in ("mAP", "AP50", "AP75", "aji", "aji_kumar", "aji_plus", "box_AP", "per_category", "segm_stats"):
        assert key in m
    results = json.loads((tmp_path / "out/results_test.json").read_text())
    assert m["num_detections"] > 0 and len(results) == m["num_detections"]
    assert all(r["image_id"] in (1, 2, 3) for r in results)
    assert 0 <= m["mAP"] <= 100 and 0 <= m["aji"] <= 1
    assert (tmp_path / "out/metrics.json").is_file() and len(list((tmp_path / "out/vis").glob("*.png"))) == 1


# ----------------------------------------------------------------------------------------------- two ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_distributed()
        cfg = rect_cfg(root, "test.vis=0")
        model = PerfectModel(build_dataset(cfg, "test", is_train=False))
        m = evaluate_model(model, cfg, "test", out, verbose=False)
        with open(f"{out}_rank{rank}.json", "w") as f:
            json.dump({"seen": model.seen, "metrics": m}, f)
    finally:
        dist.destroy_distributed()


@pytest.mark.slow
def test_two_process_gloo_scores_every_image_exactly_once(rect_data, tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(rect_data), out), nprocs=2, join=True)
    ranks = [json.loads(open(f"{out}_rank{r}.json").read()) for r in range(2)]
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == [11, 12, 13]
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    assert ranks[1]["metrics"] == {} and ranks[0]["metrics"]["num_images"] == 3
    assert ranks[0]["metrics"]["mAP"] == pytest.approx(100) and ranks[0]["metrics"]["aji"] == pytest.approx(1)
    results = json.loads((tmp_path / "ddp/results_test.json").read_text())
    assert sorted({r["image_id"] for r in results}) == [11, 12] and len(results) == 7


def test_overlays_draw_only_confident_detections(rect_data, tmp_path, monkeypatch):
    import gains.evaluation as evaluation_module
    drawn = []
    monkeypatch.setattr(evaluation_module, "save_instance_panels", lambda image, panels, path, title="": drawn.append(panels))
    cfg = rect_cfg(rect_data, "test.vis=1", "test.vis_score_thresh=0.895")
    evaluate_model(PerfectModel(build_dataset(cfg, "test", is_train=False)), cfg, "test", tmp_path / "o")
    (gt_title, gt_masks), (pred_title, pred_masks) = drawn[0]
    # image 11 has 4 GT answered with scores 0.9, 0.89, 0.88, 0.87: only the first passes 0.895
    assert len(gt_masks) == 4 and len(pred_masks) == 1 and "score >= 0.895" in pred_title


# ----------------------------------------------------------------------------------------------- detection cap
def crowded_field(seed: int = 0):
    """A COCO gt dict and results: image 42 holds 144 nuclei (6x6 squares on an 8-px grid, ~190 nuclei per
    frame being the case that exposed the cap), image 43 holds 20; one result per nucleus (shifted 0-1 px,
    random scores) plus 10 false positives per image. bbox fields included (box AP)."""
    rng = np.random.default_rng(seed)
    images = [{"id": 42, "height": 100, "width": 100}, {"id": 43, "height": 100, "width": 100}]
    anns, results = [], []

    def rle_of(x, y, s):
        m = np.zeros((100, 100), np.uint8)
        m[y:y + s, x:x + s] = 1
        r = mask_utils.encode(np.asfortranarray(m))
        return {"size": [100, 100], "counts": r["counts"].decode()}

    for image_id, n in ((42, 144), (43, 20)):
        for k in range(n):
            x, y = 2 + 8 * (k % 12), 2 + 8 * (k // 12)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "segmentation": rle_of(x, y, 6), "area": 36.0, "bbox": [x, y, 6, 6]})
            dx, dy = (int(v) for v in rng.integers(0, 2, 2))
            results.append({"image_id": image_id, "category_id": 1, "score": float(rng.random()),
                            "segmentation": rle_of(x + dx, y + dy, 6), "bbox": [x + dx, y + dy, 6, 6]})
        for _ in range(10):
            x, y = (int(v) for v in rng.integers(0, 94, 2))
            results.append({"image_id": image_id, "category_id": 1, "score": float(rng.random() * 0.5),
                            "segmentation": rle_of(x, y, 5), "bbox": [x, y, 5, 5]})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nucleus"}]}
    return gt, results


def pycocotools_segm(gt, results, max_dets):
    """(stats with stats[0] = AP at the largest maxDets, as ours) from pycocotools with `max_dets`."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([{k: v for k, v in r.items() if k != "bbox"} for r in results]), "segm")
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    p = ev.eval["precision"][:, :, :, 0, -1]
    return [float(np.mean(p[p > -1]))] + list(ev.stats[1:])


def test_cap_is_pycocotools_maxdets_and_every_aji_follows_it():
    gt, results = crowded_field()
    capped = evaluate_results(gt, results, max_dets=100)
    wide = evaluate_results(gt, results, max_dets=1000)
    uncapped = evaluate_results(gt, results)  # None: no cap (base.yaml)
    for m, max_dets in ((capped, (1, 10, 100)), (wide, (1, 10, 1000)), (uncapped, (1, 10, 154))):
        assert m["coco_max_dets"] == list(max_dets)
        ref = pycocotools_segm(gt, results, max_dets)
        got = [np.nan if v is None else v / 100 for v in m["segm_stats"].values()]  # None: -1 (no large GT)
        np.testing.assert_allclose(got, np.where(np.array(ref) < 0, np.nan, ref), atol=1e-12)
        assert m["mAP"] == pytest.approx(100 * ref[0], abs=1e-10)
    assert wide["max_dets_eval"] == 1000 and uncapped["max_dets_eval"] is None
    assert list(wide["segm_stats"])[6:9] == ["AR1", "AR10", "AR1000"]  # the summary names the cap in use
    assert list(uncapped["segm_stats"])[6:9] == ["AR1", "AR10", "AR154"]  # 154: the most of one image
    # nothing is truncated without a cap; at 100, 44 nuclei of image 42 can never be matched
    assert uncapped["AP50"] == wide["AP50"] > capped["AP50"] + 10
    for kind in ("aji", "aji_kumar", "aji_plus"):  # every AJI scores the same top 100 as AP
        assert uncapped[kind] == pytest.approx(wide[kind], abs=1e-15) and capped[kind] < uncapped[kind] - 0.05, kind
    # the same numbers as the in-memory metrics with that cap, AJI variants included
    from gains.metrics import aji, aji_kumar, aji_plus
    gts, dets = [], []
    for image_id in (42, 43):
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
        rs = [r for r in results if r["image_id"] == image_id]
        gts.append({"image_id": image_id, "labels": [1] * len(anns), "masks": [a["segmentation"] for a in anns]})
        dets.append({"labels": [1] * len(rs), "scores": [r["score"] for r in rs],
                     "masks": [r["segmentation"] for r in rs]})
    assert capped["aji"] == pytest.approx(aji(gts, dets, [1], max_dets=100)["mean"], abs=1e-15)
    assert capped["aji_kumar"] == pytest.approx(aji_kumar(gts, dets, [1], max_dets=100)["mean"], abs=1e-15)
    assert capped["aji_plus"] == pytest.approx(aji_plus(gts, dets, [1], max_dets=100)["mean"], abs=1e-15)


def test_cap_warns_names_the_image_and_shows_in_the_table():
    gt, results = crowded_field()
    with pytest.warns(UserWarning) as caught:
        capped = evaluate_results(gt, results, max_dets=100)
    messages = [str(w.message) for w in caught]
    assert any("1 image(s) have more ground-truth instances of one category than the evaluation cap "
               "test.max_dets_eval (evaluate.py --max-dets)=100 (most: image id 42, category 1: 144)" in m
               and "to null (none) or above 144" in m for m in messages), messages
    assert any("more detections of one category" in m and "image id 42, category 1: 154" in m for m in messages)
    assert capped["notes"][:2] == [m for m in messages if "evaluation cap" in m]  # in metrics.json too
    table = format_table(capped)
    assert "top 100 per image and category, maxDets=100" in table and "AR100" in table
    import warnings as warnings_module
    with warnings_module.catch_warnings():
        warnings_module.simplefilter("error")  # no cap, or a cap above every image: silent
        uncapped = evaluate_results(gt, results)
        evaluate_results(gt, results, max_dets=200)
    assert "no cap: every detection, maxDets=154" in format_table(uncapped) and not uncapped["notes"]
    for bad in (5, 0, 2.5, "100"):
        with pytest.raises(EvaluationError, match=r"max_dets \(evaluate\.py --max-dets\) must be null.*>= 10"):
            evaluate_results(gt, results, max_dets=bad)


def test_model_evaluation_reads_the_cap_from_the_config(rect_data, tmp_path):
    cfg = rect_cfg(rect_data, "test.vis=0", "test.max_dets_eval=10")
    model = PerfectModel(build_dataset(cfg, "test", is_train=False))
    m = evaluate_model(model, cfg, "test", tmp_path / "out", verbose=False)
    assert m["max_dets_eval"] == 10 and m["coco_max_dets"] == [1, 10, 10] and m["mAP"] == pytest.approx(100)
    assert json.loads((tmp_path / "out/metrics.json").read_text())["max_dets_eval"] == 10
    with pytest.raises(EvaluationError, match=r"test\.max_dets_eval must be null .*got 3"):
        evaluate_model(model, rect_cfg(rect_data, "test.max_dets_eval=3"), "test", tmp_path / "bad", verbose=False)
    assert not (tmp_path / "bad").exists() and len(model.seen) == 3  # refused before predicting anything
