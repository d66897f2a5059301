"""RoI pooling tests (gains/roi_align.py): FPN level assignment and the threaded aligned RoIAlign.

Oracles: detectron2's level rule (canonical box 224 at level 4) and torchvision's roi_align(aligned=True),
forward and backward. All CPU.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from gains.roi_align import aligned_roi_align, assign_levels


def test_level_assignment():
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 10, 10], [0, 0, 1000, 1000],
                          [0, 0, 447, 447], [0, 0, 448, 448]], dtype=torch.float32)
    assert assign_levels(boxes).tolist() == [2, 1, 0, 3, 2, 3]


def test_threaded_roi_align_matches_torchvision():
    torch.manual_seed(0)
    feat = torch.randn(2, 8, 20, 24, requires_grad=True)
    xy = torch.rand(150, 2) * 60
    rois = torch.cat([torch.randint(0, 2, (150, 1)).float(), xy, xy + torch.rand(150, 2) * 40 + 1], 1)
    grad = torch.randn(150, 8, 7, 7)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # forces 4 chunks whatever the machine
    try:
        got = aligned_roi_align(feat, rois, (7, 7), 0.25, 0)
        (g_got,) = torch.autograd.grad(got, feat, grad)
    finally:
        torch.set_num_threads(threads)
    ref = roi_align(feat, rois, (7, 7), 0.25, 0, aligned=True)
    (g_ref,) = torch.autograd.grad(ref, feat, grad)
    assert torch.equal(got, ref) and torch.allclose(g_got, g_ref, atol=1e-5)
