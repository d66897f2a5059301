"""Time GAInS (mask_rcnn and gains modes) against torchvision's Mask R-CNN R50-FPN, side by side.

    python benchmarks/bench_model.py --device cpu --size 512 --batch 2 --iters 5 --threads 2
    python benchmarks/bench_model.py --device cuda --size 800 --batch 2 --iters 20 [--amp]

What is measured, for every model on the same synthetic batch (ellipse instances, random weights):
- train step: forward + backward + SGD step (lr 1e-4 so the random models stay stationary), median of
  `--iters` after `--warmup`; the models take turns iteration by iteration so that load from other processes
  hits all of them alike;
- inference per image: eval forward of one image (median). torchvision pastes masks into the image inside
  its forward, ours returns 28x28 probabilities, so ours is also timed with `paste_masks` added (the fair
  column to compare);
- peak memory: on CUDA `torch.cuda.max_memory_allocated` during the phase minus what was allocated before it
  (weights, optimiser state and data of all models stay allocated); on CPU each (model, phase) runs in a fresh
  subprocess and reports how far its peak RSS (/proc/self/status VmHWM, reset before the phase) rises above
  the RSS before the phase, i.e. the extra memory the phase needs beyond the model and data (tracemalloc
  misses torch's allocator; ru_maxrss is inherited across fork/exec on Linux). Linux only.

Comparability: both backbones use FrozenBatchNorm2d and freeze the stem + res2 (torchvision's
`maskrcnn_resnet50_fpn(weights=None)` would use trainable BatchNorm and train all layers, so the
torchvision model is assembled from the same parts with `norm_layer=FrozenBatchNorm2d, trainable_layers=3`).
torchvision resizes with min_size = max_size = --size, so images keep their size; its RPN keeps 1000
post-NMS proposals per image in training like ours (its default is 2000). Same num_classes, threads, batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = ("torchvision", "mask_rcnn", "gains")


def make_batch(n: int, size: int, instances: int, seed: int = 0):
    """n images [3,size,size] in [0,1] with `instances` ellipses each, targets with masks and GA maps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, targets = [], []
    for i in range(n):
        img = 0.2 + 0.05 * rng.standard_normal((size, size))
        masks, boxes = [], []
        for _ in range(instances):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            ry, rx = rng.uniform(0.04, 0.12, 2) * size
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img[m] = rng.uniform(0.5, 0.9)
            ys, xs = np.where(m)
            masks.append(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append(torch.from_numpy(np.clip(img, 0, 1)).float()[None].repeat(3, 1, 1))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.from_numpy(rng.integers(1, 3, instances)).long(),
                        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)),
                        "ga": 1 + 0.5 * torch.from_numpy(rng.random((instances, size, size))).float(),
                        "image_id": i})
    return images, targets


def build(name: str, size: int, num_classes: int = 2):
    torch.manual_seed(0)
    if name == "torchvision":
        from torchvision.models import resnet50
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.ops import FrozenBatchNorm2d
        backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), trainable_layers=3)
        return MaskRCNN(backbone, num_classes=num_classes + 1, min_size=size, max_size=size,
                        rpn_post_nms_top_n_train=1000)
    from gains.config import load_config
    from gains.model import build_model
    return build_model(load_config(None, [f"model.mode={name}", f"model.num_classes={num_classes}"]))


def targets_for(name: str, targets: list[dict]) -> list[dict]:
    if name == "torchvision":  # it resizes masks in its transform; ga is ours only
        return [{k: v for k, v in t.items() if k in ("boxes", "labels", "masks")} for t in targets]
    return targets


@torch.no_grad()
def calibrate_frozen_bn(model: torch.nn.Module, images: list[torch.Tensor]) -> None:
    """Give every FrozenBatchNorm2d the batch statistics of its input, layer after layer (like pretrained
    weights would): with random convs and identity FrozenBN, activations blow up to inf/NaN through 50 layers
    and the timings would measure NaN arithmetic. Applied identically to every model."""
    from torchvision.ops import FrozenBatchNorm2d

    def set_stats(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    model.eval()
    model(images)
    for h in hooks:
        h.remove()


class Runner:
    """One model with its optimiser; `train_step()` and `infer()` run one measured unit of work."""

    def __init__(self, name, images, targets, device, amp):
        self.name, self.device, self.amp = name, device, amp
        self.model = build(name, images[0].shape[-1]).to(device)
        self.images = [im.to(device) for im in images]
        self.targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                        for t in targets_for(name, targets)]
        calibrate_frozen_bn(self.model, self.images)
        self.opt = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp and self.device.type == "cuda")

    def train_step(self):
        self.model.train()
        with self._autocast():
            losses = self.model(self.images, self.targets)
        self.opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.opt.step()

    @torch.no_grad()
    def infer(self):
        self.model.eval()
        with self._autocast():
            self.last = self.model(self.images[:1])[0]

    def paste(self):
        """Our masks are 28x28 probabilities; torchvision already pasted them inside its forward."""
        if self.name != "torchvision":
            from gains.predictor import paste_masks
            out = self.last
            paste_masks(out["masks"].float(), out["boxes"].float(), tuple(self.images[0].shape[-2:]))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> None:
    """Run one (model, phase) in this fresh process and print its peak-RSS growth in MiB as JSON.

    getrusage's ru_maxrss survives fork+exec (a child starts with its parent's high-water mark), so the
    peak is read from /proc/self/status VmHWM after resetting it (`5 > /proc/self/clear_refs`)."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    images, targets = make_batch(args.batch, args.size, args.instances)
    runner = Runner(args.child_model, images, targets, device, False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_mib("VmRSS")
    for _ in range(2):
        if args.child_phase == "train":
            runner.train_step()
        else:
            runner.infer()
            runner.paste()
    print(json.dumps({"peak_mib": _rss_mib("VmHWM") - before}))


def cpu_memory(args, name: str, phase: str) -> float:
    cmd = [sys.executable, __file__, "--child-model", name, "--child-phase", phase, "--size", str(args.size),
           "--batch", str(args.batch), "--instances", str(args.instances), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", type=int, default=512, help="image side (square images, no resizing)")
    p.add_argument("--batch", type=int, default=2, help="images per training step")
    p.add_argument("--instances", type=int, default=10, help="instances per image")
    p.add_argument("--iters", type=int, default=5, help="measured iterations (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-phase", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_model:
        return child(args)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, targets = make_batch(args.batch, args.size, args.instances)
    runners = {name: Runner(name, images, targets, device, args.amp) for name in args.models}
    times = {name: {"train": [], "infer": [], "infer_paste": []} for name in runners}
    for i in range(args.warmup + args.iters):
        for name, r in runners.items():  # interleaved so background load hits every model alike
            t_train = timed(r.train_step, device)
            t_inf = timed(r.infer, device)
            t_paste = timed(r.paste, device)
            if i >= args.warmup:
                times[name]["train"].append(t_train)
                times[name]["infer"].append(t_inf)
                times[name]["infer_paste"].append(t_inf + t_paste)

    memory = {}
    for name, r in runners.items():
        if args.no_memory:
            memory[name] = (float("nan"), float("nan"))
        elif device.type == "cuda":
            peaks = []
            for fn in (r.train_step, lambda: (r.infer(), r.paste())):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()  # all models live on the GPU: count the growth only
                fn()
                torch.cuda.synchronize()
                peaks.append((torch.cuda.max_memory_allocated() - before) / 2 ** 20)
            memory[name] = tuple(peaks)
        else:
            memory[name] = (cpu_memory(args, name, "train"), cpu_memory(args, name, "infer"))

    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    low = {n: {k: min(v) for k, v in t.items()} for n, t in times.items()}
    ref, ref_low = med.get("torchvision"), low.get("torchvision")
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"\n{dev}; {args.size}x{args.size}, batch {args.batch}, {args.instances} instances/image, "
          f"{args.iters} measured iterations after {args.warmup} warm-up{', AMP fp16' if args.amp else ''}; "
          f"torch {torch.__version__}; cells are median / min seconds, ratios median / min\n")
    mem_kind = "peak CUDA alloc growth" if device.type == "cuda" else "peak RSS growth"
    print(f"| model | train step (s) | train vs tv | inference/img, model only (s) | inference/img incl. paste (s) "
          f"| inference vs tv | {mem_kind} train (MiB) | {mem_kind} inference (MiB) |")
    print("|---|---|---|---|---|---|---|---|")

    def ratio(key, name):
        if not ref:
            return "-"
        return f"{med[name][key] / ref[key]:.2f}x / {low[name][key] / ref_low[key]:.2f}x"

    for name in med:
        m, lo = med[name], low[name]
        label = "torchvision maskrcnn_resnet50_fpn" if name == "torchvision" else f"gains, mode {name}"
        inf = "(pastes inside)" if name == "torchvision" else f"{m['infer']:.3f} / {lo['infer']:.3f}"
        print(f"| {label} | {m['train']:.3f} / {lo['train']:.3f} | {ratio('train', name)} | {inf} | "
              f"{m['infer_paste']:.3f} / {lo['infer_paste']:.3f} | {ratio('infer_paste', name)} | "
              f"{memory[name][0]:.0f} | {memory[name][1]:.0f} |")

if __name__ == "__main__":
    main()
