"""benchmarks/ablation.py and ablation_table.py: the table from run folders, the paired t interval, and the
runner's resume logic (finished runs skipped), without training (fake run folders)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ablation  # noqa: E402
import ablation_table  # noqa: E402
from gains.config import dump_config, load_config  # noqa: E402


def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def _masks():
    """One 32x32 image: cells a and b overlap (CTO), c is isolated."""
    yy, xx = np.mgrid[:32, :32]
    a = (yy - 10) ** 2 + (xx - 10) ** 2 < 36
    b = (yy - 10) ** 2 + (xx - 18) ** 2 < 36
    c = (yy - 25) ** 2 + (xx - 25) ** 2 < 16
    return [a, b, c]


def _gt_json(path: Path) -> None:
    anns = [{"id": i + 1, "image_id": 1, "category_id": 0, "segmentation": _rle(m), "area": int(m.sum()),
             "bbox": list(mask_utils.toBbox(_rle(m))), "iscrowd": 0} for i, m in enumerate(_masks())]
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png", "height": 32, "width": 32}],
                                "annotations": anns, "categories": [{"id": 0, "name": "Cell"}]}))


def _fake_run(out: Path, mode: str, seed: int, masks, data_root: Path, val_map: float = 50.0) -> Path:
    folder = out / f"{mode}_s{seed}"
    (folder / "eval_final_test").mkdir(parents=True)
    (folder / "eval_final_val").mkdir(parents=True)
    dump_config(load_config(None, [f"data.root={data_root}", f"model.mode={mode}", f"seed={seed}"]),
                folder / "config.yaml")
    results = [{"image_id": 1, "category_id": 0, "segmentation": _rle(m), "score": 0.9 - 0.1 * i}
               for i, m in enumerate(masks)]
    (folder / "eval_final_test" / "results_test.json").write_text(json.dumps(results))
    for split in ("test", "val"):
        (folder / f"eval_final_{split}" / "metrics.json").write_text(json.dumps({"mAP": val_map, "aji": 0.5}))
    return folder


def test_perfect_predictions_score_100_everywhere(tmp_path):
    _gt_json(tmp_path / "test.json")
    scores = ablation_table.score_run(tmp_path / "test.json", _fake_run(
        tmp_path / "out", "gains", 0, _masks(), tmp_path) / "eval_final_test" / "results_test.json")
    for c in ("mAP", "CTO mAP", "non-CTO mAP", "AJI", "CTO AJI", "zone IoU", "CTO mask IoU", "non-CTO mask IoU"):
        assert scores[c] == pytest.approx(100.0), c
    assert scores["num_gt"] == {"all": 3, "cto": 2, "non_cto": 1}


def test_a_mask_wrong_only_where_cells_overlap_lowers_only_the_cto_measures(tmp_path):
    _gt_json(tmp_path / "test.json")
    a, b, c = _masks()
    a_cut = a & ~b  # cell a's prediction misses the overlap with b
    good = ablation_table.score_run(tmp_path / "test.json", _fake_run(
        tmp_path / "out", "mask_rcnn", 0, [a, b, c], tmp_path) / "eval_final_test" / "results_test.json")
    cut = ablation_table.score_run(tmp_path / "test.json", _fake_run(
        tmp_path / "out", "gains", 0, [a_cut, b, c], tmp_path) / "eval_final_test" / "results_test.json")
    assert cut["zone IoU"] < good["zone IoU"] - 5
    assert cut["CTO mask IoU"] < good["CTO mask IoU"]
    assert cut["non-CTO mask IoU"] == good["non-CTO mask IoU"] == pytest.approx(100.0)
    assert cut["non-CTO mAP"] == pytest.approx(100.0)


def test_the_evaluation_cap_of_the_run_is_applied(tmp_path):
    """12 empty-ish false positives score above the 3 true masks: with a cap of 10 detections per image (as
    `test.max_dets_eval: 10` would score them) the true ones are cut; with no cap every GT is found."""
    _gt_json(tmp_path / "test.json")
    decoy = np.zeros((32, 32), bool)
    decoy[0, 0] = True
    folder = _fake_run(tmp_path / "out", "gains", 0, [decoy] * 12 + _masks(), tmp_path)
    results = folder / "eval_final_test" / "results_test.json"
    rows = json.loads(results.read_text())
    for i, r in enumerate(rows):
        r["score"] = 0.99 - 0.01 * i  # decoys first
    results.write_text(json.dumps(rows))
    capped = ablation_table.score_run(tmp_path / "test.json", results, max_dets=10)
    uncapped = ablation_table.score_run(tmp_path / "test.json", results, max_dets=None)
    assert capped["AP50"] == pytest.approx(0.0)
    # all 3 found after the 12 decoys: precision 3/15 at full recall, and the envelope is 0.2 everywhere
    assert uncapped["AP50"] == pytest.approx(20.0)


def test_t_interval_by_hand():
    # diffs 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 -> half width 4.3027 / sqrt(3) = 2.4841
    m, lo, hi = ablation_table.t_interval([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0)
    assert (lo, hi) == pytest.approx((2.0 - 2.4841, 2.0 + 2.4841), abs=1e-3)


def test_table_pairs_each_mode_with_the_baseline_of_the_same_seed(tmp_path):
    _gt_json(tmp_path / "test.json")
    out = tmp_path / "out"
    a, b, c = _masks()
    for seed in (0, 1):
        _fake_run(out, "mask_rcnn", seed, [a & ~b, b, c], tmp_path, val_map=40.0 + seed)
        _fake_run(out, "gains", seed, [a, b, c], tmp_path, val_map=45.0)
    md = ablation_table.write_table(out, "cfg.yaml")
    doc = json.loads((out / "ablation.json").read_text())
    assert len(doc["runs"]) == 4
    zone = doc["paired"]["gains"]["zone IoU"]
    assert set(zone["per_seed"]) == {"0", "1"} and zone["mean"] > 5
    assert doc["modes"]["mask_rcnn"]["val mAP"][:2] == pytest.approx([40.5, np.std([40, 41], ddof=1)])
    text = md.read_text()
    assert "| gains | 2 |" in text and "Paired difference" in text


def test_runner_skips_finished_runs_and_resumes_the_rest(tmp_path, monkeypatch):
    _gt_json(tmp_path / "test.json")
    out = tmp_path / "out"
    _fake_run(out, "mask_rcnn", 0, _masks(), tmp_path)
    calls = []

    def fake_execute(commands, folder, threads):
        calls.append((folder.name, commands))
        return 1, 0.0  # a failing run: reported, the others still run

    monkeypatch.setattr(ablation, "execute", fake_execute)
    rc = ablation.main(["cfg.yaml", "--modes", "mask_rcnn", "gains", "--seeds", "0", "--out", str(out),
                        "--jobs", "1", "solver.max_iter=5"])
    assert rc == 1
    assert [name for name, _ in calls] == ["gains_s0"]
    train_cmd = calls[0][1][0]
    assert "--resume" in train_cmd and "model.mode=gains" in train_cmd and "solver.max_iter=5" in train_cmd
    assert calls[0][1][1][-4:] == ["--split", "val", "--out", str(out / "gains_s0" / "eval_final_val")]


def test_gains_diagnostics_measures_the_ga_weights_and_a_constant_branch(tiny_coco, monkeypatch):
    """On two overlapping squares: the GA crops mark anomalous pixels (GA > 1) that carry a larger share of the
    weight than of the pixels; a branch that outputs a constant explains none of the GA variance (R² <= 0)."""
    import torch

    import gains_diagnostics
    from tests.test_model import TINY
    from gains.model import build_model

    json_path, image_dir = tiny_coco
    cfg = load_config(None, TINY + [f"data.root={json_path.parent}", "data.val_json=train.json",
                                    "data.val_images=train", "data.min_size_test=40", "data.num_workers=0",
                                    "gamm.target_category_id=1", "model.mode=gains",
                                    "model.backbone.depth=18", "model.backbone.norm=gn",
                                    "model.backbone.freeze_at=0"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()

    class Constant(torch.nn.Module):
        def forward(self, x, f_m):
            return torch.ones(len(x), 2, 28, 28)

    model.roi_heads.alrm = Constant()
    out = gains_diagnostics.diagnose(model, cfg, "val")
    assert 0 < out["anomalous_pixel_share"] < 1
    assert out["anomalous_weight_share"] > out["anomalous_pixel_share"]
    assert out["mean_ga_on_anomalous"] > 1 and out["max_ga_weight"] <= 1.5 + 1e-6
    assert out["effective_weight_ordinary_pixel"] == 0.75
    assert out["effective_weight_anomalous_pixel_mean"] == pytest.approx(0.75 * out["mean_ga_on_anomalous"])
    assert out["alrm_mean_on_anomalous"] == out["alrm_mean_on_ordinary"] == 1.0
    assert out["alrm_r2"] <= 0.0
