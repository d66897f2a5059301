"""gains.evaluation on images larger than a tile: predicted tile by tile at the original size by the
Predictor, scored from runs (never dense [N,H,W]); small images keep the batched path and its numbers; the
metrics accept MaskRuns / RLE / CropMasks masks wherever they accept dense ones, with identical results."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from conftest import ellipse, square, write_coco
from gains.data import build_dataset
from gains.evaluation import evaluate_model, evaluate_results
from gains.scoring import MetricAccumulator
from gains.instances import CropMasks
from gains.metrics import evaluate_instances, instance_metrics
from gains.cto import stratified_metrics
from gains.mask_runs import runs_from_rles
from test_evaluation import PerfectModel, random_instances, rect_cfg, rect_dataset, tiny_model_cfg

CATEGORIES = [{"id": 3, "name": "Cell"}, {"id": 7, "name": "Nuclei"}]
TILING = ("test.tile_size=64", "test.tile_overlap=16")


def mixed_dataset(root):
    """A 150x200 image (larger than a 64 px tile: overlapping cells, nuclei, a crowd region) and a 40x48 one."""
    images = [{"id": 5, "file_name": "big.png", "height": 150, "width": 200},
              {"id": 9, "file_name": "small.png", "height": 40, "width": 48}]
    anns = [
        {"id": 1, "image_id": 5, "category_id": 3, "segmentation": [ellipse(40, 40, 20, 14)], "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 3, "segmentation": [ellipse(75, 40, 19, 12)], "iscrowd": 0},
        {"id": 3, "image_id": 5, "category_id": 3, "segmentation": [square(120, 90, 40)], "iscrowd": 0},
        {"id": 4, "image_id": 5, "category_id": 7, "segmentation": [ellipse(40, 40, 6, 5)], "iscrowd": 0},
        {"id": 5, "image_id": 5, "category_id": 7, "segmentation": [square(170, 10, 12)], "iscrowd": 0},
        {"id": 6, "image_id": 5, "category_id": 3, "segmentation": [[0, 120, 30, 120, 30, 149, 0, 149]],
         "iscrowd": 1},
        {"id": 7, "image_id": 9, "category_id": 3, "segmentation": [square(4, 4, 16)], "iscrowd": 0},
        {"id": 8, "image_id": 9, "category_id": 7, "segmentation": [square(7, 6, 5)], "iscrowd": 0},
    ]
    write_coco(root, images, anns, CATEGORIES, name="test")
    return root


pytestmark = pytest.mark.filterwarnings("ignore:objects up to:UserWarning")  # tiny tiles, on purpose


def test_large_image_is_tiled_and_scored_from_runs(tmp_path, monkeypatch):
    import gains.evaluation as evaluation
    from gains.model import build_model

    root = mixed_dataset(tmp_path / "data")
    cfg = tiny_model_cfg(root, "test.score_thresh=0.0", "model.roi_heads.score_thresh_test=0.0", *TILING)
    dense_calls = []
    real_gt = evaluation.gt_instances
    monkeypatch.setattr(evaluation, "gt_instances",
                        lambda record, as_runs=False: dense_calls.append((record.image_id, as_runs))
                        or real_gt(record, as_runs))
    torch.manual_seed(0)
    model = build_model(cfg)
    m = evaluate_model(model, cfg, "test", tmp_path / "out", verbose=False)
    assert sorted(dense_calls) == [(5, True), (9, False)]  # the large image never gets dense GT masks
    assert m["num_images"] == 2 and m["tiled_images"] == [5]
    assert any("tile by tile" in n and "[5]" in n and "each tile resized by their whole image's test resize" in n
               for n in m["notes"])  # the scale the tiles were seen at (no data.crop_size: the image's own)
    assert json.loads((tmp_path / "out/metrics.json").read_text())["tiled_images"] == [5]
    results = json.loads((tmp_path / "out/results_test.json").read_text())
    assert len(results) == m["num_detections"] > 0
    big = [r for r in results if r["image_id"] == 5]
    assert big and all(r["segmentation"]["size"] == [150, 200] and isinstance(r["segmentation"]["counts"], str)
                       for r in big)
    assert all(r["segmentation"]["size"] == [40, 48] for r in results if r["image_id"] == 9)
    assert "strata" in m and m["strata"]["cto"]["num_gt"] == 2  # the two overlapping cells of the large image
    assert (tmp_path / "out/vis/image_5.png").is_file() or (tmp_path / "out/vis/image_9.png").is_file()
    # the results file rescored through the dense --gt/--pred path gives the same numbers
    gt = json.loads((root / "test.json").read_text())
    again = evaluate_results(gt, results, score_thresh=0.0, split="test")
    for key in ("mAP", "AP50", "AP75", "aji", "aji_kumar", "aji_plus", "box_AP"):
        assert again[key] == pytest.approx(m[key], abs=1e-9), key


def test_tiled_vis_is_drawn_from_label_images(tmp_path):
    from gains.model import build_model

    root = mixed_dataset(tmp_path / "data")
    cfg = tiny_model_cfg(root, "test.score_thresh=0.0", "test.vis=2", *TILING)
    torch.manual_seed(0)
    evaluate_model(build_model(cfg), cfg, "test", tmp_path / "out", verbose=False)
    assert sorted(p.name for p in (tmp_path / "out/vis").glob("*.png")) == ["image_5.png", "image_9.png"]


def test_small_images_keep_their_exact_numbers(tmp_path):
    root = rect_dataset(tmp_path / "data")
    out = {}
    for tiling in ("never", "auto"):
        cfg = rect_cfg(root, "test.vis=0", "test.score_thresh=0.0", f"test.tiling={tiling}")
        model = PerfectModel(build_dataset(cfg, "test", is_train=False))
        out[tiling] = (evaluate_model(model, cfg, "test", tmp_path / tiling, verbose=False),
                       (tmp_path / tiling / "results_test.json").read_bytes())
    assert out["never"] == out["auto"] and "tiled_images" not in out["auto"][0]


def _as_rles(masks):
    return [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["runs", "rles", "crops"])
def test_run_inputs_equal_dense_inputs(seed, kind):
    gts, dets = random_instances(np.random.default_rng(seed), n_images=5, h=24, w=20)
    dets = [{**d, "masks": np.asarray(d["masks"], bool)} for d in dets]  # an empty one is float

    def convert(d):
        m = np.asarray(d["masks"], bool)
        h, w = m.shape[1:]
        if kind == "runs":
            return {**d, "masks": runs_from_rles(_as_rles(m), h, w)}
        if kind == "rles":
            return {**d, "masks": _as_rles(m)}
        return {**d, "masks": CropMasks.from_dense(m)}

    gts2, dets2 = [convert(g) for g in gts], [convert(d) for d in dets]
    ref, got = instance_metrics(gts, dets, [1, 2], "gains"), instance_metrics(gts2, dets2, [1, 2], "gains")
    assert got["stats"] == ref["stats"]
    assert np.array_equal(got["precision"], ref["precision"])
    for key in ("aji", "aji_kumar", "aji_plus"):
        assert got[key]["mean"] == ref[key]["mean"] and got[key]["per_category"] == ref[key]["per_category"]
    box_ref = evaluate_instances(gts, dets, [1, 2], "bbox")
    assert evaluate_instances(gts2, dets2, [1, 2], "bbox")["stats"] == box_ref["stats"]
    s_ref, s_got = stratified_metrics(gts, dets, [1, 2]), stratified_metrics(gts2, dets2, [1, 2])
    for stratum in ("all", "cto", "non_cto"):
        assert s_got[stratum]["stats"] == s_ref[stratum]["stats"]
        assert s_got[stratum]["aji"] == s_ref[stratum]["aji"] and s_got[stratum]["num_gt"] == s_ref[stratum]["num_gt"]
    # the evaluator's accumulator too, one image at a time
    a, b = MetricAccumulator(), MetricAccumulator()
    for g, d, g2, d2 in zip(gts, dets, gts2, dets2):
        a.add(g, d)
        b.add(g2, d2)
    ra, rb = a.compute([1, 2], "clean"), b.compute([1, 2], "clean")
    assert ra["segm"]["stats"] == rb["segm"]["stats"] and ra["aji"]["mean"] == rb["aji"]["mean"]
    assert ra["strata"]["cto"]["stats"] == rb["strata"]["cto"]["stats"]


def test_mixed_pixel_orders_are_refused_with_a_clear_message():
    m = np.zeros((1, 6, 5), bool)
    m[0, 1:3, 1:4] = True
    gt = {"labels": [1], "masks": m}
    with pytest.raises(ValueError, match="pixel orders"):
        instance_metrics([gt], [{"labels": [1], "scores": [0.5], "masks": _as_rles(m)}], [1])
    with pytest.raises(ValueError, match="one common 'size'"):
        instance_metrics([{"labels": [1, 1], "masks": _as_rles(m) + _as_rles(np.zeros((1, 4, 4), bool))}],
                         [{"labels": [], "scores": [], "masks": []}], [1])


def test_results_file_mode_scores_a_large_field_without_dense_masks():
    """`evaluate.py --gt --pred` (evaluate_results) on a 4000 x 4000 field with 60 nuclei: scored from RLE runs,
    so memory follows the instances, not N x H x W (dense it would hold 2 x 60 x 16 MB = 1.9 GB); the numbers
    are pycocotools' (a perfect copy scores 100, a shifted half scores what COCOeval gives)."""
    import tracemalloc

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    h = w = 4000
    anns = [{"id": i + 1, "image_id": 1, "category_id": 7, "iscrowd": 0,
             "segmentation": [ellipse(200 + 450 * (i % 8), 200 + 450 * (i // 8), 30 + i % 7, 22 + i % 5)]}
            for i in range(60)]
    gt = {"images": [{"id": 1, "file_name": "field.tif", "height": h, "width": w}],
          "categories": [{"id": 7, "name": "Nuclei"}], "annotations": anns}
    results = []
    for i, a in enumerate(anns):
        poly = np.array(a["segmentation"][0], float).reshape(-1, 2) + (6.0 if i % 2 else 0.0)
        rle = mask_utils.merge(mask_utils.frPyObjects([poly.ravel().tolist()], h, w))
        rle["counts"] = rle["counts"].decode()
        results.append({"image_id": 1, "category_id": 7, "score": 0.5 + i / 200, "segmentation": rle})
    tracemalloc.start()
    m = evaluate_results(gt, results, split="field")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200e6, f"peak {peak / 1e6:.0f} MB: something built full-size masks"  # dense: 3.2 GB

    coco = COCO()
    coco.dataset = {**gt, "annotations": [{**a, "area": float(mask_utils.area(mask_utils.merge(
        mask_utils.frPyObjects(a["segmentation"], h, w)))), "bbox": list(mask_utils.toBbox(mask_utils.merge(
            mask_utils.frPyObjects(a["segmentation"], h, w))))} for a in anns]}
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert m["mAP"] == pytest.approx(100 * ev.stats[0], abs=1e-9) and 0 < m["mAP"] < 100


PAPER_CONFIGS = ("isbi_r50", "isbi_r101", "ucoc_r50", "ucoc_r101", "kaggle_r50", "kaggle_r101")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_evaluate_whole_images_with_100_detections(name):
    """The authors' evaluation: detectron2 runs whole images (100 detections) and their evaluator scores the
    top 100 per image and category; base.yaml's tiling (512-px tiles) would tile UCOC's and Kaggle's
    480x640 / 600x400 inputs and cap them at 300."""
    from gains.config import CONFIG_DIR, load_config
    from gains.predictor import Predictor
    from test_tiling import FakeSegmenter

    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert (cfg.test.max_dets_eval, cfg.test.tiling, cfg.test.detections_per_tile) == (100, "never", None)
    predictor = Predictor.from_config(FakeSegmenter(), cfg, progress=False, device="cpu")
    assert not any(predictor._tiles(h, w) for h, w in ((480, 640), (600, 400), (512, 512), (1000, 1000)))
    base = load_config(None)
    assert base.test.max_dets_eval is None and Predictor.from_config(FakeSegmenter(), base)._tiles(480, 640)


def test_a_paper_config_evaluates_a_large_image_whole(tmp_path):
    """isbi_r50.yaml's own test section (tiny model and data swapped in): the 150x200 image that base.yaml's
    settings tile (test_large_image_is_tiled_and_scored_from_runs) takes the whole-image path."""
    from gains.config import CONFIG_DIR, load_config
    from gains.model import build_model

    root = mixed_dataset(tmp_path / "data")
    overrides = [f"data.root={root}", "data.num_workers=0", "device=cpu", "model.mode=mask_rcnn",
                 "model.backbone.depth=18", "model.backbone.norm=gn", "model.backbone.freeze_at=0",
                 "model.backbone.fpn_channels=32", "model.roi_heads.fc_dim=64", "model.roi_heads.mask_conv_dim=32",
                 "data.min_size_test=64", "data.max_size_test=64",
                 "test.vis=0", "test.score_thresh=0.0", "model.roi_heads.score_thresh_test=0.0", *TILING]
    cfg = load_config(CONFIG_DIR / "isbi_r50.yaml", overrides)
    torch.manual_seed(0)
    m = evaluate_model(build_model(cfg), cfg, "test", tmp_path / "out", verbose=False)
    assert "tiled_images" not in m and m["max_dets_eval"] == 100 and m["coco_max_dets"] == [1, 10, 100]
    results = json.loads((tmp_path / "out/results_test.json").read_text())
    assert 0 < sum(r["image_id"] == 5 for r in results) <= 100  # the model's own cap, as detectron2
