"""Time GAMM (gains/gamm.py) on one core and print markdown tables.

1. variant isbi on a seeded synthetic 512×512 image: 6 elliptic cells (three overlapping pairs), each with a
   nucleus of the non-target category inside; ws 5, GA 0.5, overlap 0.1, target 0 (the ISBI2014 preset);
2. the slow literal loop oracle (tests/gamm_oracle.py) against the vectorised code on a small image;
3. the authors' recorded seconds per fixture image (tests/fixtures/gamm/*/original_run.json) against ours.

    python benchmarks/bench_gamm.py [--repeats 5] [--seed 0] [--size 512]
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: single-core timings

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from gains.gamm import compute_ga_maps, gamm_masks  # noqa: E402
from gamm_oracle import oracle_ga_maps  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "gamm"
ISBI = dict(variant="isbi", window_size=5, ga_factor=0.5, overlap_hl=0.1, target_category_id=0)


def ellipse(cx, cy, a, b, angle, points=48):
    """Flat COCO polygon of an ellipse with semi-axes a, b rotated by ``angle`` radians."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1).ravel().tolist()


def synthetic_cells(rng, size, pairs, radius):
    """(segmentations, category ids): ``pairs`` overlapping pairs of cells (category 0), a nucleus
    (category 1) inside each cell. ``radius`` = (min, max) cell semi-axis in pixels."""
    segs, cats = [], []
    slots = [(size * (0.25 + 0.5 * (p % 2)), size * (p // 2 + 0.5) / ((pairs + 1) // 2)) for p in range(pairs)]
    for cx, cy in slots:
        for side in (-1, 1):
            a, b = rng.uniform(*radius, size=2)
            x, y = cx + side * 0.6 * a, cy + rng.uniform(-0.2, 0.2) * b  # overlapping neighbours
            angle = rng.uniform(0, np.pi)
            segs.append([ellipse(x, y, a, b, angle)])
            cats.append(0)
            segs.append([ellipse(x, y, 0.3 * a, 0.3 * b, rng.uniform(0, np.pi), points=24)])
            cats.append(1)
    return segs, cats


def best_of(fn, repeats):
    """(median, min) wall seconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(np.min(times))


def bench_synthetic(args):
    rng = np.random.default_rng(args.seed)
    segs, cats = synthetic_cells(rng, args.size, pairs=3, radius=(0.09 * args.size, 0.16 * args.size))
    masks = gamm_masks(segs, args.size, args.size)
    raster = best_of(lambda: gamm_masks(segs, args.size, args.size), args.repeats)
    maps = best_of(lambda: compute_ga_maps(masks, cats, None, **ISBI), args.repeats)
    overlaps = sum((masks[i] & masks[j]).any() for i in range(0, 12, 2) for j in range(i + 2, 12, 2))
    print(f"\n### isbi, {args.size}×{args.size}, 6 cells ({overlaps} overlapping pairs) + 6 nuclei, ws 5\n")
    print("| step | median s | min s |\n|---|---|---|")
    print(f"| gamm_masks (12 polygons) | {raster[0]:.4f} | {raster[1]:.4f} |")
    print(f"| compute_ga_maps | {maps[0]:.4f} | {maps[1]:.4f} |")
    print(f"| total per image | {raster[0] + maps[0]:.4f} | {raster[1] + maps[1]:.4f} |")


def bench_oracle(args):
    rng = np.random.default_rng(args.seed + 1)
    segs = [[ellipse(*rng.uniform(16, 32, 2), *rng.uniform(7, 12, 2), rng.uniform(0, np.pi))] for _ in range(3)]
    masks, cats = gamm_masks(segs, 48, 48), [0, 0, 0]
    fast = best_of(lambda: compute_ga_maps(masks, cats, None, **ISBI), args.repeats)
    slow = best_of(lambda: oracle_ga_maps(masks, cats, None, **ISBI), 1)
    err = np.abs(compute_ga_maps(masks, cats, None, **ISBI) - oracle_ga_maps(masks, cats, None, **ISBI)).max()
    print("\n### loop oracle vs vectorised, isbi, 48×48, 3 cells, ws 5\n")
    print("| implementation | median s | speed-up |\n|---|---|---|")
    print(f"| tests/gamm_oracle.py (loops) | {slow[0]:.4f} | 1 |")
    print(f"| gains/gamm.py | {fast[0]:.5f} | {slow[0] / fast[0]:.0f}× |")
    print(f"\nmax |Δ| between them: {err:.1e}")


def bench_fixtures(args):
    print("\n### fixture images: the authors' scripts (recorded) vs gains/gamm.py\n")
    print("| folder | image | H×W | annotations | original s | ours s | speed-up |\n|---|---|---|---|---|---|---|")
    for folder in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        params = json.loads((folder / "params.json").read_text())
        coco = json.loads((folder / "annotations.json").read_text())
        run = {im["id"]: im for im in json.loads((folder / "original_run.json").read_text())["images"]}
        for im in coco["images"]:
            anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]

            def one_image():  # what preprocessing does per image: rasterise, then map
                masks = gamm_masks([a["segmentation"] for a in anns], im["height"], im["width"])
                return compute_ga_maps(masks, [a["category_id"] for a in anns], [a["bbox"] for a in anns],
                                       **params)

            ours = best_of(one_image, args.repeats)[0]
            orig = run[im["id"]]["original_seconds"]
            print(f"| {folder.name} | {im['file_name']} | {im['height']}×{im['width']} | {len(anns)} "
                  f"| {orig:.3f} | {ours:.4f} | {orig / ours:.0f}× |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--size", type=int, default=512, help="side of the synthetic isbi image")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"numpy {np.__version__}, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    bench_synthetic(args)
    bench_oracle(args)
    bench_fixtures(args)


if __name__ == "__main__":
    main()
