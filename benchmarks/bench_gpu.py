"""GAInS R50-FPN vs torchvision's Mask R-CNN R50-FPN on one GPU, in one run: training step, inference, memory.

    python benchmarks/bench_gpu.py                          # full run, CUDA (well under 8 minutes on one GPU)
    python benchmarks/bench_gpu.py --device cpu --quick     # smoke run on the CPU (CI), tiny sizes
    torchrun --standalone --nproc_per_node N benchmarks/bench_gpu.py --ddp       # multi-GPU scaling
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_gpu.py --ddp --device cpu --quick   # gloo smoke

What is measured, on a synthetic ISBI-like batch (512x512 fields of 6 overlapping cells + 6 nuclei, 2 classes,
resized to the training sizes' shortest edge 640 and 800, and 800 for inference), batch 1 and 8, with random
weights (FrozenBN statistics calibrated once so activations stay finite):
- train step: the training engine's step for every model alike (gains.engine: autocast, the host check of
  the losses, SGD as the engine builds it, GradScaler for fp16, lr 1e-4 so the models stay stationary), forward +
  backward + update, `--warmup` steps (cuDNN autotuning happens there) then `--iters` timed steps, each with
  torch.cuda.synchronize() before and after; median / min seconds, images/s = batch / median;
- inference per image: eval forward of the batch / batch size; torchvision pastes masks into the image inside
  its forward, ours returns 28x28 probabilities, so ours is also timed with gains.predictor.paste_masks added
  (the column to compare);
- peak memory: torch.cuda.max_memory_allocated() over the timed steps, with only that model (its weights,
  gradients, optimizer state) and that batch on the GPU. Not measured on the CPU (bench_model.py does RSS);
- precisions: fp32 (PyTorch defaults: TF32 convolutions, fp32 matmuls), bf16 autocast, bf16-cl = bf16 with
  channels_last weights (solver.channels_last), fp16 on request (GradScaler);
- ratios: each model's median / min against torchvision's at the same size, batch and precision;
- host syncs/step (CUDA): synchronising calls in one training step, counted with CUDA's sync debug mode.

Models: `torchvision` is maskrcnn_resnet50_fpn(weights=None, weights_backbone=None) built as it is with
pretrained weights, i.e. FrozenBatchNorm2d and the stem + res2 frozen (trainable_backbone_layers=3), the same
work as ours (model.backbone.norm=frozen_bn, freeze_at=2); `torchvision_bn` is that constructor's literal
defaults without weights (trainable BatchNorm, every layer trained: more work, shown for reference).
torchvision keeps 1000 RPN proposals per image in training like ours (its default 2000) and resizes with
min_size = max_size = the image side, so no model resizes. Our targets are sparse (patches kept on the CPU,
data.target_format: sparse, the default) unless --targets dense; they stay on the host as the engine leaves
them, torchvision's are on the GPU beforehand.

--ddp (under torchrun): every rank first runs the plain step (no communication: the one-GPU speed, all GPUs
busy at once), then the same model wrapped in DistributedDataParallel as train.py does; reported: step time
(slowest rank), images/s per GPU and in total, scaling efficiency = plain / DDP step time. NCCL on CUDA, gloo
on the CPU.

A run stops starting new measurements after --budget-s seconds (the rest is listed as skipped), so the
default run cannot overrun its slot. Tables are Markdown, like benchmarks/README.md's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gains import dist, optim, train_step  # noqa: E402
from gains.precision import AmpMode, autocast  # noqa: E402
from gains.config import load_config  # noqa: E402
from gains.sparse_maps import SparseMaps  # noqa: E402

MODELS = ("torchvision", "mask_rcnn", "gains", "torchvision_bn")
PRECISIONS = ("fp32", "bf16", "bf16-cl", "fp16", "fp16-cl")
AUTHORS_S_PER_IT = (0.22, 0.51)  # GAInS paper, R50, RTX 3080


# ----------------------------------------------------------------------------------------------- data

def make_isbi_batch(n: int, size: int, cells: int = 6, seed: int = 0):
    """n images [3,size,size] like ISBI 2014 fields (512 px resized to `size`): `cells` cytoplasm ellipses
    (label 1) in overlapping pairs, each with a nucleus (label 2); targets with dense masks and GA maps
    (1 + up to 0.5 around each instance, 1 elsewhere, as GAMM's)."""
    rng = np.random.default_rng(seed)
    s = size / 512
    yy, xx = np.mgrid[:size, :size]
    images, targets = [], []
    for i in range(n):
        img = 0.25 + 0.04 * rng.standard_normal((size, size))
        shapes = []
        for c in range(cells):
            if c % 2 == 0:
                cy, cx = rng.uniform(110, 400, 2) * s
            else:  # the partner overlaps the previous cell
                cy, cx = cy + rng.uniform(-50, 50) * s, cx + rng.uniform(40, 70) * s
            ry, rx = rng.uniform(35, 70, 2) * s
            shapes.append((1, cy, cx, ry, rx, rng.uniform(0.45, 0.6)))
            shapes.append((2, cy, cx, ry * rng.uniform(0.2, 0.3), rx * rng.uniform(0.2, 0.3), 0.85))
        masks, boxes, labels = [], [], []
        for label, cy, cx, ry, rx, value in shapes:
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            if m.sum() < 4:
                continue
            img[m] = np.maximum(img[m], value)
            ys, xs = np.where(m)
            masks.append(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(label)
        masks = np.stack(masks)
        ga = np.ones(masks.shape, np.float32)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            g = int(round(5 * s))
            y0, x0, y1, x1 = max(0, y0 - g), max(0, x0 - g), min(size, y1 + g), min(size, x1 + g)
            ga[k, y0:y1, x0:x1] += 0.5 * rng.random((y1 - y0, x1 - x0), dtype=np.float32)
        images.append(torch.from_numpy(np.clip(img, 0, 1)).float()[None].repeat(3, 1, 1))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.tensor(labels, dtype=torch.int64),
                        "masks": torch.from_numpy(masks.astype(np.uint8)), "ga": torch.from_numpy(ga),
                        "image_id": i})
    return images, targets


def targets_for(name: str, targets: list[dict], device: torch.device, sparse: bool) -> list[dict]:
    """torchvision: boxes/labels/masks on the device. Ours: on the host as the engine leaves them (pinned
    like the DataLoader's batches on CUDA), masks and GA maps as SparseMaps patches when `sparse`."""
    if name.startswith("torchvision"):
        return [{k: t[k].to(device) for k in ("boxes", "labels", "masks")} for t in targets]
    out = []
    for t in targets:
        t = dict(t)
        if sparse:
            t["masks"], t["ga"] = SparseMaps.from_dense(t["masks"]), SparseMaps.from_dense(t["ga"], fill=1.0)
        if device.type == "cuda":
            t = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in t.items()}
        out.append(t)
    return out


# ----------------------------------------------------------------------------------------------- models

# --quick: the R50-FPN models with test_model.py's small sampling sizes, the same for every model (with random
# weights nearly every RoI of a tiny image is foreground: 128 of them per image make the CPU smoke run slow)
LIGHT = dict(rpn_batch=64, roi_batch=32, pre_nms=200, post_nms=100)


def build(name: str, num_classes: int = 2, light: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    tv = dict(rpn_post_nms_top_n_train=1000)
    ours = []
    if light:
        L = LIGHT
        tv = dict(rpn_batch_size_per_image=L["rpn_batch"], box_batch_size_per_image=L["roi_batch"],
                  rpn_pre_nms_top_n_train=L["pre_nms"], rpn_pre_nms_top_n_test=L["pre_nms"],
                  rpn_post_nms_top_n_train=L["post_nms"], rpn_post_nms_top_n_test=L["post_nms"])
        ours = [f"model.rpn.batch_size_per_image={L['rpn_batch']}",
                f"model.roi_heads.batch_size_per_image={L['roi_batch']}",
                f"model.rpn.pre_nms_topk_train={L['pre_nms']}", f"model.rpn.pre_nms_topk_test={L['pre_nms']}",
                f"model.rpn.post_nms_topk_train={L['post_nms']}", f"model.rpn.post_nms_topk_test={L['post_nms']}"]
    if name == "torchvision":
        from torchvision.models import resnet50
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.ops import FrozenBatchNorm2d
        # = maskrcnn_resnet50_fpn's own assembly when it is given weights, without loading any
        backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), trainable_layers=3)
        return MaskRCNN(backbone, num_classes=num_classes + 1, **tv)
    if name == "torchvision_bn":
        from torchvision.models.detection import maskrcnn_resnet50_fpn
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1, **tv)
    from gains.model import build_model
    return build_model(load_config(None, [f"model.mode={name}", f"model.num_classes={num_classes}", *ours]))


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, images: list[torch.Tensor]) -> None:
    """Give every FrozenBatchNorm2d and BatchNorm2d the statistics of its input, layer after layer, as
    pretrained weights would (bench_model.py's calibration, extended to trainable BN's running statistics):
    with random convs and identity normalisation activations blow up through 50 layers, and the timings
    would measure inf/NaN arithmetic. Applied identically to every model."""
    from torchvision.ops import FrozenBatchNorm2d

    def set_stats(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))

    kinds = (FrozenBatchNorm2d, torch.nn.BatchNorm2d)
    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, kinds)]
    model.eval()
    model(images)
    for h in hooks:
        h.remove()


def set_size(model, name: str, size: int) -> None:
    """torchvision resizes inside its forward: make that a no-op for `size` x `size` images."""
    if name.startswith("torchvision"):
        model.transform.min_size, model.transform.max_size = (size,), size


def parse_precision(p: str) -> tuple[AmpMode, bool]:
    base, cl = (p[:-3], True) if p.endswith("-cl") else (p, False)
    return {"fp32": AmpMode(None), "bf16": AmpMode(torch.bfloat16),
            "fp16": AmpMode(torch.float16)}[base], cl


class Runner:
    """One model on the device with the engine's optimizer; `train_step` / `infer` run one unit of work."""

    def __init__(self, name: str, device: torch.device, calib_images: list[torch.Tensor], light: bool = False):
        self.name, self.device = name, device
        self.model = build(name, light=light).to(device)
        set_size(self.model, name, calib_images[0].shape[-1])
        calibrate_bn(self.model, [im.to(device) for im in calib_images])
        self.ddp = None
        self.set_precision("fp32")

    def set_precision(self, precision: str) -> None:
        self.amp, cl = parse_precision(precision)
        self.model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        cfg = load_config(None, ["solver.base_lr=0.0001"])
        fused = optim.use_fused_sgd(self.device)  # as engine._set_up
        self.opt = optim.build_optimizer(cfg, self.model, fused=fused)
        optim.prepare_fused_sgd(self.opt, fused=fused)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp.use_scaler)
        self.nonfinite_steps = 0

    def set_batch(self, images, targets, size: int, sparse: bool) -> None:
        set_size(self.model, self.name, size)
        self.images = [im.to(self.device) for im in images]
        self.targets = targets_for(self.name, targets, self.device, sparse)

    def train_step(self) -> None:
        model = self.ddp or self.model
        model.train()
        with autocast(self.amp, self.device):
            losses = model(self.images, self.targets)
        names = tuple(sorted(losses))
        values = torch.stack([losses[k].detach().float() for k in names])
        if self.ddp is None:  # the engine's host check (train_step.check_losses); the plain step does no collective
            finite = bool(torch.isfinite(values).all())
        else:  # as the engine under DDP: the mean over ranks, so every rank decides alike
            finite = all(math.isfinite(v) for v in dist.reduce_loss_dict(dict(zip(names, values))).values())
        if not finite:  # the engine would stop the run here; the benchmark skips the update and reports it
            self.nonfinite_steps += 1
            return
        train_step.backward_and_step(sum(losses.values()), self.opt, self.scaler, self.params)

    @torch.inference_mode()
    def infer(self, paste: bool = True) -> None:
        self.model.eval()
        with autocast(self.amp, self.device):
            out = self.model(self.images)
        if paste and not self.name.startswith("torchvision"):  # torchvision pasted inside its forward
            from gains.predictor import paste_masks
            for o, im in zip(out, self.images):
                paste_masks(o["masks"].float(), o["boxes"].float(), tuple(im.shape[-2:]))

    def nonfinite(self) -> bool:
        return self.nonfinite_steps > 0


# ----------------------------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, warmup: int, iters: int) -> tuple[list[float], float]:
    """fn() `warmup` times, then `iters` timed calls (synchronised around each). Returns (seconds, peak GiB)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return times, peak


def count_syncs(fn, device: torch.device) -> int | None:
    """Host<->device synchronisations in one call of fn (CUDA's sync debug mode warns at each); None on CPU."""
    if device.type != "cuda":
        return None
    import warnings
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchronizing" in str(w.message) for w in caught)


def fmt_pair(a: float, b: float, digits: int = 3) -> str:
    return f"{a:.{digits}f} / {b:.{digits}f}"


def fmt_mem(gib: float) -> str:
    return "-" if math.isnan(gib) else f"{gib:.2f}"


def label(name: str) -> str:
    return {"torchvision": "torchvision maskrcnn_resnet50_fpn (frozen BN, 3 trainable stages)",
            "torchvision_bn": "torchvision maskrcnn_resnet50_fpn defaults (BN, all stages trained)"}.get(
        name, f"gains, mode {name}")


# ----------------------------------------------------------------------------------------------- single device

def run_single(args, device: torch.device) -> dict:
    t_start = time.perf_counter()
    over = lambda: time.perf_counter() - t_start > args.budget_s  # noqa: E731
    batches = {(n, s): make_isbi_batch(n, s, args.cells) for s in sorted(set(args.train_sizes) | {args.test_size})
               for n in args.batches}
    calib = make_isbi_batch(2, args.test_size, args.cells, seed=1)[0]
    train, infer, skipped = [], [], []
    for name in args.models:
        if over():
            skipped.append(f"{name} (all)")
            continue
        runner = Runner(name, device, calib, light=args.quick)
        for precision in args.precisions:
            runner.set_precision(precision)
            jobs = [("train", s, n) for s in args.train_sizes for n in args.batches] + \
                   [("infer", args.test_size, n) for n in args.batches]
            for phase, size, n in jobs:
                if over():
                    skipped.append(f"{name} {precision} {phase} {size} batch {n}")
                    continue
                runner.set_batch(*batches[(n, size)], size, args.targets == "sparse")
                row = {"model": name, "precision": precision, "size": size, "batch": n}
                if phase == "train":
                    times, peak = measure(runner.train_step, device, args.warmup, args.iters)
                    row.update(times=times, peak_gib=peak, syncs=count_syncs(runner.train_step, device),
                               nonfinite=runner.nonfinite())
                    train.append(row)
                else:
                    times, peak = measure(lambda: runner.infer(paste=False), device, args.warmup, args.iters)
                    ptimes, ppeak = measure(runner.infer, device, min(args.warmup, 1), args.iters)
                    row.update(times=[t / n for t in times], paste_times=[t / n for t in ptimes],
                               peak_gib=max(peak, ppeak) if device.type == "cuda" else peak)
                    infer.append(row)
                print(f"  {phase:5s} {name:14s} {precision:7s} {size}px batch {n}: median "
                      f"{statistics.median(row['times']):.4f} s", file=sys.stderr, flush=True)
                runner.images = runner.targets = None
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"train": train, "infer": infer, "skipped": skipped, "seconds": time.perf_counter() - t_start}


def _ref(rows: list[dict], row: dict) -> dict | None:
    for r in rows:
        if r["model"] == "torchvision" and all(r[k] == row[k] for k in ("precision", "size", "batch")):
            return r
    return None


def _ratio(rows, row, key="times") -> str:
    ref = _ref(rows, row)
    if ref is None or key not in ref:
        return "-"
    return (f"{statistics.median(row[key]) / statistics.median(ref[key]):.2f}x / "
            f"{min(row[key]) / min(ref[key]):.2f}x")


def _order(rows):
    prec = {p: i for i, p in enumerate(PRECISIONS)}
    model = {m: i for i, m in enumerate(MODELS)}
    return sorted(rows, key=lambda r: (prec[r["precision"]], r["size"], r["batch"], model[r["model"]]))


def print_single(args, device: torch.device, res: dict, command: str) -> None:
    if device.type == "cuda":
        dev = (f"{torch.cuda.get_device_name(device)}; TF32 convs {torch.backends.cudnn.allow_tf32}, TF32 "
               f"matmuls {torch.backends.cuda.matmul.allow_tf32}, cudnn.benchmark {torch.backends.cudnn.benchmark}")
    else:
        dev = f"CPU, {torch.get_num_threads()} threads"
    import torchvision
    print(f"\n`{command}` ({res['seconds']:.0f} s)\n")
    light = (f"; --quick sampling sizes for all models: {LIGHT['rpn_batch']} anchors and {LIGHT['roi_batch']} RoIs "
             f"per image, {LIGHT['pre_nms']}/{LIGHT['post_nms']} proposals") if args.quick else ""
    print(f"{dev}; torch {torch.__version__}, torchvision {torchvision.__version__}{light}; synthetic ISBI-like fields "
          f"({2 * args.cells} instances), our targets {args.targets}; {args.iters} timed step(s) after "
          f"{args.warmup} warm-up; cells are median / min, ratios vs torchvision (frozen BN) median / min\n")
    print("**training step** (forward + backward + SGD update)\n")
    print("| size | batch | precision | model | train step (s) | vs torchvision | images/s | peak GPU mem (GiB) "
          "| host syncs/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in _order(res["train"]):
        flag = " (non-finite loss: steps skipped)" if r["nonfinite"] else ""
        syncs = "-" if r.get("syncs") is None else str(r["syncs"])
        print(f"| {r['size']} | {r['batch']} | {r['precision']} | {label(r['model'])}{flag} | "
              f"{fmt_pair(statistics.median(r['times']), min(r['times']))} | {_ratio(res['train'], r)} | "
              f"{r['batch'] / statistics.median(r['times']):.1f} | {fmt_mem(r['peak_gib'])} | {syncs} |")
    print("\n**inference** (seconds per image; torchvision pastes masks inside its forward)\n")
    print("| size | batch | precision | model | model only (s/img) | incl. paste (s/img) | vs torchvision | "
          "peak GPU mem (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in _order(res["infer"]):
        tv = r["model"].startswith("torchvision")
        only = "(pastes inside)" if tv else fmt_pair(statistics.median(r["times"]), min(r["times"]), 4)
        key = "times" if tv else "paste_times"
        ref = _ref(res["infer"], r)
        ratio = "-" if ref is None else (f"{statistics.median(r[key]) / statistics.median(ref['times']):.2f}x / "
                                         f"{min(r[key]) / min(ref['times']):.2f}x")
        print(f"| {r['size']} | {r['batch']} | {r['precision']} | {label(r['model'])} | {only} | "
              f"{fmt_pair(statistics.median(r[key]), min(r[key]), 4)} | {ratio} | {fmt_mem(r['peak_gib'])} |")
    # the targets
    lines = []
    amp = [p for p in args.precisions if p != "fp32"]
    for r in res["train"]:
        if r["model"] == "gains" and r["precision"] in amp:
            ref = _ref(res["train"], r)
            if ref is not None:
                lines.append(f"gains/torchvision train step, {r['precision']}, {r['size']} px, batch {r['batch']}: "
                             f"{statistics.median(r['times']) / statistics.median(ref['times']):.2f}x (target <= 1.0)")
    for r in res["train"]:
        if r["model"] == "gains" and r["batch"] == 1:
            t = statistics.median(r["times"])
            lines.append(f"gains {r['precision']}, {r['size']} px, batch 1: {t:.3f} s/it = "
                         f"{AUTHORS_S_PER_IT[0] / t:.1f}x the authors' fastest {AUTHORS_S_PER_IT[0]} s/it "
                         f"(RTX 3080; target >= 2x)")
    if lines:
        print("\n" + "\n".join(f"- {line}" for line in lines))
    if res["skipped"]:
        print(f"\nskipped (--budget-s {args.budget_s:.0f} reached): {'; '.join(res['skipped'])}")


# ----------------------------------------------------------------------------------------------- DDP

def run_ddp(args) -> None:
    import torch.distributed as torch_dist
    from torch import nn
    if "WORLD_SIZE" not in os.environ:
        sys.exit("--ddp runs under torchrun: torchrun --standalone --nproc_per_node N benchmarks/bench_gpu.py --ddp")
    info = dist.init_distributed("nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda", info.local_rank) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // info.world_size))
    size, n = args.test_size if args.quick else max(args.train_sizes), max(args.batches)
    images, targets = make_isbi_batch(n, size, args.cells, seed=info.rank)
    calib = make_isbi_batch(2, size, args.cells, seed=1)[0]
    rows = []
    t_start = time.perf_counter()
    for name in args.models:
        for precision in args.precisions:
            runner = Runner(name, device, calib, light=args.quick)
            runner.set_precision(precision)
            runner.set_batch(images, targets, size, args.targets == "sparse")
            plain, _ = measure(runner.train_step, device, args.warmup, args.iters)
            runner.ddp = nn.parallel.DistributedDataParallel(
                runner.model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
            torch_dist.barrier()
            ddp, peak = measure(runner.train_step, device, args.warmup, args.iters)
            per_rank = dist.all_gather_object((statistics.median(plain), statistics.median(ddp), peak))
            t_plain, t_ddp = max(p[0] for p in per_rank), max(p[1] for p in per_rank)
            rows.append((name, precision, t_plain, t_ddp, max(p[2] for p in per_rank)))
            del runner
    if dist.is_main_process():
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n`{' '.join(['torchrun --standalone --nproc_per_node', str(info.world_size)] + sys.argv)}` "
              f"({time.perf_counter() - t_start:.0f} s)\n")
        print(f"{info.world_size} x {dev}, backend {info.backend}; {size}x{size}, {n} image(s) per GPU per step; "
              f"{args.iters} timed step(s) after {args.warmup} warm-up, median of the slowest rank\n")
        print("| model | precision | plain step (s) | DDP step (s) | images/s per GPU | images/s total | "
              "scaling efficiency | peak GPU mem (GiB) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, precision, t_plain, t_ddp, peak in rows:
            print(f"| {label(name)} | {precision} | {t_plain:.3f} | {t_ddp:.3f} | {n / t_ddp:.1f} | "
                  f"{info.world_size * n / t_ddp:.1f} | {t_plain / t_ddp:.2f} | {fmt_mem(peak)} |")
    dist.destroy_distributed()


# ----------------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a CPU smoke run for CI)")
    p.add_argument("--models", nargs="+", choices=MODELS)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS)
    p.add_argument("--train-sizes", nargs="+", type=int, help="square image sides for training (default 640 800)")
    p.add_argument("--test-size", type=int, help="image side for inference (default 800)")
    p.add_argument("--batches", nargs="+", type=int, help="images per step (default 1 8)")
    p.add_argument("--cells", type=int, default=6, help="cells per image (each with a nucleus)")
    p.add_argument("--targets", choices=["sparse", "dense"], default="sparse", help="our targets' format")
    p.add_argument("--warmup", type=int)
    p.add_argument("--iters", type=int)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new measurement after this")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--ddp", action="store_true", help="multi-process scaling (start with torchrun)")
    p.add_argument("--json", type=Path, help="also write the raw timings here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA GPU is visible (use --device cpu --quick for the CPU smoke run)")
    quick = args.quick
    # run order = priority, should --budget-s ever bind: the AMP comparison with torchvision first
    defaults = dict(models=["torchvision", "gains", "mask_rcnn"] + ([] if quick else ["torchvision_bn"]),
                    precisions=["bf16", "fp32"] + ([] if quick else ["bf16-cl"]),
                    train_sizes=[64] if quick else [640, 800], test_size=64 if quick else 800,
                    batches=([1] if args.device == "cpu" else [2]) if quick else [1, 8],
                    warmup=(0 if args.device == "cpu" else 1) if quick else 3, iters=1 if quick else 10)
    # The CPU smoke run (CI) makes one call of each path with one image: it checks that the script runs, not
    # speed, and bf16 is emulated on CPUs without AVX512-BF16 (minutes for the R50 models even at 64 px).
    if args.ddp:
        defaults.update(models=["torchvision", "gains"], precisions=["bf16"])
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if quick:
        args.cells = min(args.cells, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does (solver.cudnn_benchmark)
    if args.ddp:
        return run_ddp(args)
    device = torch.device(args.device)
    res = run_single(args, device)
    print_single(args, device, res, "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None
                                                                                 else argv))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **res}, indent=1))


if __name__ == "__main__":
    main()
