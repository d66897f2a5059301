"""Mask head tests (gains/mask_head.py): the GA-aware mask loss and the per-GT target crops, numerics oracles.

Oracles: the GA-weighted BCE and the ALRM's MSE (gains.alrm.anomaly_loss) computed by hand, the mode weights
build_model gives the mask loss, and torchvision's roi_align (aligned=True) cropping one RoI at a time.
All CPU.
"""
from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align

from gains.alrm import anomaly_loss
from gains.mask_head import crop_per_gt, mask_loss
from test_model import tiny_model


def test_ga_aware_losses_by_hand():
    logits = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]], [[9.0, 9.0], [9.0, 9.0]]],
                           [[[9.0, 9.0], [9.0, 9.0]], [[-0.5, 1.5], [0.0, 3.0]]]])  # R=2, K=2, M=2
    labels = torch.tensor([1, 2])
    y = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])
    ga = torch.tensor([[[1.0, 1.5], [1.2, 1.0]], [[1.4, 1.0], [1.0, 1.1]]])
    chosen = [[0.5, -1.0, 2.0, 0.0], [-0.5, 1.5, 0.0, 3.0]]
    bce = [[math.log1p(math.exp(-l)) if t else math.log1p(math.exp(l)) for l, t in zip(ls, ts)]
           for ls, ts in zip(chosen, y.view(2, 4).tolist())]
    weighted = sum(g * b for gs, bs in zip(ga.view(2, 4).tolist(), bce) for g, b in zip(gs, bs)) / 8
    assert math.isclose(float(mask_loss(logits, labels, y, ga)), weighted, rel_tol=1e-6)
    assert math.isclose(float(mask_loss(logits, labels, y)), sum(map(sum, bce)) / 8, rel_tol=1e-6)
    mse = sum((a - g) ** 2 for ls, gs in zip(chosen, ga.view(2, 4).tolist()) for a, g in zip(ls, gs)) / 8
    assert math.isclose(float(anomaly_loss(logits, labels, ga)), mse, rel_tol=1e-6)
    # the mode weights (0.75 with the branch, 1.0 without) come from build_model
    assert tiny_model("gains").roi_heads.mask_loss_weight == 0.75
    assert tiny_model("reweight_only").roi_heads.mask_loss_weight == 1.0
    assert tiny_model("gains", 18, "model.roi_heads.mask_loss_weight=2.0").roi_heads.mask_loss_weight == 2.0


def test_crop_per_gt_equals_per_roi_crops():
    g = torch.rand(3, 40, 50)
    boxes = torch.tensor([[2.0, 3.5, 20.0, 30.0], [10.3, 0.0, 49.0, 17.0], [0.0, 0.0, 50.0, 40.0]])
    gt_index = torch.tensor([2, 0, 2])
    got = crop_per_gt(g, boxes, gt_index, 28)
    for r in range(3):
        ref = roi_align(g[gt_index[r]][None, None], [boxes[r:r + 1]], (28, 28), 1.0, 0, aligned=True)[0, 0]
        assert torch.allclose(got[r], ref, atol=1e-6)
    masks = (g > 0.5).to(torch.uint8)
    assert torch.equal(crop_per_gt(masks, boxes, gt_index, 28), crop_per_gt(masks.float(), boxes, gt_index, 28))
