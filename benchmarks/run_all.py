#!/usr/bin/env python
"""Every peer comparison of the project in one command, printed as markdown (paste it into benchmarks/README.md):

    python benchmarks/run_all.py [--quick] [--scale] [--out benchmarks/RESULTS.md]

1. GAMM vs the slow loop oracle and the authors' recorded times  (bench_gamm.py)
2. the model vs torchvision's Mask R-CNN: train step, inference, peak memory  (bench_model.py)
3. native mask AP vs pycocotools' COCOeval, identical numbers  (bench_metrics.py)
4. data loading with GA maps from disk vs computed on the fly vs none  (bench_data.py)
5. a worker sending one image's targets: SparseMaps as one flat tensor vs a tensor per patch  (bench_ipc.py)
6. with --scale: training memory vs instance count, GA map disk layouts, tiled prediction of a 4096^2
   field (bench_scale.py; 15-25 more minutes, data and a small trained model cached in /tmp/gains_bench_scale)

Each script runs in its own process, one after the other, so they never compete for the cores. About
8-12 minutes on 2 CPU cores (`--quick`: about 3).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import describe_machine  # noqa: E402  (benchmarks/ is on sys.path)

HERE = Path(__file__).resolve().parent

# (title, script, full args, quick args)
BENCHMARKS = [
    ("GAMM (GA maps) vs loop oracle and the authors' scripts", "bench_gamm.py", ["--repeats", "5"], ["--repeats", "2"]),
    ("Model vs torchvision maskrcnn_resnet50_fpn (random weights)", "bench_model.py",
     ["--size", "512", "--batch", "2", "--iters", "5", "--warmup", "2"],
     ["--size", "256", "--batch", "1", "--iters", "2", "--warmup", "1", "--no-memory"]),
    ("Mask AP vs pycocotools", "bench_metrics.py", ["--threads", "1"], ["--threads", "1", "--images", "20", "--repeat", "1"]),
    ("Data loading", "bench_data.py", ["--images", "48"], ["--images", "12"]),
    ("Targets from a DataLoader worker", "bench_ipc.py", [], ["--instances", "30", "300", "--repeats", "5"]),
]
SCALE = ("Scale: sparse targets, GA map layouts, tiled prediction", "bench_scale.py", [], ["--quick"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in a few minutes")
    parser.add_argument("--scale", action="store_true", help="also run bench_scale.py (15-25 minutes more)")
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    args = parser.parse_args(argv)

    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "") + (" --scale" if args.scale else "")
    parts = [f"## Benchmarks ({datetime.date.today().isoformat()})\n",
             f"Machine: {describe_machine()}. Command: `{command}`.\n"]
    failed = 0
    for title, script, full, quick in BENCHMARKS + ([SCALE] if args.scale else []):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / script), *(quick if args.quick else full)],
                              capture_output=True, text=True, cwd=HERE.parent)
        seconds = time.perf_counter() - start
        body = proc.stdout.strip() if proc.returncode == 0 else \
            f"FAILED (exit {proc.returncode}):\n```\n{proc.stderr.strip()[-2000:]}\n```"
        failed += proc.returncode != 0
        parts.append(f"### {title}\n\n`python benchmarks/{script} {' '.join(quick if args.quick else full)}` "
                     f"({seconds:.0f} s)\n\n{body}\n")
        print(parts[-1], flush=True)
    text = "\n".join(parts)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
