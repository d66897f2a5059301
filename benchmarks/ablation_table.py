"""The ablation table of `benchmarks/ablation.py`: every finished run of a folder scored on its test split.

Per run `OUT/{mode}_s{seed}` (its resolved config.yaml names the data): the test predictions
(`eval_final_test/results_test.json`) are scored against the test json with
- mask AP, AP50, AP75 and AJI ('clean') on all GTs, on CTO GTs and on non-CTO GTs (gains.cto: a GT is CTO
  when it crosses, touches or overlaps another of its category), and
- the contact-zone IoU (gains.cto_zone: mask IoU restricted to the pixels where a CTO GT meets its
  neighbours, mean over CTO GTs, detections with score >= 0.5) and the whole-mask IoU of the same
  matches on CTO and on non-CTO GTs;
- the val split's mAP / AJI (eval_final_val/metrics.json), the only numbers a recipe may be chosen on.

Per mode: mean ± sample sd over seeds. Per seed: the paired difference to `mask_rcnn` of the same seed, and
a 95 % interval for the mean difference: Student's t over seeds, mean ± t(0.975, n-1) · sd / √n (n = seeds
with both runs; with n = 3, t = 4.30: only large, consistent differences exclude zero). Writes
`OUT/ablation.json` (every run's numbers) and `OUT/ablation.md`; returns the markdown path (None without a
finished run).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gains.annotations import segmentation_to_rle  # noqa: E402
from gains.atomic import write_text_atomic  # noqa: E402
from gains.config import load_config  # noqa: E402
from gains.scoring import COCO_MAX_DETS, check_max_dets, coco_max_dets  # noqa: E402
from gains.cto import stratified_metrics  # noqa: E402
from gains.cto_zone import zone_scores  # noqa: E402

RUN = re.compile(r"^(?P<mode>[a-z_]+)_s(?P<seed>\d+)$")
MODE_ORDER = ("mask_rcnn", "reweight_only", "branch_only", "gains")
COLUMNS = [("mAP", "all", "AP"), ("AP50", "all", "AP50"), ("AP75", "all", "AP75"), ("AJI", "all", "aji"),
           ("CTO mAP", "cto", "AP"), ("CTO AP50", "cto", "AP50"), ("CTO AP75", "cto", "AP75"),
           ("CTO AJI", "cto", "aji"), ("non-CTO mAP", "non_cto", "AP"), ("non-CTO AP50", "non_cto", "AP50"),
           ("non-CTO AP75", "non_cto", "AP75"), ("non-CTO AJI", "non_cto", "aji")]
EXTRA = ["zone IoU", "CTO mask IoU", "non-CTO mask IoU", "val mAP", "val AJI"]
KEY_COLUMNS = ["mAP", "AJI", "CTO mAP", "CTO AJI", "non-CTO mAP", "non-CTO AJI", "zone IoU", "CTO mask IoU",
               "non-CTO mask IoU"]


def _decode(segmentations, h: int, w: int) -> np.ndarray:
    """bool [N, H, W] from COCO segmentations (RLE or polygons)."""
    if not segmentations:
        return np.zeros((0, h, w), bool)
    rles = [segmentation_to_rle(s, h, w) for s in segmentations]
    return np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)


def score_run(gt_json: Path, results_json: Path, max_dets: int | None = COCO_MAX_DETS) -> dict:
    """Every number of one run's test predictions (module docstring); AP/AJI x100. AP and AJI score the top
    `max_dets` detections per image and category (the run's `test.max_dets_eval`; None: all), as evaluate.py."""
    gt = json.loads(Path(gt_json).read_text())
    results = json.loads(Path(results_json).read_text())
    cats = [c["id"] for c in gt["categories"]]
    by_image = {im["id"]: ([], []) for im in gt["images"]}
    for a in gt["annotations"]:
        by_image[a["image_id"]][0].append(a)
    for r in results:
        by_image[r["image_id"]][1].append(r)
    gts, dets, zone, cto_iou, non_iou = [], [], [], [], []
    for im in gt["images"]:
        anns, res = by_image[im["id"]]
        h, w = im["height"], im["width"]
        gm = _decode([a["segmentation"] for a in anns], h, w)
        gl = np.array([a["category_id"] for a in anns], np.int64)
        crowd = np.array([a.get("iscrowd", 0) for a in anns], bool)
        dm = _decode([r["segmentation"] for r in res], h, w)
        dl = np.array([r["category_id"] for r in res], np.int64)
        ds = np.array([r["score"] for r in res], np.float64)
        gts.append({"image_id": im["id"], "labels": gl, "masks": gm, "iscrowd": crowd})
        dets.append({"labels": dl, "masks": dm, "scores": ds})
        z = zone_scores(gm[~crowd], gl[~crowd], dm, dl, ds)
        zone.extend(z["zone_iou"][z["cto"]])
        cto_iou.extend(z["mask_iou"][z["cto"]])
        non_iou.extend(z["mask_iou"][~z["cto"]])
    largest = max((int(np.sum(d["labels"] == c)) for d in dets for c in cats), default=0)
    s = stratified_metrics(gts, dets, cats, max_dets=coco_max_dets(max_dets, largest))
    out = {f"{name}": (100.0 * s[stratum][key] if key == "aji" else s[stratum][key])
           for name, stratum, key in COLUMNS}
    out.update({"zone IoU": 100.0 * float(np.mean(zone)) if zone else float("nan"),
                "CTO mask IoU": 100.0 * float(np.mean(cto_iou)) if cto_iou else float("nan"),
                "non-CTO mask IoU": 100.0 * float(np.mean(non_iou)) if non_iou else float("nan"),
                "num_gt": {k: s[k]["num_gt"] for k in ("all", "cto", "non_cto")}})
    return out


def _finished_runs(out: Path) -> list[tuple[str, int, Path]]:
    runs = []
    for folder in sorted(Path(out).iterdir()):
        m = RUN.match(folder.name)
        if m and all((folder / f"eval_final_{s}" / "metrics.json").is_file() for s in ("test", "val")):
            runs.append((m["mode"], int(m["seed"]), folder))
    return runs


def _score_cached(folder: Path) -> dict:
    """score_run of a finished run, cached in its folder (keyed by the results file's mtime)."""
    cfg = load_config(str(folder / "config.yaml"))
    root = Path(cfg.data.root)
    gt_json = (root if root.is_absolute() else ROOT / root) / cfg.data.test_json  # runs start in ROOT
    results = folder / "eval_final_test" / "results_test.json"
    cache = folder / "ablation_scores.json"
    stamp = results.stat().st_mtime
    max_dets = check_max_dets(cfg.test.get("max_dets_eval"))
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("results_mtime") == stamp and cached.get("max_dets", COCO_MAX_DETS) == max_dets:
            return cached["scores"]
    scores = score_run(gt_json, results, max_dets)
    val = json.loads((folder / "eval_final_val" / "metrics.json").read_text())
    scores["val mAP"], scores["val AJI"] = val.get("mAP"), 100.0 * val["aji"] if val.get("aji") is not None else None
    write_text_atomic(cache, json.dumps({"results_mtime": stamp, "max_dets": max_dets, "scores": scores}, indent=1))
    return scores


def mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def t_interval(diffs, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the mean paired difference: Student's t over seeds (NaN bounds for n < 2)."""
    d = np.asarray(diffs, np.float64)
    m = float(d.mean())
    if len(d) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return m, m - half, m + half


def build_table(scored: dict[tuple[str, int], dict]) -> dict:
    """{'modes': {mode: {column: [mean, sd, n]}}, 'paired': {mode: {column: {'per_seed': {seed: diff},
    'mean', 'ci95'}}}} from {(mode, seed): scores}."""
    columns = [c[0] for c in COLUMNS] + EXTRA
    modes = [m for m in MODE_ORDER if any(k[0] == m for k in scored)]
    table = {"modes": {}, "paired": {}}
    for mode in modes:
        seeds = sorted(s for m, s in scored if m == mode)
        table["modes"][mode] = {c: [*mean_sd([scored[mode, s][c] for s in seeds]), len(seeds)] for c in columns
                                if all(scored[mode, s].get(c) is not None for s in seeds)}
        if mode == "mask_rcnn":
            continue
        paired = sorted(s for s in seeds if ("mask_rcnn", s) in scored)
        if not paired:
            continue
        table["paired"][mode] = {}
        for c in columns:
            d = {s: scored[mode, s][c] - scored["mask_rcnn", s][c] for s in paired
                 if scored[mode, s].get(c) is not None and scored["mask_rcnn", s].get(c) is not None}
            if d:
                m, lo, hi = t_interval(list(d.values()))
                table["paired"][mode][c] = {"per_seed": d, "mean": m, "ci95": [lo, hi]}
    return table


def _markdown(table: dict, scored: dict, config: str) -> str:
    cols = KEY_COLUMNS + ["val mAP"]
    lines = [f"# Ablation: {config}", "",
             "Test split; mean ± sd over seeds (n = seeds). AP, AJI and IoU x100. CTO = GTs that cross, touch or "
             "overlap another of their category; zone IoU = mask IoU inside the contact zones "
             "(gains/METRICS.md §5-§6).", "",
             "| mode | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for mode, row in table["modes"].items():
        n = max(v[2] for v in row.values())
        cells = [(f"{row[c][0]:.2f} ± {row[c][1]:.2f}" if row[c][2] > 1 else f"{row[c][0]:.2f}") if c in row else ""
                 for c in cols]
        lines.append(f"| {mode} | {n} | " + " | ".join(cells) + " |")
    if table["paired"]:
        lines += ["", "Paired difference to mask_rcnn (same seed): mean [95 % t-interval over seeds]; per seed.", "",
                  "| mode | " + " | ".join(KEY_COLUMNS) + " |", "|---|" + "---|" * len(KEY_COLUMNS)]
        for mode, row in table["paired"].items():
            cells = []
            for c in KEY_COLUMNS:
                if c not in row:
                    cells.append("")
                    continue
                r = row[c]
                seeds = ", ".join(f"{v:+.1f}" for _, v in sorted(r["per_seed"].items()))
                ci = f" [{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}]" if len(r["per_seed"]) > 1 else ""
                cells.append(f"{r['mean']:+.2f}{ci} ({seeds})")
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Every run:", "", "| mode | seed | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for (mode, seed), sc in sorted(scored.items(), key=lambda kv: (MODE_ORDER.index(kv[0][0]), kv[0][1])):
        lines.append(f"| {mode} | {seed} | " + " | ".join(f"{sc[c]:.2f}" if sc.get(c) is not None else ""
                                                         for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_table(out, config: str) -> Path | None:
    out = Path(out)
    runs = _finished_runs(out)
    if not runs:
        return None
    scored = {(mode, seed): _score_cached(folder) for mode, seed, folder in runs}
    table = build_table(scored)
    doc = {"config": config, "method": "mean ± sample sd over seeds; 95 % interval of the mean paired difference "
           "to mask_rcnn: Student's t over seeds", "runs": [{"mode": m, "seed": s, **scored[m, s]}
                                                            for m, s in sorted(scored)], **table}
    write_text_atomic(out / "ablation.json", json.dumps(doc, indent=1))
    md = out / "ablation.md"
    write_text_atomic(md, _markdown(table, scored, config))
    return md
