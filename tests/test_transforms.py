"""Transforms (gains/transforms.py): the resize rule, boxes from masks, joint resize and flip of image, masks and
GA maps, and the deterministic evaluation transform.

Oracles: detectron2's resize sizes, boxes with exclusive corners worked out by hand, and maps that must stay
registered with the image (nearest keeps masks binary, bilinear keeps the GA ramp smooth).
"""
import random

import torch

from gains.transforms import EvalTransform, TrainTransform, masks_to_boxes, resized_shape


def test_resized_shape_like_detectron2():
    assert resized_shape(512, 512, 800, 1333) == (800, 800)
    assert resized_shape(200, 1000, 800, 1333) == (267, 1333)  # capped by the long side
    assert resized_shape(210, 211, 640, 1333) == (640, 643)


def test_masks_to_boxes_exclusive_corners():
    masks = torch.zeros((2, 10, 12), dtype=torch.uint8)
    masks[0, 2:5, 3:9] = 1
    assert masks_to_boxes(masks).tolist() == [[3, 2, 9, 5], [0, 0, 0, 0]]


def test_joint_resize_and_flip_keep_maps_registered():
    h, w = 20, 30
    masks = torch.zeros((1, h, w), dtype=torch.uint8)
    masks[0, 5:15, 2:12] = 1
    ga = torch.ones((1, h, w))
    ga[0, 5:15, 2:12] = torch.linspace(1, 1.5, 10)[None, :]  # a smooth ramp along x
    image = masks[0].float().expand(3, h, w).clone()
    random.seed(0)
    t = TrainTransform([40], 1000, hflip_prob=1.0)
    out_image, out_masks, out_ga = t(image, masks, ga)
    assert out_image.shape == (3, 40, 60) and out_masks.dtype == torch.uint8
    assert set(out_masks.unique().tolist()) <= {0, 1}              # nearest: still binary
    assert 16 < len(out_ga.unique()) and out_ga.max() <= 1.5 + 1e-6  # bilinear: still a smooth ramp
    # flipped: the ramp now decreases along x where the mask is
    row = out_ga[0, 20][out_masks[0, 20].bool()]
    assert row[0] > row[-1]
    # mask and image are flipped together
    assert torch.equal(out_masks[0].bool(), out_image[0] > 0.5)
    assert masks_to_boxes(out_masks).tolist() == [[60 - 24, 10, 60 - 4, 30]]


def test_test_transform_is_deterministic():
    image = torch.rand(3, 30, 40)
    masks = torch.zeros((0, 30, 40), dtype=torch.uint8)
    a = EvalTransform(60, 1000)(image, masks)
    b = EvalTransform(60, 1000)(image, masks)
    assert a[0].shape == (3, 60, 80) and torch.equal(a[0], b[0]) and a[1].shape == (0, 60, 80)
