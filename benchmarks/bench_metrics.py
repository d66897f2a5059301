"""Time native mask AP (gains.metrics.coco_evaluate) against pycocotools COCOeval on the same RLE inputs.

Both sides start from the same COCO ground-truth dict and results list with RLE-encoded masks, so mask
decoding is inside both timings (pycocotools works on RLE directly; the native path decodes to bool masks).
pycocotools: COCO() from the dict + loadRes + evaluate + accumulate + summarize. Native: coco_evaluate().
The in-memory entry point (evaluate_instances on already decoded masks) is timed too, for information.

    python benchmarks/bench_metrics.py --threads 1
"""
import argparse
import os
import sys
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--gt", type=int, default=60, help="GT instances per image")
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--size", type=int, default=256, help="image height and width")
    p.add_argument("--categories", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (set before numpy loads)")
    p.add_argument("--repeat", type=int, default=3, help="best of N runs for each side")
    return p.parse_args()


def ellipse(rng, size):
    """A random filled ellipse, bool [size, size]; radii 4-28 px, so neighbours overlap."""
    import numpy as np

    m = np.zeros((size, size), dtype=bool)
    cy, cx = rng.uniform(0, size, 2)
    ry, rx = rng.uniform(4, 28, 2)
    y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, size))
    x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, size))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    m[y0:y1, x0:x1] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return m if m.any() else ellipse(rng, size)


def make_data(args):
    """Seeded COCO gt dict and results list; 70% of the detections are jittered copies of GTs."""
    import numpy as np
    from pycocotools import mask as mask_utils

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        r["counts"] = r["counts"].decode()
        return r

    rng = np.random.default_rng(args.seed)
    cats = list(range(1, args.categories + 1))
    gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in cats]}
    results = []
    for image_id in range(1, args.images + 1):
        gt["images"].append({"id": image_id, "height": args.size, "width": args.size})
        masks = [ellipse(rng, args.size) for _ in range(args.gt)]
        labels = rng.choice(cats, size=args.gt).tolist()
        for m, c in zip(masks, labels):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": c,
                                      "iscrowd": 0, "area": float(m.sum()), "segmentation": rle(m)})
        for _ in range(args.dets):
            if rng.random() < 0.7:
                k = rng.integers(args.gt)
                m, c = np.roll(masks[k], tuple(rng.integers(-3, 4, 2)), axis=(0, 1)), labels[k]
            else:
                m, c = ellipse(rng, args.size), int(rng.choice(cats))
            results.append({"image_id": image_id, "category_id": c, "score": float(np.round(rng.random(), 3)),
                            "segmentation": rle(m)})
    return gt, results


def run_pycocotools(gt, results):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def best_time(fn, make_inputs, repeat):
    """Best wall time of `repeat` calls; inputs are rebuilt (untimed) since pycocotools mutates them."""
    import time

    best, out = float("inf"), None
    for _ in range(repeat):
        inputs = make_inputs()
        t0 = time.perf_counter()
        out = fn(*inputs)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import copy

    import numpy as np
    from pycocotools import mask as mask_utils

    from gains.metrics import coco_evaluate, evaluate_instances

    gt, results = make_data(args)
    t_ref, ref = best_time(run_pycocotools, lambda: (copy.deepcopy(gt), copy.deepcopy(results)), args.repeat)
    t_nat, nat = best_time(coco_evaluate, lambda: (gt, results), args.repeat)

    def masks(rles):  # what a model hands over: C-contiguous bool [N, H, W]
        return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)).astype(bool)

    def decoded():
        gts, dets = [], []
        for im in gt["images"]:
            anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
            res = [r for r in results if r["image_id"] == im["id"]]
            gts.append({"image_id": im["id"], "labels": [a["category_id"] for a in anns],
                        "areas": [a["area"] for a in anns],
                        "masks": masks([a["segmentation"] for a in anns])})
            dets.append({"labels": [r["category_id"] for r in res], "scores": [r["score"] for r in res],
                         "masks": masks([r["segmentation"] for r in res])})
        return gts, dets, [c["id"] for c in gt["categories"]]

    t_mem, mem = best_time(evaluate_instances, decoded, args.repeat)
    diff = max(abs(a - b) for a, b in zip(ref, nat["stats"]))
    diff_mem = max(abs(a - b) for a, b in zip(ref, mem["stats"]))
    print(f"{args.images} images x {args.gt} GT x {args.dets} detections, {args.size}x{args.size}, "
          f"{args.categories} categor{'y' if args.categories == 1 else 'ies'}, seed {args.seed}, "
          f"{args.threads} thread(s), best of {args.repeat}\n")
    print("| path | inputs | time (s) | speed-up vs pycocotools | max abs stat diff |")
    print("|---|---|---:|---:|---:|")
    print(f"| pycocotools COCO+loadRes+evaluate+accumulate+summarize | RLE | {t_ref:.3f} | 1.0x | - |")
    print(f"| gains coco_evaluate (decode included) | RLE | {t_nat:.3f} | {t_ref / t_nat:.1f}x | {diff:.1e} |")
    print(f"| gains evaluate_instances | decoded bool masks | {t_mem:.3f} | {t_ref / t_mem:.1f}x | {diff_mem:.1e} |")
    print(f"\nAP {100 * nat['stats'][0]:.2f}, AP50 {100 * nat['stats'][1]:.2f}; stats identical: "
          f"{ref == nat['stats']} (bitwise), within 1e-9: {diff <= 1e-9}")
    if not np.isfinite(diff) or diff > 1e-9:
        sys.exit("native stats differ from pycocotools")


if __name__ == "__main__":
    main()
