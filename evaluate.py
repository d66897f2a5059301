"""Evaluate a trained model on a split, score an existing COCO results file, or predict on unlabelled images.

    python evaluate.py --ckpt RUN/model_final.pth [--config CFG] [--split test] [--out DIR] [--vis K] [key=value ...]
    torchrun --nproc_per_node=2 evaluate.py --ckpt RUN/model_final.pth [...]
    python evaluate.py --gt GT.json --pred RESULTS.json [--out metrics.json] [--aji-mode clean|gains] [--max-dets N]
    python evaluate.py --ckpt RUN/model_final.pth --images DIR [--out DIR] [key=value ...]

The config is the one saved in the checkpoint (+ `key=value` overrides, e.g. `data.root=... test.aji_mode=gains`)
unless `--config` is given. Outputs: `metrics.json`, `results_{split}.json` (COCO results: RLE masks, json
category ids) and `vis/*.png` in --out (default: `eval_{split}` beside the checkpoint). --max-dets: AP and
every AJI score the top N detections per image and category (COCO's maxDets; 100 = the paper's evaluator;
none = all); default test.max_dets_eval with --ckpt, none with --gt/--pred. With --images (any
image size: images larger than test.tile_size are predicted tile by tile, test.tiling=auto|always|never):
`labels/X_labels.tif` for image X.<ext> (instance label image for Fiji / napari), `rois/X_rois.zip` (ImageJ
ROI set), `geojson/X.geojson` (QuPath objects), `masks/X.npz` (exact, overlapping masks as crops:
gains.exports.read_instances_npz), `overlays/X.png`, `results.json` and `images.json` (file name <-> image id
1..N in sorted name order).
The library is gains/evaluation.py and gains/inference.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gains import dist
from gains.cli_errors import one_line
from gains.errors import CheckpointError, ConfigError, DataError, EvaluationError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --ckpt)")
    p.add_argument("--ckpt", help="checkpoint written by train.py (model_final.pth)")
    p.add_argument("--config", help="YAML config to use instead of the checkpoint's saved one")
    p.add_argument("--split", choices=("train", "val", "test"), help="split to evaluate (default: test.split)")
    p.add_argument("--out", help="output folder (--ckpt) or metrics json file (--gt/--pred)")
    p.add_argument("--vis", type=int, help="draw ground truth | prediction PNGs of K images (default: test.vis)")
    p.add_argument("--images", help="folder of unlabelled images to predict (PNG/JPEG/TIFF)")
    p.add_argument("--gt", help="COCO ground-truth json to score --pred against (no model)")
    p.add_argument("--pred", help="COCO results json (segm RLE) to score")
    p.add_argument("--aji-mode", choices=("clean", "gains"), help="AJI mode (default: test.aji_mode / clean)")
    p.add_argument("--score-thresh", type=float, help="--gt/--pred: ignore results below this score")
    p.add_argument("--max-dets", type=_max_dets, metavar="N|none",
                   help="detections scored per image and category by AP and every AJI (COCO maxDets; 100 = the "
                        "paper's evaluator; none = all). Default: test.max_dets_eval (--ckpt), none (--gt/--pred)")
    args = p.parse_intermixed_args(argv)
    if args.gt or args.pred:
        if not (args.gt and args.pred):
            p.error("--gt and --pred go together")
        if args.ckpt or args.images or args.config or args.overrides:
            p.error("--gt/--pred scores a results file; --ckpt, --images, --config and overrides do not apply")
    elif not args.ckpt:
        p.error("pass --ckpt CHECKPOINT (evaluate a model / predict --images) or --gt GT.json --pred RESULTS.json")
    if args.vis is not None and args.vis < 0:
        p.error("--vis must be >= 0")
    return args


NO_CAP = "none"  # --max-dets none: score every detection (test.max_dets_eval=null)


def _max_dets(text: str):
    """--max-dets N|none -> int N >= 10 or NO_CAP."""
    if text.strip().lower() in ("none", "null", "all"):
        return NO_CAP
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or 'none'") from None
    if value < 10:
        raise argparse.ArgumentTypeError(f"{value} is below 10 (COCO also reports AR at 1 and 10 detections); "
                                         "use 100 for the paper's evaluator or 'none' for every detection")
    return value


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def score_file(args) -> None:
    from gains.evaluation import evaluate_results, format_table
    from gains.atomic import write_json_atomic

    gt_path, pred_path = Path(args.gt), Path(args.pred)
    gt = _read_json(gt_path, "ground-truth json (--gt)")
    results = _read_json(pred_path, "results json (--pred)")
    max_dets = None if args.max_dets in (None, NO_CAP) else args.max_dets
    metrics = evaluate_results(gt, results, args.aji_mode or "clean", args.score_thresh, split=pred_path.stem,
                               gt_name=str(gt_path), results_name=str(pred_path), max_dets=max_dets)
    metrics.update(gt=str(gt_path), pred=str(pred_path))
    out = Path(args.out) if args.out else pred_path.with_name(f"{pred_path.stem}_metrics.json")
    write_json_atomic(out, metrics)
    print(format_table(metrics))
    print(f"wrote {out}")


def run_model(args) -> None:
    from gains.evaluation import evaluate_model
    from gains.inference import load_for_inference, predict_folder

    overrides = list(args.overrides) + ([f"test.aji_mode={args.aji_mode}"] if args.aji_mode else [])
    if args.max_dets is not None:
        overrides.append(f"test.max_dets_eval={'null' if args.max_dets == NO_CAP else args.max_dets}")
    ckpt = Path(args.ckpt)
    if args.images:
        from gains.inference import list_images
        list_images(args.images)  # a missing/empty folder is reported before the model is loaded
    cfg, model, category_map = load_for_inference(ckpt, args.config, overrides)
    if args.images:
        out = Path(args.out) if args.out else ckpt.parent / f"predictions_{Path(args.images).name}"
        summary = predict_folder(model, cfg, args.images, out, category_map)
        if summary:
            print(f"predicted {summary['num_images']} images, {summary['num_detections']} instances with score "
                  f">= {cfg.test.score_thresh:g}; wrote {out}/results.json, images.json, labels/, rois/, geojson/, masks/, overlays/")
        return
    split = args.split or str(cfg.test.split)
    out = Path(args.out) if args.out else ckpt.parent / f"eval_{split}"
    if evaluate_model(model, cfg, split, out, vis=args.vis, expected_category_map=category_map):
        print(f"wrote {out}/metrics.json and {out}/results_{split}.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))  # known before the process group exists
    finished = False  # every rank got through: leave the group together (a barrier), else just leave
    try:
        if args.gt:
            score_file(args)
        else:
            dist.init_distributed()
            run_model(args)
        finished = True
    except ConfigError as e:
        if rank == 0:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError, EvaluationError, FileNotFoundError) as e:
        # errors whose message names the culprit and the fix: no traceback
        if rank == 0:
            print(f"evaluate.py: error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_distributed(synchronize=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
