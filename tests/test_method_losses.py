"""The method itself, at the model level: in each of the four modes the RoI heads' `loss_mask` and `loss_ga`
equal the paper's formulas, computed here by hand from the heads' own logits (captured with forward hooks)
and targets built here, never through the code under test's cropping or loss functions.

The batch is chosen so that the target crops are known exactly: each image is 28 x 28 px (= the mask head's
28 x 28 output), holds one ground truth whose box is the whole image, and the only proposal is that box. So
every foreground RoI (the proposal and the appended GT box) has the box [0, 0, 28, 28], whose aligned
RoIAlign crop samples exactly the pixel centres: the mask target IS the GT mask and the GA target IS the GT's
GA map. Paper (model.py's mode table): loss_mask = w * mean(GA * BCE(logit, mask)) with GA only in
reweight_only / gains, w = 0.75 with the anomaly branch and 1.0 without; loss_ga = mean((a - GA)^2) with a the
branch's raw output, only in branch_only / gains.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.test_model import tiny_model

SIZE = 28  # = 2 x mask_pooler_resolution (14)
# The paper's table, written out independently of gains.model.MODES: (GA-weighted BCE, branch, mask weight)
PAPER = {"mask_rcnn": (False, False, 1.0), "reweight_only": (True, False, 1.0),
         "branch_only": (False, True, 0.75), "gains": (True, True, 0.75)}


def fixed_batch():
    """Two 28x28 images, one GT each (box = the whole image), masks unlike their GA maps."""
    g = torch.Generator().manual_seed(3)
    targets = []
    for label in (1, 2):
        mask = (torch.rand(1, SIZE, SIZE, generator=g) > 0.5).to(torch.uint8)
        mask[0, 10:18, 10:18] = 1
        ga = 1.0 + 0.5 * torch.rand(1, SIZE, SIZE, generator=g)  # in [1, 1.5], far from the {0, 1} mask
        targets.append({"boxes": torch.tensor([[0.0, 0.0, SIZE, SIZE]]), "labels": torch.tensor([label]),
                        "masks": mask, "ga": ga})
    return targets


def head_losses(mode: str, unit_ga: bool = False):
    """(losses, captured mask logits [R,K,28,28], captured GA logits or None, targets) of the fixed batch;
    `unit_ga`: with all-ones GA maps instead."""
    model = tiny_model(mode)
    heads = model.roi_heads
    heads.train()
    captured = {}
    heads.mask_head.register_forward_hook(lambda m, i, o: captured.__setitem__("mask", o[1]))
    if heads.alrm is not None:
        heads.alrm.register_forward_hook(lambda m, i, o: captured.__setitem__("ga", o))
    targets = fixed_batch()
    if unit_ga:
        for t in targets:
            t["ga"] = torch.ones_like(t["ga"])
    c = model.backbone.out_channels
    g = torch.Generator().manual_seed(5)
    # P2..P5 at strides 4..32 of a 28-px image (the values do not matter, only that they are fixed)
    features = [torch.randn(2, c, max(1, SIZE // s), max(1, SIZE // s), generator=g) for s in (4, 8, 16, 32, 64)]
    proposals = [t["boxes"].clone() for t in targets]
    losses = heads(features, proposals, [(SIZE, SIZE)] * 2, targets)
    return losses, captured.get("mask"), captured.get("ga"), targets


@pytest.mark.parametrize("mode", list(PAPER))
def test_loss_mask_is_the_papers_formula(mode):
    weighted, branch, w = PAPER[mode]
    losses, mask_logits, _, targets = head_losses(mode)
    # per image: the proposal and the appended GT box, both foreground with that image's label
    assert mask_logits.shape[0] == 4, "expected 2 foreground RoIs per image"
    labels = [t["labels"][0] for t in targets for _ in range(2)]
    masks = [t["masks"][0].float() for t in targets for _ in range(2)]
    gas = [t["ga"][0] for t in targets for _ in range(2)]
    per_pixel = []
    for r, (lab, m, ga) in enumerate(zip(labels, masks, gas)):
        x = mask_logits[r, lab - 1].float()
        bce = torch.clamp(x, min=0) - x * m + torch.log1p(torch.exp(-x.abs()))  # BCE with logits, by hand
        per_pixel.append(bce * ga if weighted else bce)
    expected = w * torch.stack(per_pixel).mean()
    assert losses["loss_mask"].item() == pytest.approx(expected.item(), rel=1e-5)
    # and the other weighting would be measurably different (the test can tell the two apart)
    other = w * torch.stack([p / ga if weighted else p * ga for p, ga in zip(per_pixel, gas)]).mean()
    assert abs(other.item() - expected.item()) > 1e-3 * abs(expected.item())


@pytest.mark.parametrize("mode", list(PAPER))
def test_loss_ga_regresses_the_ga_map(mode):
    _, branch, _ = PAPER[mode]
    losses, _, ga_logits, targets = head_losses(mode)
    if not branch:
        assert "loss_ga" not in losses and ga_logits is None
        return
    labels = [t["labels"][0] for t in targets for _ in range(2)]
    gas = [t["ga"][0] for t in targets for _ in range(2)]
    masks = [t["masks"][0].float() for t in targets for _ in range(2)]
    a = torch.stack([ga_logits[r, lab - 1].float() for r, lab in enumerate(labels)])
    expected = ((a - torch.stack(gas)) ** 2).mean()  # ga_loss_weight 1.0 by default
    to_mask = ((a - torch.stack(masks)) ** 2).mean()
    assert losses["loss_ga"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(to_mask.item() - expected.item()) > 1e-2 * expected.item()


def test_ga_weights_change_the_gradient_only_in_weighted_modes():
    """The GA weights reach the mask head's gradient: the same batch with all-ones GA maps gives the same
    loss_mask in mask_rcnn / branch_only (GA unused) and a different one in reweight_only / gains."""
    for mode, (weighted, _, _) in PAPER.items():
        losses, _, _, _ = head_losses(mode)
        ones, _, _, _ = head_losses(mode, unit_ga=True)
        same = losses["loss_mask"].item() == pytest.approx(ones["loss_mask"].item(), rel=1e-6)
        assert same != weighted, mode


def test_hand_bce_matches_torch():
    """The hand-written BCE above is the textbook one (guards the guard)."""
    x = torch.linspace(-6, 6, 25)
    y = (torch.arange(25) % 2).float()
    hand = torch.clamp(x, min=0) - x * y + torch.log1p(torch.exp(-x.abs()))
    assert torch.allclose(hand, F.binary_cross_entropy_with_logits(x, y, reduction="none"), atol=1e-6)
