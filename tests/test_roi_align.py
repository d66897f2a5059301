"""RoI pooling tests (gains/roi_align.py): FPN level assignment and the threaded aligned RoIAlign.

Oracles: detectron2's level rule (canonical box 224 at level 4) and torchvision's roi_align(aligned=True),
forward and backward. All CPU.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from gains import roi_align as roi_align_module
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


def test_threaded_roi_align_under_autocast_matches_torchvision(monkeypatch):
    """bf16 features and float32 boxes (a bf16 autocast step): torchvision's autocast rule pools in float32
    and returns bf16; the threaded path does the same (forward and backward in threads), so forward and
    gradient equal torchvision's."""
    calls = []
    run_parallel = roi_align_module._run_parallel
    monkeypatch.setattr(roi_align_module, "_run_parallel", lambda fns: calls.append(len(fns)) or run_parallel(fns))
    torch.manual_seed(0)
    feat = torch.randn(2, 8, 20, 24).bfloat16().requires_grad_()
    xy = torch.rand(150, 2) * 60
    rois = torch.cat([torch.randint(0, 2, (150, 1)).float(), xy, xy + torch.rand(150, 2) * 40 + 1], 1)
    grad = torch.randn(150, 8, 7, 7).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = aligned_roi_align(feat, rois, (7, 7), 0.25, 0)
        (g_got,) = torch.autograd.grad(got, feat, grad)
    finally:
        torch.set_num_threads(threads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = roi_align(feat, rois, (7, 7), 0.25, 0, aligned=True)
    (g_ref,) = torch.autograd.grad(ref, feat, grad)
    assert calls == [4, 4]  # forward on 4 RoI chunks, backward on 4 channel chunks
    assert got.dtype == ref.dtype == torch.bfloat16 and g_got.dtype == torch.bfloat16
    assert torch.equal(got, ref) and torch.allclose(g_got.float(), g_ref.float(), atol=1e-2)
