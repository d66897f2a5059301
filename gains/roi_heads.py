"""RoI heads: proposal sampling, box head and its loss, mask head and its loss (GAINS_METHOD.md §4-§5).

Numerics follow detectron2's StandardROIHeads: GT boxes appended to proposals, IoU 0.5 matching,
512 RoIs/image at 25 % foreground, aligned RoIAlign (sampling_ratio 0) on P2-P5 with detectron2's level
rule, two FC 1024 box head, class-specific deltas with weights (10, 10, 5, 5), box loss = CE (mean) +
L1 summed over the foreground / number of sampled RoIs. Class index 0 is background, 1..K foreground.

torchvision's MultiScaleRoIAlign calls roi_align with aligned=False (a half-pixel shift) and uses a
different level rule, so the pooler below is our own.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou, roi_align

from .sparse_maps import SparseMaps


MASK_TIE = 0.5 - 1e-4  # mask target threshold: 0.5, ties (0.5 up to float rounding) count as inside

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
    if workers == 1 or torch.jit.is_scripting() or feat.dtype != rois.dtype:
        return roi_align(feat, rois, output_size, spatial_scale, sampling_ratio, aligned=True)
    return _ThreadedRoIAlign.apply(feat.contiguous(), rois.contiguous(), spatial_scale, output_size[0],
                                   output_size[1], sampling_ratio, workers)


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


class BoxHead(nn.Module):
    """Two FC layers + class scores (K+1, background first) and class-specific deltas (4K)."""

    def __init__(self, in_channels: int, resolution: int, fc_dim: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * resolution ** 2, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(fc.weight, a=1)  # detectron2's c2_xavier_fill
            nn.init.constant_(fc.bias, 0.0)
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for fc in (self.cls_score, self.bbox_pred):
            nn.init.constant_(fc.bias, 0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [R, C, S, S] -> (class logits [R, K+1], deltas [R, 4K])."""
        x = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        return self.cls_score(x), self.bbox_pred(x)


def box_losses(class_logits: Tensor, deltas: Tensor, labels: Tensor, target_deltas: Tensor) -> dict[str, Tensor]:
    """Detectron2's Fast R-CNN loss. class_logits [R, K+1], deltas [R, 4K], labels [R] int64 (0 = background),
    target_deltas [R_fg, 4] for the rows with label > 0 in order. loss_box_reg = L1 summed over foreground
    divided by R (the number of sampled RoIs)."""
    if labels.numel() == 0:
        zero = class_logits.sum() * 0 + deltas.sum() * 0
        return {"loss_cls": zero, "loss_box_reg": zero}
    loss_cls = F.cross_entropy(class_logits, labels)
    fg = torch.where(labels > 0)[0]
    pred = deltas.view(len(deltas), -1, 4)[fg, labels[fg] - 1]
    loss_box = F.l1_loss(pred, target_deltas, reduction="sum") / labels.numel()
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box}


class ConvUpsampleHead(nn.Module):
    """`num_convs` x [conv3x3 + ReLU] -> features F; ReLU(deconv 2x2 s2) -> conv1x1 to K channels.

    `forward(x [R, C_in, S, S])` -> (F [R, conv_dim, S, S], logits [R, K, 2S, 2S]). Used for the mask branch
    and, in alrm.py, for the anomaly branch (same shape). Inits as detectron2's MaskRCNNConvUpsampleHead.
    """

    def __init__(self, in_channels: int, conv_dim: int, num_classes: int, num_convs: int = 4):
        super().__init__()
        convs = []
        for i in range(num_convs):
            convs += [nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, padding=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs)
        self.deconv = nn.ConvTranspose2d(conv_dim, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m is not self.predictor:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0.0)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.convs(x)
        return f, self.predictor(F.relu(self.deconv(f)))


def mask_loss(logits: Tensor, labels: Tensor, targets: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
    """GA-aware mask loss of GAINS_METHOD.md §5 (without the mode's scalar weight):
    mean over R x M x M of `pixel_weights * BCEWithLogits(logits[r, labels[r]-1], targets)`; not normalised by
    the sum of the weights. `pixel_weights=None` is the plain Mask R-CNN BCE.

    logits [R, K, M, M]; labels [R] int64 in 1..K; targets [R, M, M] float in {0, 1};
    pixel_weights [R, M, M] float (the GA crops) or None. R == 0 gives `logits.sum() * 0`.
    """
    if len(logits) == 0:
        return logits.sum() * 0
    picked = logits[torch.arange(len(logits), device=logits.device), labels - 1]
    return F.binary_cross_entropy_with_logits(picked, targets, weight=pixel_weights, reduction="mean")


def crop_per_gt(maps: Tensor, boxes: Tensor, gt_index: Tensor, size: int) -> Tensor:
    """Crop each RoI's own ground-truth map without copying maps per RoI.

    maps [G, H, W] (any dtype, cast to float once per GT) or SparseMaps (per-GT patches, same numbers);
    boxes [R, 4] in the maps' pixels; gt_index [R] int64 index of each RoI's matched GT. Returns
    roi_align(aligned=True, sampling_ratio=0) crops [R, size, size] float: each box gets its GT as batch
    index into the [G, 1, H, W] view.
    """
    if len(boxes) == 0:
        return boxes.new_zeros((0, size, size))
    if isinstance(maps, SparseMaps):
        return maps.roi_crops(boxes, gt_index, size)
    rois = torch.cat([gt_index[:, None].to(boxes.dtype), boxes], dim=1)
    return aligned_roi_align(maps[:, None].to(boxes.dtype), rois, (size, size), 1.0, 0)[:, 0]


class _TargetCrops:
    """crop_per_gt of each image's target maps at its foreground RoIs, concatenated on the RoIs' device.

    SparseMaps kept on the CPU (the model leaves them there) while the RoIs are on a GPU are cropped on the
    CPU, from one host copy of all RoIs made on first need (one device sync per batch; cropping per ground
    truth on the GPU reads each GT's RoI extent back, two syncs per instance, and moving the patches there
    costs a copy per instance), and their crops go to the device in one copy. Maps on the RoIs' device
    (dense targets, or everything on the CPU) are cropped there, as before.
    """

    def __init__(self, boxes: list[Tensor], gt_index: list[Tensor], size: int):
        self.boxes, self.gt_index, self.size = boxes, gt_index, size
        self.device = boxes[0].device
        self._host = None

    def _host_rois(self, i: int) -> tuple[Tensor, Tensor]:
        if self._host is None:
            rows = torch.cat([torch.cat([b, g[:, None].to(b.dtype)], 1) for b, g in zip(self.boxes, self.gt_index)])
            rows = rows.cpu().split([len(b) for b in self.boxes])  # GT indices < 2**24: exact in float32
            self._host = [(r[:, :4], r[:, 4].to(torch.int64)) for r in rows]
        return self._host[i]

    def __call__(self, maps: list, post=None) -> Tensor:
        parts = []
        for i, (m, b, g) in enumerate(zip(maps, self.boxes, self.gt_index)):
            if isinstance(m, SparseMaps) and m.device != self.device:
                b, g = self._host_rois(i)
            c = crop_per_gt(m, b, g, self.size)
            parts.append(post(c) if post is not None else c)
        if all(c.device == self.device for c in parts):
            return torch.cat(parts)
        out = torch.cat([c.cpu() for c in parts])
        if self.device.type == "cuda":
            out = out.pin_memory()  # page-locked: the copy below does not wait for the GPU
        return out.to(self.device, non_blocking=True)


class RoIHeads(nn.Module):
    """Box head + mask head (+ optional ALRM anomaly branch from alrm.py).

    Training `forward(features, proposals, image_sizes, targets)` returns a dict with `loss_cls`,
    `loss_box_reg`, `loss_mask` (and `loss_ga` when `alrm` is given). Eval returns one dict per image
    with `boxes` [N,4], `labels` [N] in 1..K, `scores` [N], `masks` [N,1,2S,2S] sigmoid probabilities.

    features: [P2..P5] (P6 is ignored); proposals: list of [P_i,4]; image_sizes: [(H, W)];
    targets: dicts with `boxes`, `labels`, `masks` and, when `use_ga_weights` or `alrm`, `ga`.
    """

    def __init__(self, in_channels: int, num_classes: int, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, iou_threshold: float = 0.5,
                 box_weights=(10.0, 10.0, 5.0, 5.0), box_pooler_resolution: int = 7,
                 mask_pooler_resolution: int = 14, fc_dim: int = 1024, mask_conv_dim: int = 256,
                 score_thresh_test: float = 0.05, nms_thresh_test: float = 0.5, detections_per_image: int = 100,
                 use_ga_weights: bool = False, mask_loss_weight: float = 1.0, alrm: nn.Module | None = None,
                 ga_loss_weight: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(tuple(box_weights))
        self.box_pooler = ROIPooler(box_pooler_resolution)
        self.mask_pooler = ROIPooler(mask_pooler_resolution)
        self.box_head = BoxHead(in_channels, box_pooler_resolution, fc_dim, num_classes)
        self.mask_head = ConvUpsampleHead(in_channels, mask_conv_dim, num_classes)
        self.alrm = alrm
        self.mask_size = 2 * mask_pooler_resolution
        self.score_thresh, self.nms_thresh, self.max_dets = score_thresh_test, nms_thresh_test, detections_per_image
        self.use_ga_weights = use_ga_weights
        self.mask_loss_weight = mask_loss_weight
        self.ga_loss_weight = ga_loss_weight

    def forward(self, features: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict] | None = None):
        features = features[:4]
        if self.training:
            return self._losses(features, proposals, targets)
        return self._inference(features, proposals, image_sizes)

    @torch.no_grad()
    def _sample(self, proposals: list[Tensor], targets: list[dict]):
        """Per image: sampled boxes, labels (0 = bg) and matched GT index (meaningful for fg rows only)."""
        matched, per_image = [], []
        for props, tgt in zip(proposals, targets):
            gt = tgt["boxes"].to(props.dtype)
            props = torch.cat([props, gt])
            if len(gt) == 0:
                idx = torch.full((len(props),), -1, dtype=torch.int64, device=props.device)
            else:
                idx = self.matcher(box_iou(gt, props))
            matched.append((idx >= 0).to(torch.int64))  # sampler: 1 fg, 0 bg (no ignored RoIs here)
            per_image.append((props, idx))
        pos_masks, neg_masks = self.sampler(matched)
        out = []
        for (props, idx), pos, neg, tgt in zip(per_image, pos_masks, neg_masks, targets):
            keep = torch.cat([torch.where(pos.bool())[0], torch.where(neg.bool())[0]])
            gt_index = idx[keep].clamp(min=0)
            labels = torch.where(idx[keep] >= 0, tgt["labels"][gt_index] if len(tgt["labels"]) else
                                 torch.zeros_like(gt_index), torch.zeros_like(gt_index))
            out.append((props[keep], labels, gt_index))
        return out

    def _losses(self, features: list[Tensor], proposals: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        sampled = self._sample(proposals, targets)
        boxes = [s[0] for s in sampled]
        labels = torch.cat([s[1] for s in sampled])
        class_logits, deltas = self.box_head(self.box_pooler(features, boxes))
        class_logits, deltas = class_logits.float(), deltas.float()  # float32 box arithmetic under autocast
        fg_boxes = [b[l > 0] for b, l, _ in sampled]
        fg_gt = [g[l > 0] for _, l, g in sampled]
        with torch.no_grad():
            target_deltas = [self.box_coder.encode_single(t["boxes"][g].to(b.dtype), b)
                             for b, g, t in zip(fg_boxes, fg_gt, targets)]
        losses = box_losses(class_logits, deltas, labels, torch.cat(target_deltas))

        fg_labels = labels[labels > 0]
        x = self.mask_pooler(features, fg_boxes)
        f_m, mask_logits = self.mask_head(x)
        with torch.no_grad():
            # >= 0.5 in exact arithmetic: a sample exactly between an inside and an outside pixel is a
            # tie that float rounding of its position (1e-5 px) must not decide, so dense and sparse agree
            crops = _TargetCrops(fg_boxes, fg_gt, self.mask_size)
            mask_targets = crops([t["masks"] for t in targets], lambda c: (c >= MASK_TIE).to(c.dtype))
            need_ga = self.use_ga_weights or self.alrm is not None
            ga = crops([t["ga"] for t in targets]) if need_ga else None
        weights = ga if self.use_ga_weights else None
        losses["loss_mask"] = self.mask_loss_weight * mask_loss(mask_logits, fg_labels, mask_targets, weights)
        if self.alrm is not None:
            ga_logits = self.alrm(x, f_m)
            losses["loss_ga"] = self.ga_loss_weight * self.alrm.loss(ga_logits, fg_labels, ga)
        return losses

    @torch.no_grad()
    def _inference(self, features: list[Tensor], proposals: list[Tensor],
                   image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        class_logits, deltas = self.box_head(self.box_pooler(features, proposals))
        class_logits, deltas = class_logits.float(), deltas.float()
        scores_all = F.softmax(class_logits, -1)[:, 1:]
        boxes_all = self.box_coder.decode_single(deltas, torch.cat(proposals)).view(len(deltas), self.num_classes, 4)
        results = []
        for scores, boxes, (h, w) in zip(scores_all.split([len(p) for p in proposals]),
                                         boxes_all.split([len(p) for p in proposals]), image_sizes):
            boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                                 boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
            finite = torch.isfinite(boxes).all(-1) & torch.isfinite(scores)
            r, k = torch.where((scores > self.score_thresh) & finite)
            det_boxes, det_scores = boxes[r, k], scores[r, k]
            keep = batched_nms(det_boxes, det_scores, k, self.nms_thresh)[:self.max_dets]
            results.append({"boxes": det_boxes[keep], "scores": det_scores[keep], "labels": k[keep] + 1})
        _, mask_logits = self.mask_head(self.mask_pooler(features, [r["boxes"] for r in results]))
        labels = torch.cat([r["labels"] for r in results])
        probs = mask_logits[torch.arange(len(labels), device=labels.device), labels - 1][:, None].float().sigmoid()
        for r, m in zip(results, probs.split([len(r["boxes"]) for r in results])):
            r["masks"] = m
        return results
