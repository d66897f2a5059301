#!/usr/bin/env python
"""What a DataLoader worker pays to send one image's targets to the training process, by instance count.

    python benchmarks/bench_ipc.py [--instances 30 300 3000] [--repeats 20]

A worker pickles each batch with torch's shared-memory reductions: every tensor becomes its own shared-memory
segment and file descriptor. SparseMaps (gains/sparse_maps.py) pickle all their patches as one flat tensor;
the peer here is the same patches sent one tensor each (what pickling the patch list does, and what
SparseMaps did before). Both go through the same torch.multiprocessing queue from a worker process; the
time is from `get()` returning to the patches being usable, median of `--repeats`, and the Markdown table
gives the ratio. Patches are 24 x 24 uint8 (a nucleus mask) and float32 (its GA map), as in a training item.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_maps(n: int):
    """A mask and a GA SparseMaps of n instances on a 2048 x 2048 field (boxes on a grid, 24 x 24 patches)."""
    import torch

    from gains.sparse_maps import SparseMaps

    side = 24
    per_row = 2048 // side
    boxes = torch.tensor([[(i % per_row) * side, (i // per_row) * side, (i % per_row + 1) * side,
                           (i // per_row + 1) * side] for i in range(n)], dtype=torch.int64)
    masks = SparseMaps(boxes, [torch.ones(side, side, dtype=torch.uint8) for _ in range(n)], (2048, 2048), 0.0)
    ga = SparseMaps(boxes, [torch.full((side, side), 1.25) for _ in range(n)], (2048, 2048), 1.0)
    return masks, ga


def producer(queue, done, n: int, repeats: int, as_lists: bool) -> None:
    masks, ga = make_maps(n)
    for _ in range(repeats):
        queue.put((masks.boxes, masks.patches, ga.boxes, ga.patches) if as_lists else (masks, ga))
    queue.put(None)
    done.wait()  # the receiver fetches each descriptor from this process: stay alive until it has all


def receive_seconds(n: int, repeats: int, as_lists: bool) -> float:
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    queue, done = ctx.Queue(maxsize=2), ctx.Event()
    worker = ctx.Process(target=producer, args=(queue, done, n, repeats, as_lists))
    worker.start()
    times = []
    while True:
        time.sleep(0.05)  # let the worker fill the queue: only the receiving side is timed
        t0 = time.perf_counter()
        item = queue.get()
        if item is None:
            break
        total = sum(int(p.numel()) for p in (item[1] + item[3] if as_lists else item[0].patches + item[1].patches))
        times.append(time.perf_counter() - t0)
        assert total == 2 * n * 24 * 24
        del item
    done.set()
    worker.join()
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, nargs="+", default=[30, 300, 3000])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    import torch

    torch.multiprocessing.set_sharing_strategy("file_descriptor")  # the DataLoader's default on Linux
    print("| instances / image | one tensor per patch, ms | SparseMaps (one flat tensor), ms | ratio |")
    print("|---|---|---|---|")
    for n in args.instances:
        per_patch = receive_seconds(n, args.repeats, as_lists=True)
        flat = receive_seconds(n, args.repeats, as_lists=False)
        print(f"| {n} | {1e3 * per_patch:.2f} | {1e3 * flat:.2f} | {per_patch / flat:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
