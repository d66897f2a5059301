"""evaluate.py: the three modes (--ckpt, --gt/--pred, --images), their outputs and their error messages."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from conftest import load_script
from gains.checkpoint import make_checkpoint, save_checkpoint
from test_evaluation import rect_dataset, tiny_model_cfg

ROOT = Path(__file__).resolve().parent.parent
cli = load_script("evaluate")


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode()}


def rect(h, w, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------------------------- --gt/--pred
@pytest.fixture
def gt_and_results(tmp_path):
    """rect_dataset's GT (json ids 3/7, a crowd region, an empty image) and hand-made results: shifted
    boxes, a duplicate, a false positive, a hit on the crowd region, score ties."""
    rect_dataset(tmp_path / "data")
    gt_path = tmp_path / "data/test.json"
    gt = json.loads(gt_path.read_text())
    shapes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    for a in gt["annotations"]:  # pycocotools needs 'area' (and uses 'bbox' for box AP)
        r = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], *shapes[a["image_id"]]))
        a["area"], a["bbox"] = float(mask_utils.area(r)), [float(v) for v in mask_utils.toBbox(r)]
    gt_path.write_text(json.dumps(gt))
    results = [
        {"image_id": 11, "category_id": 3, "score": 0.9, "segmentation": rle(rect(40, 48, 5, 4, 20, 20))},
        {"image_id": 11, "category_id": 3, "score": 0.8, "segmentation": rle(rect(40, 48, 12, 12, 30, 28))},
        {"image_id": 11, "category_id": 3, "score": 0.8, "segmentation": rle(rect(40, 48, 4, 4, 18, 18))},
        {"image_id": 11, "category_id": 7, "score": 0.7, "segmentation": rle(rect(40, 48, 7, 6, 12, 11))},
        {"image_id": 11, "category_id": 7, "score": 0.3, "segmentation": rle(rect(40, 48, 30, 30, 40, 38))},
        {"image_id": 12, "category_id": 3, "score": 0.6, "segmentation": rle(rect(30, 50, 31, 3, 44, 17))},
        {"image_id": 12, "category_id": 3, "score": 0.5, "segmentation": rle(rect(30, 50, 0, 20, 8, 29))},
        {"image_id": 12, "category_id": 7, "score": 0.9, "segmentation": rle(rect(30, 50, 2, 2, 9, 10))},
        {"image_id": 13, "category_id": 7, "score": 0.2, "segmentation": rle(rect(36, 36, 1, 1, 9, 9))},
    ]
    for r in results:
        r["bbox"] = [float(v) for v in mask_utils.toBbox(r["segmentation"])]
    pred_path = tmp_path / "results.json"
    pred_path.write_text(json.dumps(results))
    return gt_path, pred_path, results


def pycocotools_stats(gt_path, results, iou_type):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        res = [{k: v for k, v in r.items() if k != "bbox"} for r in results] if iou_type == "segm" else results
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(res)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_gt_pred_mode_matches_pycocotools(gt_and_results, tmp_path, capsys):
    gt_path, pred_path, results = gt_and_results
    out = tmp_path / "m.json"
    assert cli.main(["--gt", str(gt_path), "--pred", str(pred_path), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    for iou_type, key in (("segm", "segm_stats"), ("bbox", "bbox_stats")):
        ref = pycocotools_stats(gt_path, results, iou_type)
        got = [np.nan if v is None else v / 100 for v in m[key].values()]
        np.testing.assert_allclose(got, np.where(ref < 0, np.nan, ref), atol=1e-12, err_msg=iou_type)
    assert m["mAP"] == pytest.approx(100 * pycocotools_stats(gt_path, results, "segm")[0], abs=1e-10)
    # AJI against the metrics module on the decoded masks (the crowd region counts as an instance there)
    from gains.metrics import aji

    gt = json.loads(gt_path.read_text())
    shapes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    gts, dets = [], []
    for i in sorted(shapes):
        anns = [a for a in gt["annotations"] if a["image_id"] == i]
        rs = [r for r in results if r["image_id"] == i]
        gm = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], *shapes[i])))
              for a in anns]
        dm = [mask_utils.decode(r["segmentation"]) for r in rs]
        gts.append({"image_id": i, "labels": [a["category_id"] for a in anns],
                    "masks": np.array(gm, np.uint8).reshape(-1, *shapes[i])})
        dets.append({"labels": [r["category_id"] for r in rs], "scores": [r["score"] for r in rs],
                     "masks": np.array(dm, np.uint8).reshape(-1, *shapes[i])})
    assert m["aji"] == pytest.approx(aji(gts, dets, [3, 7])["mean"], abs=1e-12)
    assert 0 < m["aji"] < 1 and m["per_category"]["Cell"]["category_id"] == 3
    table = capsys.readouterr().out
    assert "aji mode 'clean'" in table and "all detections" in table and f"wrote {out}" in table


def test_gt_pred_empty_results_and_bad_inputs(gt_and_results, tmp_path, capsys):
    gt_path, pred_path, results = gt_and_results
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert cli.main(["--gt", str(gt_path), "--pred", str(empty)]) == 0
    m = json.loads((tmp_path / "empty_metrics.json").read_text())  # default: beside the results file
    assert (m["mAP"], m["aji"]) == (0, 0) and "no predictions" in capsys.readouterr().out

    def fails(args, *needles):
        assert cli.main(args) == 1
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, err
        assert "Traceback" not in err

    fails(["--gt", str(tmp_path / "nope.json"), "--pred", str(pred_path)],
          "ground-truth json (--gt) not found", "nope.json")
    fails(["--gt", str(gt_path), "--pred", str(tmp_path / "none.json")], "results json (--pred) not found")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(results + [{**results[0], "image_id": 404}]))
    fails(["--gt", str(gt_path), "--pred", str(bad), "--out", str(tmp_path / "x.json")], "image ids [404]")
    bad.write_text(json.dumps(results + [{**results[0], "category_id": 1}]))
    fails(["--gt", str(gt_path), "--pred", str(bad), "--out", str(tmp_path / "x.json")], "category ids [1]")
    gt = json.loads(gt_path.read_text())
    gt["annotations"][2]["id"] = 0
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps(gt))
    fails(["--gt", str(zero), "--pred", str(pred_path), "--out", str(tmp_path / "x.json")], "has id 0", "renumber")
    assert not (tmp_path / "x.json").exists()  # nothing half-written
    with pytest.raises(SystemExit):
        cli.main(["--gt", str(gt_path)])


def test_gt_pred_max_dets_option(tmp_path, capsys):
    """--max-dets N scores the top N per image and category (pycocotools' maxDets), 'none' every detection
    (the default); the table and metrics.json name the cap, and a warning names the crowded image."""
    from test_evaluation import crowded_field, pycocotools_segm

    gt, results = crowded_field()
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps(results))
    metrics = {}
    for option, max_dets in (("100", (1, 10, 100)), ("1000", (1, 10, 1000)), ("none", (1, 10, 154)),
                             (None, (1, 10, 154))):
        out = tmp_path / f"m_{option}.json"
        args = ["--gt", str(gt_path), "--pred", str(pred_path), "--out", str(out)]
        assert cli.main(args + (["--max-dets", option] if option else [])) == 0
        m = metrics[option] = json.loads(out.read_text())
        assert m["coco_max_dets"] == list(max_dets) and m["AP50"] == pytest.approx(
            100 * pycocotools_segm(gt, results, max_dets)[1], abs=1e-10)
        printed = capsys.readouterr().out
        assert (f"maxDets={max_dets[-1]}" in printed) and (f"AR{max_dets[-1]}" in printed)
    assert metrics["100"]["max_dets_eval"] == 100 and metrics["none"]["max_dets_eval"] is None
    assert metrics["100"]["AP50"] < metrics["none"]["AP50"] == metrics[None]["AP50"] == metrics["1000"]["AP50"]
    assert any("image id 42" in n for n in metrics["100"]["notes"])
    for bad in ("5", "many"):
        with pytest.raises(SystemExit):
            cli.main(["--gt", str(gt_path), "--pred", str(pred_path), "--max-dets", bad])
        assert "--max-dets" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- --ckpt
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised tiny R18 model saved like train.py does, with the synthetic data's config."""
    from gains.model import build_model
    from gains.synthetic import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("ckpt")
    make_synthetic_dataset(tmp / "syn", num_train=2, num_val=1, num_test=3, image_size=(64, 64))
    cfg = tiny_model_cfg(tmp / "syn", f"output_dir={tmp / 'run'}", "test.score_thresh=0.0")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # untrained but detecting: every proposal scores high as class 1 (tests see results)
        model.roi_heads.box_head.cls_score.bias.copy_(torch.tensor([-6.0, 6.0, 0.0]))
    cmap = {"json_ids": [1, 2], "names": ["cell", "nucleus"]}
    path = tmp / "run" / "model_final.pth"
    save_checkpoint(make_checkpoint(model, iteration=0, config=cfg, category_map=cmap), path)
    return path


def test_ckpt_mode_uses_the_saved_config_and_writes_outputs(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["--ckpt", str(checkpoint), "--out", str(out), "--vis", "2", "--split", "val"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "val" and m["num_images"] == 1 and m["score_thresh"] == 0.0
    results = json.loads((out / "results_val.json").read_text())
    assert m["num_detections"] > 0 and len(results) == m["num_detections"]
    assert len(list((out / "vis").glob("*.png"))) == 1
    printed = capsys.readouterr().out
    assert "mAP" in printed and "AJI" in printed and "results_val.json" in printed
    # default output folder beside the checkpoint, split from test.split, overrides on top of the saved config
    assert cli.main(["--ckpt", str(checkpoint), "test.aji_mode=gains", "test.vis=0"]) == 0
    m = json.loads((checkpoint.parent / "eval_test/metrics.json").read_text())
    assert m["aji_mode"] == "gains" and m["num_images"] == 3
    assert m["max_dets_eval"] is None  # the saved config's test.max_dets_eval (base.yaml: no cap)
    assert cli.main(["--ckpt", str(checkpoint), "--out", str(out), "--max-dets", "20", "test.vis=0"]) == 0
    assert json.loads((out / "metrics.json").read_text())["max_dets_eval"] == 20  # --max-dets overrides it
    assert "top 20 per image and category, maxDets=20" in capsys.readouterr().out


def test_ckpt_mode_with_explicit_config_file(checkpoint, tmp_path):
    import yaml

    saved = torch.load(checkpoint, weights_only=True)["config"]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"_base_": str(ROOT / "configs/base.yaml"), **saved}))
    out = tmp_path / "eval"
    assert cli.main(["--ckpt", str(checkpoint), "--config", str(config), "--out", str(out), "test.vis=0",
                     "test.score_thresh=0.5"]) == 0
    assert json.loads((out / "metrics.json").read_text())["score_thresh"] == 0.5


def test_ckpt_errors_are_messages_and_write_nothing(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["--ckpt", str(checkpoint), "--out", str(out), "model.backbone.fpn_channels=16"]) == 1
    err = capsys.readouterr().err
    assert "does not match the model" in err and "shape mismatch" in err and "fpn_channels" in err
    assert cli.main(["--ckpt", str(checkpoint), "--out", str(out), "model.mode=gains"]) == 1
    err = capsys.readouterr().err  # the anomaly branch exists only in the model built from the config
    assert "missing in checkpoint" in err and "alrm" in err and "model.mode: checkpoint 'mask_rcnn'" in err
    assert cli.main(["--ckpt", str(tmp_path / "missing.pth"), "--out", str(out)]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli.main(["--ckpt", str(checkpoint), "--out", str(out), "test.aji_mod=gains"]) == 2
    assert "unknown config key 'test.aji_mod'" in capsys.readouterr().err
    assert cli.main(["--ckpt", str(checkpoint), "--out", str(out), f"data.root={tmp_path / 'nodata'}"]) == 1
    assert "annotation file not found" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- --images
def test_images_mode_on_mixed_formats(checkpoint, tmp_path):
    import tifffile
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "b_16bit.tif", rng.integers(0, 65535, (50, 70), dtype=np.uint16))
    Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(folder / "a_rgb.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "pred"
    assert cli.main(["--ckpt", str(checkpoint), "--images", str(folder), "--out", str(out)]) == 0
    index = json.loads((out / "images.json").read_text())
    assert [(e["id"], e["file_name"], e["height"], e["width"]) for e in index["images"]] == [
        (1, "a_rgb.png", 64, 48), (2, "b_16bit.tif", 50, 70)]
    assert [c["id"] for c in index["categories"]] == [1, 2]
    results = json.loads((out / "results.json").read_text())
    import roifile
    from pycocotools import mask as mask_utils

    from gains.exports import read_instances_npz
    from gains.geojson_io import read_geojson_instances
    for e in index["images"]:
        stem = Path(e["file_name"]).stem  # outputs are named after the image's stem
        pred = read_instances_npz(out / "masks" / f"{stem}.npz")
        n = len(pred["scores"])
        assert pred["masks"].image_size == (e["height"], e["width"]) and len(pred["masks"]) == n
        assert pred["labels"].shape == (n,) and pred["boxes"].shape == (n, 4)
        mine = [r for r in results if r["image_id"] == e["id"]]
        assert len(mine) == n
        dense = pred["masks"].dense()
        for r, m in zip(mine, dense):  # the json, the npz and the label image describe the same masks
            assert np.array_equal(mask_utils.decode({"size": r["segmentation"]["size"],
                                                     "counts": r["segmentation"]["counts"].encode()}), m)
        labels = tifffile.imread(out / "labels" / f"{stem}_labels.tif")
        assert labels.shape == (e["height"], e["width"]) and labels.dtype == np.uint16
        for k in np.unique(labels[labels > 0]):
            assert dense[k - 1][labels == k].all()  # a pixel labelled k lies in mask k-1
        assert (labels > 0).sum() == dense.any(0).sum()
        rois = roifile.roiread(out / "rois" / f"{stem}_rois.zip") if n else []
        assert len(rois if isinstance(rois, list) else [rois]) >= int((pred["masks"].areas() > 0).sum())
        assert (out / "overlays" / f"{stem}.png").is_file()
        geo, _ = read_geojson_instances(out / "geojson" / f"{stem}.geojson", e["height"], e["width"], "none")
        assert [m.tolist() for m in geo.dense()] == [m.tolist() for m in dense if m.any()]  # overlaps kept
    assert len(results) > 0  # score_thresh 0 in the checkpoint's config: a random model detects something


def test_images_mode_tiles_large_images(checkpoint, tmp_path):
    """An image larger than test.tile_size is predicted tile by tile; outputs stay consistent."""
    import tifffile

    from gains.exports import read_instances_npz
    folder = tmp_path / "imgs"
    folder.mkdir()
    tifffile.imwrite(folder / "field.tif", np.random.default_rng(2).integers(0, 255, (90, 130), dtype=np.uint8))
    out = tmp_path / "pred"
    assert cli.main(["--ckpt", str(checkpoint), "--images", str(folder), "--out", str(out), "test.tiling=always",
                     "test.tile_size=48", "test.tile_overlap=16", "test.max_detections=500"]) == 0
    pred = read_instances_npz(out / "masks" / "field.npz")
    results = json.loads((out / "results.json").read_text())
    assert pred["masks"].image_size == (90, 130) and len(results) == len(pred["scores"]) <= 500
    assert tifffile.imread(out / "labels" / "field_labels.tif").shape == (90, 130)


def test_readme_python_predictor_snippet(checkpoint, tmp_path):
    import tifffile

    from gains.imageio import read_image_array
    from gains.inference import load_for_inference
    from gains.predictor import Predictor

    tifffile.imwrite(tmp_path / "cells.tif", np.random.default_rng(1).integers(0, 4000, (45, 61), dtype=np.uint16))
    cfg, model, categories = load_for_inference(checkpoint)
    predictor = Predictor(model, cfg.data.min_size_test, cfg.data.max_size_test, normalize=cfg.data.normalize)
    out = predictor(read_image_array(tmp_path / "cells.tif"))[0]
    names = [categories.names[label - 1] for label in out["labels"].tolist()]
    # masks: CropMasks at the original size (`.dense()` gives bool [N,H,W], `.label_image()` one label map)
    assert out["masks"].image_size == (45, 61) and out["masks"].dense().shape == (len(names), 45, 61)
    assert len(names) == len(out["scores"]) == len(out["boxes"]) and set(names) <= set(categories.names)
    # the config's test.tiling / tile_* keys: same result for an image smaller than a tile
    again = Predictor.from_config(model, cfg)(read_image_array(tmp_path / "cells.tif"))[0]
    assert torch.equal(again["boxes"], out["boxes"]) and torch.equal(again["scores"], out["scores"])


def test_images_mode_errors(checkpoint, tmp_path, capsys):
    out = tmp_path / "pred"
    assert cli.main(["--ckpt", str(checkpoint), "--images", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "images folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    assert cli.main(["--ckpt", str(checkpoint), "--images", str(tmp_path / "empty"), "--out", str(out)]) == 1
    assert "no images in" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    assert cli.main(["--ckpt", str(checkpoint), "--images", str(tmp_path / "broken"), "--out", str(out)]) == 1
    assert "cannot read image" in capsys.readouterr().err
    assert not out.exists()


def test_images_sharing_a_stem_are_refused_before_the_model_loads(tmp_path, capsys):
    """Outputs are named after the stem (X_labels.tif): X.png and X.tif would overwrite each other's."""
    from conftest import write_png
    folder = tmp_path / "imgs"
    for name in ("field.png", "field.tif", "other.png"):
        write_png(folder / name, np.zeros((8, 8), np.uint8))
    assert cli.main(["--ckpt", str(tmp_path / "no_model.pth"), "--images", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "images field.png and field.tif share a name stem" in err and "no_model" not in err


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_then_evaluate_in_all_three_modes(tmp_path):
    """train.py a few iterations of the quickstart GAInS (its end-of-training evaluation runs
    evaluate_model), then evaluate.py on the checkpoint, on its results file, on a folder of images, and
    under torchrun with two processes."""
    from gains.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", num_train=4, num_val=2, num_test=2, image_size=(96, 96))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    # the quickstart config, shortened: 3 iterations on the small pre-generated synthetic set
    overrides = [f"output_dir={run}", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                 "data.min_size_train=[96]", "data.min_size_test=96", "solver.max_iter=3", "solver.ims_per_batch=2",
                 "solver.checkpoint_period=3", "solver.log_period=1", "solver.warmup_iters=1",
                 "solver.steps=[2]", "test.eval_at_end=true", "test.score_thresh=0.0"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/quickstart.yaml"),
                           *overrides], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "eval_final_test/metrics.json").is_file()
    ckpt = run / "model_final.pth"

    def evaluate(*args):
        p = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True,
                           env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    printed = evaluate("--ckpt", str(ckpt), "--vis", "1")
    assert "mAP" in printed
    m = json.loads((run / "eval_test/metrics.json").read_text())
    assert m == json.loads((run / "eval_final_test/metrics.json").read_text())  # same model, same numbers
    evaluate("--gt", str(tmp_path / "data/test.json"), "--pred", str(run / "eval_test/results_test.json"),
             "--out", str(tmp_path / "rescored.json"))
    again = json.loads((tmp_path / "rescored.json").read_text())
    for key in ("mAP", "AP50", "AP75", "aji", "aji_kumar", "aji_plus", "box_AP"):
        assert again[key] == pytest.approx(m[key], abs=1e-9), key
    evaluate("--ckpt", str(ckpt), "--images", str(tmp_path / "data/test"), "--out", str(tmp_path / "pred"))
    assert len(json.loads((tmp_path / "pred/images.json").read_text())["images"]) == 2
    # two ranks: one image each, same numbers as one process
    torchrun = Path(sys.executable).parent / "torchrun"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "evaluate.py"),
                        "--ckpt", str(ckpt), "--out", str(tmp_path / "ddp")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("Cell/Nuclei mean") == 1  # one table, from rank 0
    ddp = json.loads((tmp_path / "ddp/metrics.json").read_text())
    for key in ("num_images", "num_detections", "mAP", "aji", "box_AP"):
        assert ddp[key] == pytest.approx(m[key], abs=1e-9), key
