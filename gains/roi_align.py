"""Multi-level aligned RoIAlign: detectron2's FPN level rule and `roi_align(aligned=True)`, threaded on CPU.

torchvision's MultiScaleRoIAlign calls roi_align with aligned=False (a half-pixel shift) and uses a
different level rule, so the pooler here is our own. torchvision's CPU roi_align kernels are single-threaded;
`aligned_roi_align` runs them on chunks in a small thread pool (same kernels, same numbers).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

_POOL: ThreadPoolExecutor | None = None


_MIN_ROIS_PER_THREAD = 32


def _cpu_workers(num_rois: int) -> int:
    return max(1, min(torch.get_num_threads(), num_rois // _MIN_ROIS_PER_THREAD, 8))


def _run_parallel(fns: list) -> list:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gains-roi-align")
    return [f.result() for f in [_POOL.submit(fn) for fn in fns]]


class _ThreadedRoIAlign(torch.autograd.Function):
    """torchvision's CPU roi_align kernels are single-threaded and cost ~20 % of a CPU training step; they
    release the GIL, so the forward runs on RoI chunks and the backward on channel chunks in threads. Same
    kernels, same numbers (chunks never overlap, nothing is summed)."""

    @staticmethod
    def forward(ctx, feat, rois, spatial_scale, out_h, out_w, sampling_ratio, workers):
        op = torch.ops.torchvision.roi_align
        chunks = rois.tensor_split(workers)
        ctx.save_for_backward(rois)
        ctx.args = (feat.shape, spatial_scale, out_h, out_w, sampling_ratio, workers)
        return torch.cat(_run_parallel([lambda r=r: op(feat, r, spatial_scale, out_h, out_w, sampling_ratio, True)
                                        for r in chunks]))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        (rois,) = ctx.saved_tensors
        (b, c, h, w), spatial_scale, out_h, out_w, sampling_ratio, workers = ctx.args
        op = torch.ops.torchvision._roi_align_backward
        bounds = torch.linspace(0, c, workers + 1).round().long().tolist()
        parts = _run_parallel([lambda c0=c0, c1=c1: op(grad[:, c0:c1].contiguous(), rois, spatial_scale, out_h,
                                                       out_w, b, c1 - c0, h, w, sampling_ratio, True)
                               for c0, c1 in zip(bounds[:-1], bounds[1:])])
        return (torch.cat(parts, dim=1),) + (None,) * 6


def aligned_roi_align(feat: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                      sampling_ratio: int = 0) -> Tensor:
    """`torchvision.ops.roi_align(..., aligned=True)`; feat [B,C,H,W] float, rois [R,5] (batch index, xyxy)
    -> [R,C,h,w]. On CPU with several threads the single-threaded kernels run on chunks in parallel."""
    workers = _cpu_workers(len(rois)) if feat.device.type == "cpu" else 1
    autocast_pair = feat.dtype in (torch.bfloat16, torch.float16) and rois.dtype == torch.float32
    if workers == 1 or torch.jit.is_scripting() or (feat.dtype != rois.dtype and not autocast_pair):
        return roi_align(feat, rois, output_size, spatial_scale, sampling_ratio, aligned=True)
    # Under autocast (bf16 features, float32 boxes) torchvision pools in float32 and returns the features'
    # dtype; the threaded path does the same (the single-threaded backward was ~20 % of a bf16 CPU step).
    out_dtype = feat.dtype
    if autocast_pair:
        feat = feat.float()
    return _ThreadedRoIAlign.apply(feat.contiguous(), rois.contiguous(), spatial_scale, output_size[0],
                                   output_size[1], sampling_ratio, workers).to(out_dtype)


def _boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """[R_i, 4] per image -> [R, 5] rows (batch index, x1, y1, x2, y2)."""
    idx = torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
    return torch.cat([idx, torch.cat(boxes)], dim=1)


def assign_levels(boxes: Tensor, min_level: int = 2, max_level: int = 5, canonical_size: float = 224.0,
                  canonical_level: int = 4) -> Tensor:
    """Detectron2's FPN level of each box [R, 4]: floor(4 + log2(sqrt(area) / 224 + 1e-8)) clamped to
    [min_level, max_level], returned as an int64 offset from min_level."""
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    level = torch.floor(canonical_level + torch.log2(size / canonical_size + 1e-8))
    return level.clamp(min_level, max_level).to(torch.int64) - min_level


class ROIPooler(nn.Module):
    """Multi-level aligned RoIAlign. `forward(features [P2..P5] of [B,C,h,w], boxes list of [R_i,4] in input
    pixels)` -> [sum R_i, C, S, S], rows in the order of the concatenated boxes."""

    def __init__(self, output_size: int, strides=(4, 8, 16, 32), sampling_ratio: int = 0):
        super().__init__()
        self.output_size = (output_size, output_size)
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(round(math.log2(strides[0])))
        self.max_level = self.min_level + len(strides) - 1
        self.sampling_ratio = sampling_ratio

    def forward(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        rois = _boxes_to_rois(boxes)
        levels = assign_levels(rois[:, 1:], self.min_level, self.max_level)
        x0 = features[0]
        out = x0.new_zeros((len(rois), x0.shape[1]) + self.output_size)
        for level, (feat, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                out[idx] = aligned_roi_align(feat, rois[idx], self.output_size, scale,
                                             self.sampling_ratio).to(out.dtype)
        return out

