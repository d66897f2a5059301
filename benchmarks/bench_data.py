#!/usr/bin/env python
"""Data loading with GA maps: computed on the fly (first epoch, cached as it goes) vs read back from the map
folder (later epochs) vs no maps at all (mask_rcnn mode), side by side on the synthetic training set, for the
sparse targets (data.target_format=sparse, the default) and the dense [N,H,W] ones.

    python benchmarks/bench_data.py [--images 48] [--size 256] [--threads 1]

Prints a markdown table of milliseconds per image (median of the per-image times).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def time_items(dataset, n: int) -> float:
    """Median seconds per item over the first n items (same order for every setting)."""
    times = []
    for i in range(min(n, len(dataset))):
        start = time.perf_counter()
        dataset[i]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images timed per setting")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from gains.config import load_config
    from gains.data import build_dataset
    from gains.synthetic import make_synthetic_dataset

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        make_synthetic_dataset(root, num_train=args.images, num_val=2, num_test=2,
                               image_size=(args.size, args.size))
        common = [f"data.root={root}", "data.hflip_prob=0.0", f"data.min_size_train=[{args.size}]",
                  "gamm.target_category_id=1"]
        rows = []
        for fmt in ("sparse", "dense"):
            opts = common + [f"data.target_format={fmt}", f"gamm.map_dir={Path(tmp) / ('maps_' + fmt)}"]
            cfg = load_config("configs/quickstart.yaml", opts + ["model.mode=mask_rcnn"])
            rows.append((f"{fmt}: no GA maps (mask_rcnn mode)",
                         time_items(build_dataset(cfg, "train", True), args.images)))
            cfg = load_config("configs/quickstart.yaml", opts)
            fresh = build_dataset(cfg, "train", True)
            rows.append((f"{fmt}: GA maps computed on the fly + cached (epoch 1)", time_items(fresh, args.images)))
            rows.append((f"{fmt}: GA maps read from the map folder (epoch 2+)",
                         time_items(build_dataset(cfg, "train", True), args.images)))
    base = rows[0][1]
    print(f"### data loading, synthetic {args.size}x{args.size}, {args.images} images, {args.threads} thread(s)\n")
    print("| setting | ms / image (median) | vs sparse, no maps |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {1000 * seconds:.1f} | {seconds / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
