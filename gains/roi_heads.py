"""RoI heads: proposal sampling, the box head and its loss, and the calls into the mask head (gains.mask_head)
and the ALRM anomaly branch (gains.alrm) with their losses (gains/METHOD.md §5-§6, §9).

Numerics follow detectron2's StandardROIHeads: GT boxes appended to proposals, IoU 0.5 matching,
512 RoIs/image at 25 % foreground, aligned RoIAlign (sampling_ratio 0) on P2-P5 with detectron2's level
rule, two FC 1024 box head, class-specific deltas with weights (10, 10, 5, 5), box loss = CE (mean) +
L1 summed over the foreground / number of sampled RoIs. Class index 0 is background, 1..K foreground.
RoIAlign pooling: gains.roi_align. `loss_mask` is weighted by `mask_loss_weight` (config
model.roi_heads.mask_loss_weight), `loss_ga` by `ga_loss_weight` (model.alrm.ga_loss_weight).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou

from .alrm import anomaly_loss
from .mask_head import MASK_TIE, ConvUpsampleHead, TargetCrops, mask_loss
from .roi_align import ROIPooler


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
            crops = TargetCrops(fg_boxes, fg_gt, self.mask_size)
            mask_targets = crops([t["masks"] for t in targets], lambda c: (c >= MASK_TIE).to(c.dtype))
            need_ga = self.use_ga_weights or self.alrm is not None
            ga = crops([t["ga"] for t in targets]) if need_ga else None
        weights = ga if self.use_ga_weights else None
        losses["loss_mask"] = self.mask_loss_weight * mask_loss(mask_logits, fg_labels, mask_targets, weights)
        if self.alrm is not None:
            ga_logits = self.alrm(x, f_m)
            losses["loss_ga"] = self.ga_loss_weight * anomaly_loss(ga_logits, fg_labels, ga)
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
