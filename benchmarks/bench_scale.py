#!/usr/bin/env python
"""Scale: training memory vs instance count, GA map disk layouts, tiled prediction of a whole field.

    nice python benchmarks/bench_scale.py [--work /tmp/gains_bench_scale] [--parts 1 2 3] [--quick]

Every configuration runs in its own subprocess (this file with --child), so its peak RSS is its own:
/proc/self/status VmHWM, reset (`5 > /proc/self/clear_refs`) right before the measured phase; getrusage's
ru_maxrss is inherited across fork+exec and would report the parent's high-water mark. Linux only.

1. Training step vs instance count. One 1024x1024 field (gains.synthetic_field, one train image) per count
   (50 / 200 / 800 touching nuclei); GA maps (nuclei variant, ws 8, factor 0.8, ol 0.1) precomputed once
   per field in the compact layout, not timed. Per configuration one subprocess builds the data set and the
   model, then runs 1 warm-up + 2 timed steps; a step = build the data set item (dataset[0]: read image,
   masks, GA maps) + forward + backward + SGD step. Paths: gains sparse targets (data.target_format=sparse),
   gains dense targets (target_format=dense), and torchvision's Mask R-CNN R50-FPN (random weights, built as
   benchmarks/bench_model.py does: FrozenBatchNorm2d + trainable_layers=3 like ours; torchvision needs dense
   uint8 masks [N,H,W], taken from the dense item). Both models: ResNet-50, FPN 256, frozen BN calibrated
   on the image (bench_model.calibrate_frozen_bn), same image, min/max size = the field's side and no flip,
   so nothing is resized. A dense cell whose estimated peak exceeds --max-gb is skipped, not run: the
   estimate is the sparse path's peak at that N (run first) plus the path's excess over it, linear in N
   through the smaller counts measured (fallback: N*H*W*~10 bytes). One more subprocess measures
   torchvision.ops.box_iou(N GT boxes, all anchors) alone: the RPN's anchor labelling, O(N x anchors).
2. GA map disk size: preprocess.py --layout compact vs --layout authors on 4 fields (1024^2, 200 nuclei),
   nuclei (ws 8, factor 0.8, ol 0.1) and isbi (ws 5, factor 0.5, ol 0.1) variants: files, bytes, time.
   The authors' folders (one dense float32 H x W .npy per annotation) are deleted after measuring.
3. Prediction of a 4096x4096 field with 2,000 touching nuclei: a small model (ResNet-18 FPN 64, GroupNorm,
   configs/quickstart.yaml's architecture) is first trained on random crops of 3 1024^2 training fields
   (not timed; cached under --work, reruns skip it). Then tiled (tile = crop size, overlap >= 2x the
   largest nucleus, scale 1) vs the whole-image path, and on 768^2 fields whole-image at scale 1 vs tiled:
   time, peak RSS, and recall at mask IoU 0.5 (one-to-one, CropMasks.intersections; never dense [N,H,W]).

Results: Markdown on stdout (progress on stderr) and in <work>/results.md. About 25 minutes on 2 busy
cores. `--quick`: tiny sizes, ResNet-18 in part 1, fewer runs: a smoke test of every code path (~45 s),
numbers meaningless (tests/test_bench_scale.py).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from machine import describe_machine  # noqa: E402  (benchmarks/ is on sys.path)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

NUCLEI_GAMM = {"variant": "nuclei", "window_size": 8, "ga_factor": 0.8, "overlap_hl": 0.1}
ISBI_GAMM = {"variant": "isbi", "window_size": 5, "ga_factor": 0.5, "overlap_hl": 0.1}
GAMMS = {"nuclei": NUCLEI_GAMM, "isbi": ISBI_GAMM}
PATHS = ("sparse", "dense", "torchvision")
PATH_LABEL = {"sparse": "gains, target_format=sparse", "dense": "gains, target_format=dense",
              "torchvision": "torchvision Mask R-CNN (dense uint8 masks)"}
# dense bytes per instance pixel beyond the model: uint8 masks (+1 while stacking), float32 GA maps, and the
# float32 copy of the masks that the RoI crops align on; torchvision: its transform resizes the masks as
# float32 (+ the uint8 result) and roi_align's float32 copy. Only a fallback: measured slopes are preferred.
DENSE_BYTES_PER_PX = {"dense": 10, "torchvision": 11}
BASE_MIB_GUESS = 3500


# --------------------------------------------------------------------------------------------- plumbing
def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> float:
    """Reset VmHWM to the current RSS; returns that RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def run_child(spec: dict, timeout: float = 1800) -> dict:
    """Run `spec` in a fresh interpreter (this file --child); its last stdout line is the JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        how = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return {"error": f"{how}: " + " | ".join(tail)[-600:]}
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    return out


def _set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(int(n))


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


# ------------------------------------------------------------------------------------- fields on disk
def save_field(path: Path, image: np.ndarray, masks) -> None:
    """An image and its CropMasks as one .npz (crops packed as one flat bool array)."""
    flat = np.concatenate([c.ravel() for c in masks.crops]) if len(masks) else np.zeros(0, bool)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, image=image, boxes=masks.boxes, flat=np.packbits(flat), nbits=np.int64(flat.size),
             size=np.array(masks.image_size, np.int64))
    os.replace(tmp, path)


def load_field(path: Path):
    from gains.instances import CropMasks
    with np.load(path) as z:
        image, boxes, size = z["image"], z["boxes"], tuple(z["size"].tolist())
        flat = np.unpackbits(z["flat"])[:int(z["nbits"])].astype(bool)
    crops, offset = [], 0
    for x0, y0, x1, y1 in boxes.tolist():
        n = (y1 - y0) * (x1 - x0)
        crops.append(flat[offset:offset + n].reshape(y1 - y0, x1 - x0))
        offset += n
    return image, CropMasks(boxes, crops, size)


def ensure_field(path: Path, height: int, width: int, n: int, seed) -> dict:
    if not path.is_file():
        from gains.synthetic_field import make_field
        f = make_field(height, width, n, seed=seed, dtype="uint8")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_field(path, f.image, f.masks)
    _, masks = load_field(path)
    sides = np.maximum(masks.boxes[:, 2] - masks.boxes[:, 0], masks.boxes[:, 3] - masks.boxes[:, 1])
    return {"n": len(masks), "largest": int(sides.max()) if len(sides) else 0}


# ------------------------------------------------------------------------------------- part 1: training
def build_torchvision(depth: int, size: int):
    """torchvision's Mask R-CNN ResNet-FPN as benchmarks/bench_model.py builds it (depth 50: the
    maskrcnn_resnet50_fpn architecture), with FrozenBatchNorm2d and trainable_layers=3 like ours, no resizing
    (min_size = max_size = size), 1000 post-NMS training proposals like ours; 1 class + background."""
    import torch
    import torchvision.models as tvm
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    resnet = getattr(tvm, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    return MaskRCNN(_resnet_fpn_extractor(resnet, trainable_layers=3), num_classes=2, min_size=size,
                    max_size=size, rpn_post_nms_top_n_train=1000)


def child_train_step(spec: dict) -> dict:
    import torch
    from bench_model import calibrate_frozen_bn
    from gains.config import load_config
    from gains.data import build_dataset
    from gains.model import build_model
    from gains.sparse_maps import SparseMaps

    _set_threads(spec["threads"])
    path, size, g = spec["path"], spec["size"], NUCLEI_GAMM
    overrides = [f"data.root={spec['root']}", f"data.min_size_train=[{size}]", f"data.max_size_train={size}",
                 "data.hflip_prob=0.0", "data.num_workers=0",
                 f"data.target_format={'sparse' if path == 'sparse' else 'dense'}",
                 f"model.mode={'mask_rcnn' if path == 'torchvision' else 'gains'}", "model.num_classes=1",
                 f"model.backbone.depth={spec['depth']}",
                 f"gamm.variant={g['variant']}", f"gamm.window_size={g['window_size']}",
                 f"gamm.ga_factor={g['ga_factor']}", f"gamm.overlap_hl={g['overlap_hl']}",
                 "gamm.target_category_id=1", "gamm.on_the_fly=false", "gamm.layout=compact"]
    cfg = load_config(None, overrides)
    dataset = build_dataset(cfg, "train", is_train=True)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen_bn without ImageNet weights: calibrated below instead
        model = build_torchvision(spec["depth"], size) if path == "torchvision" else build_model(cfg)
    image, _ = dataset[0]
    calibrate_frozen_bn(model, [image])
    del image
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def nbytes(x) -> int:
        if isinstance(x, SparseMaps):
            return sum(p.numel() * p.element_size() for p in x.patches) + x.boxes.numel() * 8
        return x.numel() * x.element_size()

    rss_before = _reset_peak()
    steps, data_times, target_bytes, n_inst = [], [], 0, 0
    for _ in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        image, target = dataset[0]
        t_data = time.perf_counter() - t0
        if path == "torchvision":
            target = {k: target[k] for k in ("boxes", "labels", "masks")}
        target_bytes = sum(nbytes(target[k]) for k in ("masks", "ga") if k in target)
        n_inst = len(target["boxes"])
        losses = model([image], [target])
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        steps.append(time.perf_counter() - t0)
        data_times.append(t_data)
        del image, target, losses
    return {"peak_mib": _status_mib("VmHWM"), "rss_before_mib": rss_before, "step_s": steps[spec["warmup"]:],
            "data_s": data_times[spec["warmup"]:], "target_mib": target_bytes / 2**20, "instances": n_inst}


def _estimate_mib(path: str, n: int, size: int, measured: dict) -> float:
    """Peak RSS guess (MiB) for a dense cell at n instances: the sparse path's peak at n (measured first) plus
    this path's excess over it, a line in N through the largest counts measured; else N*H*W*~10 bytes."""
    sparse = dict(measured.get("sparse", []))
    own = sorted(measured.get(path, []))
    per_instance = DENSE_BYTES_PER_PX.get(path, 0) * size * size / 2**20
    base = sparse.get(n)
    if base is None:
        if own:
            return own[-1][1] + (n - own[-1][0]) * per_instance
        return BASE_MIB_GUESS + n * per_instance
    excess = [(m, p - sparse[m]) for m, p in own if m in sparse]
    if len(excess) >= 2:
        (m0, e0), (m1, e1) = excess[-2:]
        return base + e1 + (n - m1) * max(e1 - e0, 0.0) / max(m1 - m0, 1)
    if excess and excess[0][1] > 0:
        return base + excess[0][1] * n / excess[0][0]
    return base + n * per_instance


def child_box_iou(spec: dict) -> dict:
    """Peak RSS growth of torchvision.ops.box_iou(N GT boxes, all anchors of the image): how the RPN's
    anchor labelling would scale with N if it built the whole IoU matrix (torchvision's does; gains.rpn
    `match_anchors` works on chunks of GT boxes)."""
    import torch
    from torchvision.ops import box_iou

    _set_threads(spec["threads"])
    g = torch.rand(spec["n"], 4) * 500
    a = torch.rand(spec["anchors"], 4) * 500
    g[:, 2:] += g[:, :2]
    a[:, 2:] += a[:, :2]
    before = _reset_peak()
    iou = box_iou(g, a)
    del iou
    return {"growth_mib": _status_mib("VmHWM") - before}


def num_anchors(height: int, width: int, strides=(4, 8, 16, 32, 64), per_location: int = 3) -> int:
    return sum(math.ceil(height / s) * math.ceil(width / s) * per_location for s in strides)


def part1(args, work: Path) -> str:
    from gains.annotations import load_coco
    from gains.ga_store import GAMapStore, GammParams, fill_map_folder
    from gains.synthetic_field import write_field_dataset

    size, counts = args.p1_size, args.p1_counts
    g = NUCLEI_GAMM
    params = GammParams(g["variant"], g["window_size"], g["ga_factor"], g["overlap_hl"], 1)
    roots = {}
    for n in counts:  # one train field per count, GA maps once (compact), not timed
        root = work / "p1" / f"field{size}_n{n}"
        paths = write_field_dataset(root, splits={"train": 1}, height=size, width=size, num_instances=n,
                                    seed=1, image_format="png", dtype="uint8")
        records, _, _ = load_coco(paths["train_json"], paths["train_images"])
        store = GAMapStore(paths["train_images"] / params.folder_name, params, on_the_fly=True, layout="compact")
        fill_map_folder(records, store, progress=False)
        roots[n] = root
    results, measured = {}, {}
    for n in counts:
        for path in args.p1_paths:
            if path != "sparse":
                est = _estimate_mib(path, n, size, measured)
                if est > args.max_gb * 1024:
                    results[(n, path)] = {"skipped": est}
                    print(f"  part 1: {path} N={n} skipped (needs ~{est / 1024:.1f} GB)", file=sys.stderr)
                    continue
            spec = {"kind": "train_step", "root": str(roots[n]), "path": path, "size": size, "depth": args.p1_depth,
                    "warmup": args.p1_warmup, "steps": args.p1_steps, "threads": args.threads}
            r = run_child(spec)
            results[(n, path)] = r
            if "peak_mib" in r:
                measured.setdefault(path, []).append((n, r["peak_mib"]))
            print(f"  part 1: {path} N={n}: " + (f"peak {r['peak_mib']:.0f} MiB, "
                  f"{statistics.median(r['step_s']):.2f} s/step" if "peak_mib" in r else r.get("error", "")),
                  file=sys.stderr, flush=True)

    rows = []
    for n in counts:
        ref = results.get((n, "sparse"), {})
        for path in args.p1_paths:
            r = results[(n, path)]
            if "skipped" in r:
                rows.append([PATH_LABEL[path], n, "", f"skipped (needs ~{r['skipped'] / 1024:.1f} GB)",
                             f"~{r['skipped'] / ref['peak_mib']:.1f}x (est.)" if "peak_mib" in ref else "",
                             "", "", "", ""])
                continue
            if "error" in r:
                rows.append([PATH_LABEL[path], n, "", f"failed: {r['error']}", "", "", "", "", ""])
                continue
            step, data = statistics.median(r["step_s"]), statistics.median(r["data_s"])
            vs = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if "peak_mib" in ref else "-"
            rows.append([PATH_LABEL[path], r["instances"], _mib(r["target_mib"]), f"{r['peak_mib']:,.0f}", vs,
                         f"{r['peak_mib'] - r['rss_before_mib']:,.0f}", f"{step:.2f}", f"{data:.3f}",
                         f"{step - data:.2f}"])
    out = [f"**training step vs instance count: one {size}x{size} field (gains.synthetic_field, touching "
           f"nuclei), batch 1, {args.p1_warmup} warm-up + {args.p1_steps} timed steps (median), "
           f"{args.threads} threads**",
           "",
           f"Both models: ResNet-{args.p1_depth} FPN 256, frozen BN (calibrated, random weights), min_size_train = "
           f"max_size_train = {size} and hflip 0, so nothing is resized. A step = building the data set item "
           "(read the PNG, rasterise the masks, read the compact GA maps) + forward + backward + SGD; the data "
           "column is the item part of it. Peak RSS: the whole process (model, optimiser, activations, "
           f"targets) over the {args.p1_warmup + args.p1_steps} steps; RSS before the steps = model, optimiser, "
           "libraries. Target tensors: masks + GA maps as the model receives them (torchvision: masks only).",
           "",
           table(["path", "instances", "target tensors (MiB)", "peak RSS (MiB)", "peak vs sparse",
                  "peak above RSS before the steps (MiB)", "s/step incl. data", "data s/step", "model s/step"],
                 rows)]
    # summary: the target and what grows with N
    big, small = max(counts), min(counts)
    s_big, d_big = results.get((big, "sparse"), {}), results.get((big, "dense"), {})
    lines = []
    if "peak_mib" in s_big and "skipped" in d_big:
        lines.append(f"At {big} instances the dense path was not run (estimated ~{d_big['skipped'] / 1024:.1f} GB "
                     f"> --max-gb {args.max_gb:g}): about {d_big['skipped'] / s_big['peak_mib']:.1f}x the sparse "
                     f"path's {s_big['peak_mib']:,.0f} MiB. Its targets alone would be {big} x {size} x {size} x 5 "
                     f"bytes = {big * size * size * 5 / 2**20:,.0f} MiB (uint8 masks + float32 GA maps) vs "
                     f"{s_big['target_mib']:.1f} MiB sparse.")
    if "peak_mib" in s_big and "peak_mib" in d_big:
        lines.append(f"At {big} instances: dense / sparse peak RSS = {d_big['peak_mib'] / s_big['peak_mib']:.1f}x "
                     f"(whole process); target tensors {d_big['target_mib'] / s_big['target_mib']:,.0f}x.")
    for path in args.p1_paths:
        a, b = results.get((small, path), {}), results.get((big, path), {})
        if "peak_mib" in a and "peak_mib" in b and big > small:
            grow = b["peak_mib"] - a["peak_mib"]
            lines.append(f"{PATH_LABEL[path]}: peak RSS grows {grow:+,.0f} MiB from {small} to {big} instances "
                         f"({grow / (big - small) * 1024:,.0f} KiB per instance; N x H x W x 1 byte would be "
                         f"{size * size / 1024:,.0f} KiB).")
    g_s, g_d = ((results.get((big, p), {}).get("peak_mib", math.nan) - results.get((small, p), {})
                 .get("peak_mib", math.nan)) for p in ("sparse", "dense"))
    if math.isfinite(g_s) and math.isfinite(g_d) and big > small:
        lines.append(f"Instance-dependent peak ({small} -> {big}): dense {g_d:,.0f} MiB vs sparse {g_s:,.0f} MiB"
                     + (f" = {g_d / g_s:,.0f}x." if g_s > 1 else " (sparse: within measurement noise)."))
    anchors = num_anchors(size, size)
    r = {} if args.quick else run_child({"kind": "box_iou", "n": big, "anchors": anchors, "threads": args.threads})
    if "growth_mib" in r:
        lines.append(f"RPN anchor labelling alone: torchvision.ops.box_iou({big} GT boxes, {anchors:,} anchors "
                     f"of a {size}^2 image) peaks at +{r['growth_mib']:,.0f} MiB "
                     f"({r['growth_mib'] * 2**20 / (big * anchors):.0f} bytes per GT-anchor pair: [N, A, 2] float32 "
                     "corner/size tensors + [N, A] inter, union, IoU). torchvision's RPN builds this whole matrix, "
                     "the largest part of its N-dependent memory; gains.rpn.match_anchors matches the anchors "
                     "in chunks of GT boxes (same matches, about 300 MB at most).")
    if lines:
        out += ["", *["- " + line for line in lines]]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ part 2: GA disk
def _folder_stats(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def part2(args, work: Path) -> str:
    import re

    from gains.ga_store import GammParams
    from gains.synthetic_field import write_field_dataset

    name = f"fields{args.p2_size}_n{args.p2_instances}_x{args.p2_fields}"
    paths = write_field_dataset(work / "p2" / name, splits={"train": args.p2_fields}, height=args.p2_size,
                                width=args.p2_size, num_instances=args.p2_instances, seed=2,
                                image_format="png", dtype="uint8")
    rows, sizes = [], {}
    for g in (GAMMS[v] for v in args.p2_variants):
        params = GammParams(g["variant"], g["window_size"], g["ga_factor"], g["overlap_hl"], 1)
        for layout in ("compact", "authors"):
            out = work / "p2" / f"maps_{name}_{g['variant']}_{layout}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, str(ROOT / "preprocess.py"), "--json", str(paths["train_json"]),
                   "--images", str(paths["train_images"]), "--variant", g["variant"],
                   "--window-size", str(g["window_size"]), "--ga-factor", str(g["ga_factor"]),
                   "--overlap-hl", str(g["overlap_hl"]), "--target-category", "1", "--out", str(out),
                   "--layout", layout]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                rows.append([g["variant"], layout, f"failed: {proc.stderr.strip()[-300:]}", "", "", "", "", ""])
                continue
            inner = re.search(r"time: ([0-9.]+) s", proc.stdout)
            files, nbytes = _folder_stats(out / params.folder_name)
            sizes[(g["variant"], layout)] = nbytes
            maps = args.p2_fields * args.p2_instances
            rows.append([f"{g['variant']} ws {g['window_size']} f {g['ga_factor']} ol {g['overlap_hl']}",
                         layout, files, f"{nbytes:,}", f"{nbytes / 2**20:,.1f}", f"{nbytes / maps / 1024:,.1f}",
                         "", f"{float(inner.group(1)) if inner else float('nan'):.1f} / {wall:.1f}"])
            if layout == "authors" and not args.keep_authors:
                shutil.rmtree(out, ignore_errors=True)
    for row in rows:  # ratio column
        key = (row[0].split()[0], row[1])
        if key[1] == "authors" and key in sizes and (key[0], "compact") in sizes:
            row[6] = f"{sizes[key] / sizes[(key[0], 'compact')]:,.0f}x"
        elif key[1] == "compact" and key in sizes:
            row[6] = "1x"
    return "\n".join([
        f"**GA map folders: {args.p2_fields} fields {args.p2_size}x{args.p2_size}, {args.p2_instances} nuclei "
        f"each ({args.p2_fields * args.p2_instances} maps), float32, `preprocess.py --layout compact|authors`**",
        "",
        "compact = one `image_{id}.npz` of lossless crops per image; authors = one dense H x W `{ann_id}.npy` "
        "per annotation. Time: preprocess's own GAMM + write time / wall time of the command (includes "
        "Python start-up, ~2 s), 1 worker.",
        "",
        table(["GAMM", "layout", "files", "bytes", "MiB", "KiB per map", "size vs compact",
               "time s (GAMM+write / wall)"], rows)])


# ------------------------------------------------------------------------------- part 3: prediction
def train_fields_dir(args, work: Path) -> Path:
    return work / "p3" / f"train_fields{args.p3_train_size}_n{args.p3_train_instances}_x{args.p3_train_fields}"


def model_overrides(args, work: Path, max_iter: int | None = None) -> list[str]:
    crop, g = args.p3_crop, NUCLEI_GAMM
    it = args.p3_iters if max_iter is None else max_iter
    return [f"data.root={train_fields_dir(args, work)}", "data.synthetic=false", f"data.crop_size={crop}",
            f"data.min_size_train=[{crop}]", f"data.max_size_train={crop}", f"data.min_size_test={crop}",
            f"data.max_size_test={crop}", "data.hflip_prob=0.5", "data.vflip_prob=0.5", "data.rot90_prob=0.5",
            "data.num_workers=0", "model.num_classes=1", f"gamm.variant={g['variant']}",
            f"gamm.window_size={g['window_size']}", f"gamm.ga_factor={g['ga_factor']}",
            f"gamm.overlap_hl={g['overlap_hl']}", "gamm.target_category_id=1",
            f"gamm.map_dir={train_fields_dir(args, work) / 'maps'}", f"solver.ims_per_batch={args.p3_batch}",
            f"solver.max_iter={it}", f"solver.warmup_iters={min(100, it // 4)}",
            f"solver.steps=[{int(it * 0.75)}, {int(it * 0.92)}]", f"solver.checkpoint_period={it}",
            f"solver.log_period={max(1, min(20, it))}", "test.eval_at_end=false", "test.vis=0",
            "model.roi_heads.detections_per_image=300",
            # the model and sampling its README figures were measured with (the quickstart's before it went to
            # 32 channels / bf16, 2026-12-03, and to 96 RoIs / 500-300 proposals, 2026-12-04)
            "model.roi_heads.mask_conv_dim=64", "solver.amp=false", "model.roi_heads.batch_size_per_image=128",
            "model.rpn.pre_nms_topk_train=1000", "model.rpn.post_nms_topk_train=500"]


def child_train_model(spec: dict) -> dict:
    from gains.config import load_config
    from gains.engine import train

    _set_threads(spec["threads"])
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", spec["overrides"] + [f"output_dir={spec['out']}"])
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg)
    return {"checkpoint": str(result.final_checkpoint), "train_s": time.perf_counter() - start}


def _match(pred, scores: np.ndarray, gt, iou: float = 0.5) -> tuple[int, int]:
    """(true positives, GT matched) of a one-to-one greedy match by descending score at mask IoU >= iou.
    Intersections from CropMasks (only pairs whose boxes meet): never a dense [N, H, W] array."""
    if not len(pred) or not len(gt):
        return 0, 0
    inter = pred.intersections(gt).astype(np.float64)
    union = pred.areas()[:, None] + gt.areas()[None, :] - inter
    ious = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    taken = np.zeros(len(gt), bool)
    tp = 0
    for p in np.argsort(-scores, kind="stable"):
        cand = np.where(taken, -1.0, ious[p])
        g = int(np.argmax(cand))
        if cand[g] >= iou:
            taken[g], tp = True, tp + 1
    return tp, int(taken.sum())


def child_predict(spec: dict) -> dict:
    import torch
    from gains.checkpoint import load_checkpoint
    from gains.config import load_config
    from gains.model import build_model
    from gains.predictor import Predictor

    _set_threads(spec["threads"])
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", spec["overrides"])
    model = build_model(cfg)
    load_checkpoint(spec["checkpoint"], model)
    model.eval()
    if spec.get("rpn_topk"):
        k = int(spec["rpn_topk"])
        model.rpn.pre_nms_topk = (model.rpn.pre_nms_topk[0], k)
        model.rpn.post_nms_topk = (model.rpn.post_nms_topk[0], k)
    fields = [load_field(Path(p)) for p in spec["fields"]]
    predictor = Predictor(model, progress=False, device="cpu", **spec["predictor"])
    torch.set_grad_enabled(False)
    rss_before = _reset_peak()
    start = time.perf_counter()
    try:
        preds = [predictor(image)[0] for image, _ in fields]
    except ValueError as e:
        return {"refused": str(e), "peak_mib": _status_mib("VmHWM"), "time_s": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    gt_total = dets = tp_all = hit_all = tp_hi = hit_hi = dets_hi = 0
    for (_, gt), p in zip(fields, preds):
        scores = p["scores"].numpy()
        hi = np.flatnonzero(scores >= 0.5)
        a = _match(p["masks"], scores, gt)
        b = _match(p["masks"].select(hi), scores[hi], gt)
        gt_total += len(gt)
        dets, dets_hi = dets + len(scores), dets_hi + len(hi)
        tp_all, hit_all, tp_hi, hit_hi = tp_all + a[0], hit_all + a[1], tp_hi + b[0], hit_hi + b[1]
    return {"time_s": seconds, "peak_mib": peak, "rss_before_mib": rss_before, "gt": gt_total,
            "dets": dets, "dets_hi": dets_hi, "recall": hit_all / max(gt_total, 1),
            "recall_hi": hit_hi / max(gt_total, 1), "precision_hi": tp_hi / max(dets_hi, 1)}


def part3(args, work: Path) -> str:
    from gains.synthetic_field import write_field_dataset

    p3 = work / "p3"
    write_field_dataset(train_fields_dir(args, work), splits={"train": args.p3_train_fields},
                        height=args.p3_train_size, width=args.p3_train_size,
                        num_instances=args.p3_train_instances, seed=3,
                        image_format="png", dtype="uint8")
    overrides = model_overrides(args, work)
    tag = hashlib.sha1(json.dumps([overrides, args.p3_train_fields, args.p3_train_size,
                                   args.p3_train_instances]).encode()).hexdigest()[:10]
    out = p3 / f"model_{tag}"
    ckpt = out / "model_final.pth"
    train_note = f"cached checkpoint {ckpt} (trained earlier; not timed)"
    if not ckpt.is_file():
        r = run_child({"kind": "train_model", "overrides": overrides, "out": str(out), "threads": args.threads},
                      timeout=3600)
        if "error" in r:
            return f"**part 3: training failed**: {r['error']}"
        train_note = f"trained in {r['train_s']:.0f} s (not timed in the tables), checkpoint {ckpt}"
        print(f"  part 3: {train_note}", file=sys.stderr, flush=True)

    big_path = p3 / f"field{args.p3_big}_n{args.p3_big_instances}.npz"
    big = ensure_field(big_path, args.p3_big, args.p3_big, args.p3_big_instances, seed=4)
    small_n = max(1, round(args.p3_big_instances * (args.p3_small / args.p3_big) ** 2))
    small_paths = [p3 / f"field{args.p3_small}_n{small_n}_{i}.npz" for i in range(args.p3_small_fields)]
    small = [ensure_field(p, args.p3_small, args.p3_small, small_n, seed=(5, i)) for i, p in enumerate(small_paths)]
    largest = max([big["largest"]] + [s["largest"] for s in small])
    crop = args.p3_crop
    overlap = int(math.ceil(2 * largest / 8) * 8)
    tiled = {"tiling": "always", "tile_size": crop, "tile_overlap": overlap, "min_size_test": crop,
             "max_size_test": crop, "detections_per_tile": 300,
             "tile_scale": 1.0}  # the training crops' scale (test.tile_scale=auto with data.crop_size=crop)
    base = {"overrides": overrides, "checkpoint": str(ckpt), "threads": args.threads, "kind": "predict"}
    whole = {"tiling": "never", "max_downscale": 0, "detections_per_tile": 300}
    big_runs = {
        "tiled": ("tiled (tile = crop, scale 1)", dict(tiled), None),
        "refused": (f"whole image, tiling=never, as configured (min/max_size_test {crop}, max_downscale 2)",
                    {"tiling": "never", "min_size_test": crop, "max_size_test": crop, "max_downscale": 2.0}, None),
        "shrunk": (f"whole image, max_downscale 0: shrunk to min/max_size_test {args.p3_whole_max}, "
                   "cap 300 dets", {**whole, "min_size_test": args.p3_whole_max,
                                    "max_size_test": args.p3_whole_max}, None),
        "scale1": (f"whole image at scale 1 (min/max_size_test {args.p3_big}), caps as configured "
                   "(RPN top-k 300, 300 dets)", {**whole, "min_size_test": args.p3_big,
                                                  "max_size_test": args.p3_big}, None),
        "scale1_raised": (f"whole image at scale 1, caps raised (RPN top-k {args.p3_raised_caps}, "
                          f"{args.p3_raised_caps} dets)",
                          {**whole, "min_size_test": args.p3_big, "max_size_test": args.p3_big,
                           "detections_per_tile": args.p3_raised_caps}, args.p3_raised_caps),
    }
    big_runs = [big_runs[k] for k in args.p3_runs]
    small_runs = [
        (f"whole image at scale 1 (min/max_size_test {args.p3_small})",
         {"tiling": "never", "min_size_test": args.p3_small, "max_size_test": args.p3_small, "max_downscale": 0,
          "detections_per_tile": 300}, None),
        ("tiled (same tiles as above)", dict(tiled), None),
    ]

    def rows_of(runs, fields):
        rows, recalls, raw = [], [], []
        for label, pred, topk in runs:
            r = run_child({**base, "fields": [str(f) for f in fields], "predictor": pred, "rpn_topk": topk})
            print(f"  part 3: {label}: {r.get('time_s', r.get('error'))}", file=sys.stderr, flush=True)
            raw.append(r)
            if "error" in r:
                rows.append([label, f"failed: {r['error']}", "", "", "", "", "", ""])
            elif "refused" in r:
                why = r["refused"].split(": objects")[0].replace("|", "/")
                rows.append([label, f"refused: {why}", "", "", "", "", "", ""])
            else:
                recalls.append(r["recall_hi"])
                rows.append([label, f"{r['time_s']:.1f}", f"{r['peak_mib']:,.0f}", r["gt"], r["dets"],
                             f"{100 * r['recall']:.1f}", f"{100 * r['recall_hi']:.1f}",
                             f"{100 * r['precision_hi']:.1f}"])
        return rows, recalls, raw

    header = ["run", "time (s)", "peak RSS (MiB)", "GT nuclei", "detections", "recall % (all dets)",
              "recall % (score >= 0.5)", "precision % (score >= 0.5)"]
    big_rows, _, big_raw = rows_of(big_runs, [big_path])
    small_rows, small_recalls, _ = rows_of(small_runs, small_paths) if small_paths else ([], [], [])
    n_tiles = len(__import__("gains.tiling", fromlist=["tile_grid"]).tile_grid(args.p3_big, args.p3_big, crop,
                                                                                 overlap))
    notes = [f"Model: ResNet-18 FPN 64, GroupNorm, freeze_at 0 (configs/quickstart.yaml), mode gains, "
             f"{args.p3_iters} iterations x {args.p3_batch} random {crop}x{crop} crops (scale 1, flips, 90-degree "
             f"turns) of {args.p3_train_fields} training fields {args.p3_train_size}^2 with "
             f"{args.p3_train_instances} nuclei; {train_note}. Test fields are held out (other seeds). Recall: "
             "one-to-one greedy match by score at mask IoU >= 0.5 (CropMasks.intersections).",
             f"Tiles: {crop} px = the training crop, overlap {overlap} px (>= 2x the largest nucleus, {largest} px), "
             f"min/max_size_test {crop} (scale 1); {n_tiles} tiles on {args.p3_big}^2. Time = Predictor call "
             "(normalise, tiles, model, paste, merge), model loaded before; peak RSS = the whole process."]
    tiled_big = dict(zip(args.p3_runs, big_raw)).get("tiled", {})
    if "peak_mib" in tiled_big:
        notes.append(f"Tiled {args.p3_big}^2: peak RSS {tiled_big['peak_mib']:,.0f} MiB (target < 4 GB: "
                     f"{'met' if tiled_big['peak_mib'] < 4096 else 'NOT met'}), recall (score >= 0.5) "
                     f"{100 * tiled_big['recall_hi']:.1f} %.")
    if len(small_recalls) == 2:
        notes.append(f"{args.p3_small}^2: |whole - tiled| recall (score >= 0.5) = "
                     f"{100 * abs(small_recalls[0] - small_recalls[1]):.1f} points (target <= 2: "
                     f"{'met' if abs(small_recalls[0] - small_recalls[1]) <= 0.02 else 'NOT met'}).")
    text = [f"**prediction of a {args.p3_big}x{args.p3_big} field with {big['n']} touching nuclei, "
            f"{args.threads} threads**", "", *notes, "", table(header, big_rows)]
    if small_paths:
        text += ["", f"**{args.p3_small_fields} fields {args.p3_small}x{args.p3_small} ({small_n} nuclei each, "
                 "same density), whole image vs tiled, both at scale 1**", "", table(header, small_rows)]
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------- main
P3_RUNS = ("tiled", "refused", "shrunk", "scale1", "scale1_raised")
QUICK = dict(p1_size=128, p1_counts=[6], p1_depth=18, p1_warmup=0, p1_steps=1, p2_fields=1, p2_size=128,
             p2_instances=12, p3_train_fields=1, p3_train_size=256, p3_train_instances=40, p3_crop=96,
             p3_iters=4, p3_batch=2, p3_big=320, p3_big_instances=60, p3_small=128, p3_small_fields=0,
             p2_variants=["nuclei"],
             p3_raised_caps=400, p3_whole_max=160,
             p1_paths=list(PATHS), p3_runs=["tiled", "refused"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/gains_bench_scale"),
                   help="data, maps, the trained model (cached) and results.md")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (seconds, numbers meaningless)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per child (default: all cores)")
    p.add_argument("--max-gb", type=float, default=12.0, help="skip dense cells estimated above this peak RSS")
    p.add_argument("--p1-size", type=int, default=1024)
    p.add_argument("--p1-counts", type=int, nargs="+", default=[50, 200, 800])
    p.add_argument("--p1-paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--p1-depth", type=int, default=50, choices=[18, 34, 50, 101], help="ResNet depth, both models")
    p.add_argument("--p1-warmup", type=int, default=1)
    p.add_argument("--p1-steps", type=int, default=2)
    p.add_argument("--p2-fields", type=int, default=4)
    p.add_argument("--p2-size", type=int, default=1024)
    p.add_argument("--p2-instances", type=int, default=200)
    p.add_argument("--p2-variants", nargs="+", default=list(GAMMS), choices=list(GAMMS))
    p.add_argument("--keep-authors", action="store_true", help="keep the authors'-layout map folders (GBs)")
    p.add_argument("--p3-train-fields", type=int, default=3)
    p.add_argument("--p3-train-size", type=int, default=1024)
    p.add_argument("--p3-train-instances", type=int, default=200)
    p.add_argument("--p3-crop", type=int, default=256, help="training crop = tile size")
    p.add_argument("--p3-iters", type=int, default=300)
    p.add_argument("--p3-batch", type=int, default=4)
    p.add_argument("--p3-big", type=int, default=4096)
    p.add_argument("--p3-big-instances", type=int, default=2000)
    p.add_argument("--p3-small", type=int, default=768)
    p.add_argument("--p3-small-fields", type=int, default=4)
    p.add_argument("--p3-raised-caps", type=int, default=4000)
    p.add_argument("--p3-whole-max", type=int, default=1333, help="max_size_test of the shrunk whole-image run")
    p.add_argument("--p3-runs", nargs="+", default=list(P3_RUNS), choices=P3_RUNS, help="runs on the big field")
    p.add_argument("--out", type=Path, help="results file (default <work>/results.md)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv if argv is not None else sys.argv)}
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    return args


CHILDREN = {"box_iou": child_box_iou, "train_step": child_train_step, "train_model": child_train_model,
            "predict": child_predict}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)
        return 0
    import torch
    args.threads = args.threads or torch.get_num_threads()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    shown = ["python", "benchmarks/bench_scale.py", *(argv if argv is not None else sys.argv[1:])]
    nice = os.nice(0)
    command = ("nice " if nice > 0 else "") + " ".join(shown)
    parts = [f"Machine: {describe_machine()}; torch threads {args.threads}; {datetime.datetime.now():%Y-%m-%d %H:%M}. "
             f"Command: `{command}`" + (" (quick: sizes too small to mean anything)" if args.quick else "") + "."]
    titles = {1: "Training step memory and time vs instance count", 2: "GA map disk size: compact vs authors' layout",
              3: "Prediction of a whole field: tiled vs whole image"}
    funcs = {1: part1, 2: part2, 3: part3}
    total = time.perf_counter()
    for k in args.parts:
        start = time.perf_counter()
        body = funcs[k](args, work)
        parts.append(f"### {titles[k]}\n\n({time.perf_counter() - start:.0f} s)\n\n{body}")
        print(parts[-1] + "\n", flush=True)
    parts.append(f"Total: {time.perf_counter() - total:.0f} s.")
    print(parts[-1])
    text = "\n\n".join(parts) + "\n"
    out = args.out or work / "results.md"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"\n(written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
