"""Region proposal network with detectron2's numerics (gains/METHOD.md §9).

Differences from torchvision's RPN that matter for faithfulness:
- anchors are not rounded to integers and sit at offset 0 (cell corners `k * stride`), as detectron2's
  DefaultAnchorGenerator; torchvision rounds the cell anchors;
- the losses are sums over the sampled anchors divided by `batch_size_per_image * num_images` (torchvision
  averages the objectness loss and divides the box loss by the sampled count), box loss L1;
- proposals: top-k per level before NMS, NMS per level (batched_nms with level ids), top-k per image after
  NMS, empty boxes dropped with a strict `> min_size` test.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou


class AnchorGenerator(nn.Module):
    """One anchor size per feature level, several aspect ratios (height / width), detectron2 layout.

    For a level with stride s and a feature map h x w, anchor `(y * w + x) * A + a` is cell anchor `a`
    shifted by (x * s, y * s); cell anchors are centred on 0 with area size² and h / w = ratio, listed
    ratio by ratio. Results are cached per (feature sizes, device, dtype).
    """

    def __init__(self, sizes: list[float], aspect_ratios: list[float], strides: list[int]):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"one anchor size per level: got {len(sizes)} sizes for {len(strides)} levels")
        self.strides = list(strides)
        self.num_anchors = len(aspect_ratios)
        cells = []
        for size in sizes:
            area = float(size) ** 2
            rows = []
            for ratio in aspect_ratios:
                w = math.sqrt(area / ratio)
                h = ratio * w
                rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
            cells.append(torch.tensor(rows, dtype=torch.float64))
        self.cell_anchors = cells  # float64 so that large grids do not accumulate float32 error
        self._cache: dict = {}

    def forward(self, feature_sizes: list[tuple[int, int]], device: torch.device,
                dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """feature_sizes: [(h, w)] per level. Returns per level a [h * w * A, 4] xyxy tensor."""
        key = (tuple(feature_sizes), str(device), dtype)
        if key not in self._cache:
            out = []
            for (h, w), stride, cell in zip(feature_sizes, self.strides, self.cell_anchors):
                sx = torch.arange(w, dtype=torch.float64) * stride
                sy = torch.arange(h, dtype=torch.float64) * stride
                yy, xx = torch.meshgrid(sy, sx, indexing="ij")
                shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
                out.append((shifts + cell[None]).reshape(-1, 4).to(device=device, dtype=dtype))
            if len(self._cache) > 64:  # multi-scale training sees a bounded set of sizes; stay bounded anyway
                self._cache.clear()
            self._cache[key] = out
        return self._cache[key]


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 objectness (A) and 1x1 box deltas (4A) per level."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0.0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """features: [B,C,h,w] per level. Returns objectness logits [B, h*w*A] and deltas [B, h*w*A, 4]
        per level, in the anchor order of AnchorGenerator."""
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            b, _, h, w = x.shape
            logits.append(self.objectness(t).permute(0, 2, 3, 1).reshape(b, -1))
            d = self.deltas(t).view(b, -1, 4, h, w)  # [B, A, 4, h, w]
            deltas.append(d.permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        return logits, deltas


def rpn_losses(logits: Tensor, deltas: Tensor, labels: Tensor, target_deltas: Tensor,
               normalizer: float) -> dict[str, Tensor]:
    """Detectron2's RPN loss.

    logits [B, A_all], deltas [B, A_all, 4]; labels [B, A_all] int (1 positive, 0 negative, -1 not sampled);
    target_deltas [P, 4] for the positives in `labels == 1` order. Both losses are sums divided by
    `normalizer` (= batch_size_per_image * num_images).
    """
    pos = labels == 1
    valid = labels >= 0
    loss_cls = F.binary_cross_entropy_with_logits(logits[valid], labels[valid].to(logits.dtype), reduction="sum")
    loss_loc = F.l1_loss(deltas[pos], target_deltas, reduction="sum")
    return {"loss_rpn_cls": loss_cls / normalizer, "loss_rpn_loc": loss_loc / normalizer}


MATCH_CHUNK_PAIRS = 1 << 23  # GT x anchor IoU pairs per chunk: box_iou holds ~36 bytes per pair (~300 MB)


def match_anchors(gt_boxes: Tensor, anchors: Tensor, matcher: Matcher,
                  chunk_pairs: int = MATCH_CHUNK_PAIRS) -> Tensor:
    """`matcher(box_iou(gt_boxes, anchors))` computed over chunks of ground-truth boxes, so memory is
    O(chunk x anchors) instead of O(N x anchors): 800 nuclei on a 1024^2 image are 800 x 261,888 pairs,
    7 GB as one IoU matrix. Same result, ties included: the best GT of an anchor is the first one with the
    maximal IoU (later chunks replace it only when strictly better) and low-quality matches are every anchor
    reaching its GT's maximal IoU. gt_boxes [N, 4], anchors [A, 4] xyxy -> int64 [A] (GT index, or
    Matcher.BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS)."""
    step = max(1, chunk_pairs // max(len(anchors), 1))
    if len(gt_boxes) <= step:
        return matcher(box_iou(gt_boxes, anchors))
    best = torch.full((len(anchors),), -1.0, dtype=torch.float32, device=anchors.device)
    best_gt = torch.zeros(len(anchors), dtype=torch.int64, device=anchors.device)
    low_quality = torch.zeros(len(anchors), dtype=torch.bool, device=anchors.device)
    for start in range(0, len(gt_boxes), step):
        iou = box_iou(gt_boxes[start:start + step], anchors)  # [n, A]
        value, index = iou.max(dim=0)
        better = value > best
        best = torch.where(better, value, best)
        best_gt = torch.where(better, index + start, best_gt)
        low_quality |= (iou == iou.max(dim=1, keepdim=True).values).any(dim=0)  # set_low_quality_matches_
        del iou
    matches = best_gt.clone()
    matches[best < matcher.low_threshold] = Matcher.BELOW_LOW_THRESHOLD
    matches[(best >= matcher.low_threshold) & (best < matcher.high_threshold)] = Matcher.BETWEEN_THRESHOLDS
    if matcher.allow_low_quality_matches:
        matches[low_quality] = best_gt[low_quality]
    return matches


class RPN(nn.Module):
    """Anchors + head + proposal selection + (training) losses.

    `forward(features, image_sizes, gt_boxes=None)`:
      features: list of [B,C,h,w] (P2..P6); image_sizes: [(H, W)] of the unpadded images;
      gt_boxes: list of [G_i, 4] float xyxy (training only).
    Returns (proposals, losses): proposals a list of [P_i, 4] detached boxes clipped to each image, sorted
    by objectness; losses {} at test time.
    """

    def __init__(self, in_channels: int, anchor_sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
                 strides=(4, 8, 16, 32, 64), iou_thresholds=(0.3, 0.7), batch_size_per_image: int = 256,
                 positive_fraction: float = 0.5, nms_thresh: float = 0.7, pre_nms_topk_train: int = 2000,
                 pre_nms_topk_test: int = 1000, post_nms_topk_train: int = 1000, post_nms_topk_test: int = 1000,
                 min_box_size: float = 0.0):
        super().__init__()
        self.anchor_generator = AnchorGenerator(list(anchor_sizes), list(aspect_ratios), list(strides))
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors)
        low, high = iou_thresholds
        self.matcher = Matcher(high, low, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.batch_size_per_image = batch_size_per_image
        self.nms_thresh = nms_thresh
        self.pre_nms_topk = (pre_nms_topk_train, pre_nms_topk_test)
        self.post_nms_topk = (post_nms_topk_train, post_nms_topk_test)
        self.min_box_size = min_box_size

    def forward(self, features: list[Tensor], image_sizes: list[tuple[int, int]],
                gt_boxes: list[Tensor] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        logits, deltas = self.head(features)
        # Box arithmetic stays in float32 under autocast: float16 cannot hold pixel coordinates precisely.
        logits, deltas = [l.float() for l in logits], [d.float() for d in deltas]
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in features], features[0].device)
        proposals = self._select_proposals(anchors, [l.detach() for l in logits], [d.detach() for d in deltas],
                                           image_sizes)
        losses = {}
        if self.training:
            if gt_boxes is None:
                raise ValueError("the RPN needs ground-truth boxes in training")
            all_anchors = torch.cat(anchors)
            labels, target_deltas = self._label_anchors(all_anchors, gt_boxes)
            losses = rpn_losses(torch.cat(logits, 1), torch.cat(deltas, 1), labels, target_deltas,
                                float(self.batch_size_per_image * len(gt_boxes)))
        return proposals, losses

    @torch.no_grad()
    def _label_anchors(self, anchors: Tensor, gt_boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Match, sample; returns labels [B, A_all] (1/0/-1) and the regression targets of the positives."""
        matched_labels, targets = [], []
        for boxes in gt_boxes:
            if boxes.numel() == 0:
                matched_labels.append(torch.zeros(len(anchors), dtype=torch.int64, device=anchors.device))
                targets.append(None)
                continue
            idx = match_anchors(boxes, anchors, self.matcher)
            lab = (idx >= 0).to(torch.int64)  # foreground 1, below-low 0 ...
            lab.masked_fill_(idx == Matcher.BETWEEN_THRESHOLDS, -1)  # ... and ignored anchors -1
            matched_labels.append(lab)
            targets.append((boxes, idx))
        pos_masks, neg_masks = self.sampler(matched_labels)
        labels, target_deltas = [], []
        for pos, neg, tgt in zip(pos_masks, neg_masks, targets):
            lab = torch.full_like(pos, -1, dtype=torch.int64)
            lab.masked_fill_(neg.bool(), 0)  # masked_fill_: no nonzero() (a device sync) as lab[mask] = v may do
            lab.masked_fill_(pos.bool(), 1)
            labels.append(lab)
            if tgt is not None:
                p = torch.where(pos.bool())[0]
                boxes, idx = tgt
                target_deltas.append(self.box_coder.encode_single(boxes[idx[p]], anchors[p]))
        target = torch.cat(target_deltas) if target_deltas else anchors.new_zeros((0, 4))
        return torch.stack(labels), target

    @torch.no_grad()
    def _select_proposals(self, anchors: list[Tensor], logits: list[Tensor], deltas: list[Tensor],
                          image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        pre_k = self.pre_nms_topk[0 if self.training else 1]
        post_k = self.post_nms_topk[0 if self.training else 1]
        num_images = logits[0].shape[0]
        boxes_l, scores_l, levels_l = [], [], []
        for level, (anc, lg, dl) in enumerate(zip(anchors, logits, deltas)):
            k = min(pre_k, lg.shape[1])
            scores, idx = lg.topk(k, dim=1)  # [B, k]
            sel_deltas = dl.gather(1, idx[..., None].expand(-1, -1, 4))
            boxes = self.box_coder.decode_single(sel_deltas.reshape(-1, 4), anc[idx.reshape(-1)])
            boxes_l.append(boxes.view(num_images, k, 4))
            scores_l.append(scores)
            levels_l.append(torch.full((k,), level, dtype=torch.int64, device=lg.device))
        boxes_all, scores_all, levels = torch.cat(boxes_l, 1), torch.cat(scores_l, 1), torch.cat(levels_l)
        out = []
        for i, (h, w) in enumerate(image_sizes):
            boxes, scores, lvl = boxes_all[i], scores_all[i], levels
            finite = torch.isfinite(boxes).all(1) & torch.isfinite(scores)
            # On the CPU reading the flag is free; on a GPU it would be a sync per image, so there non-finite
            # proposals are just dropped (as at test time) and the engine's non-finite loss check stops the run.
            if self.training and boxes.device.type == "cpu" and not bool(finite.all()):
                raise FloatingPointError("non-finite RPN proposals in training: the loss has diverged "
                                         "(lower solver.base_lr or enable solver.clip_grad_norm)")
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                                 boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
            keep = finite & ((boxes[:, 2] - boxes[:, 0]) > self.min_box_size) & \
                ((boxes[:, 3] - boxes[:, 1]) > self.min_box_size)  # one selection: non-finite and empty out
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[:post_k]
            out.append(boxes[keep])
        return out
