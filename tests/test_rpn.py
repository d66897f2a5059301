"""RPN tests (gains/rpn.py): anchors, loss normalisation and chunked anchor matching, numerics oracles.

Oracles: detectron2's DefaultAnchorGenerator cell anchors, losses computed by hand, and torchvision's Matcher
on the whole IoU matrix. All CPU.
"""
from __future__ import annotations

import math

import torch

from gains.rpn import AnchorGenerator, rpn_losses


def test_anchors_match_detectron2():
    # detectron2 DefaultAnchorGenerator(sizes=[[32]], aspect_ratios=[[0.25, 1, 4]], strides=[4], offset=0)
    gen = AnchorGenerator([32], [0.25, 1.0, 4.0], [4])
    anchors = gen([(2, 3)], torch.device("cpu"))[0]
    cell = torch.tensor([[-32.0, -8.0, 32.0, 8.0], [-16.0, -16.0, 16.0, 16.0], [-8.0, -32.0, 8.0, 32.0]])
    assert anchors.shape == (2 * 3 * 3, 4)
    assert torch.allclose(anchors[:3], cell)
    # anchor (y * W + x) * A + a is cell a shifted by (4x, 4y); not rounded: ratio 0.5 gives sqrt(2) sides
    assert torch.allclose(anchors[(1 * 3 + 2) * 3 + 1], cell[1] + torch.tensor([8.0, 4.0, 8.0, 4.0]))
    a = AnchorGenerator([32], [0.5], [8])([(1, 1)], torch.device("cpu"))[0][0]
    w = math.sqrt(32 * 32 / 0.5)
    assert torch.allclose(a, torch.tensor([-w / 2, -w / 4, w / 2, w / 4]))


def test_rpn_loss_normalisation():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    deltas = torch.zeros(1, 4, 4)
    labels = torch.tensor([[1, 0, -1, -1]])
    losses = rpn_losses(logits, deltas, labels, torch.ones(1, 4), normalizer=8.0)
    bce = math.log(2) + math.log(1 + math.e)
    assert math.isclose(float(losses["loss_rpn_cls"]), bce / 8, rel_tol=1e-6)
    assert math.isclose(float(losses["loss_rpn_loc"]), 4 / 8, rel_tol=1e-6)


def test_chunked_anchor_matching_equals_the_matcher_on_the_whole_iou_matrix():
    """rpn.match_anchors (memory O(chunk x anchors)) == torchvision's Matcher on box_iou(all GT, anchors),
    ties included (duplicate GT boxes across chunks, integer boxes)."""
    from torchvision.models.detection._utils import Matcher
    from torchvision.ops import box_iou

    from gains.rpn import match_anchors
    g = torch.Generator().manual_seed(0)
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)

    def boxes(k):
        xy = torch.randint(0, 30, (k, 2), generator=g).float()
        return torch.cat([xy, xy + torch.randint(1, 15, (k, 2), generator=g).float()], 1)

    for trial in range(200):
        n, a = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))
        gt, anchors = boxes(n), boxes(a)
        if trial % 3 == 0:
            gt[n // 2:] = gt[:n - n // 2].clone()
        chunk = a * int(torch.randint(1, 5, (1,), generator=g))  # 1..4 GT boxes per chunk
        assert torch.equal(match_anchors(gt, anchors, matcher, chunk_pairs=chunk), matcher(box_iou(gt, anchors)))
