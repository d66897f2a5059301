"""Transforms (gains/transforms.py): the resize rule, boxes from masks, joint resize and flip of image, masks and
GA maps, the deterministic evaluation transform, and ground-truth boxes as detectron2 makes them.

Oracles: detectron2's resize sizes, boxes with exclusive corners worked out by hand, maps that must stay
registered with the image (nearest keeps masks binary, bilinear keeps the GA ramp smooth), the image ops
themselves for boxes (a whole-pixel rectangle's box must move as its mask does), pycocotools' toBbox, and
detectron2's box rule (transform the annotation's box, clip to the image, drop empty instances).
"""
import random

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from conftest import write_coco
from gains.annotations import load_coco
from gains.data import InstanceDataset
from gains.transforms import EvalTransform, SampleTransform, TrainTransform, masks_to_boxes, resized_shape


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


def test_test_transform_resizes_float_images_bilinearly():
    """A float image upsampled 2x by the eval transform equals textbook bilinear interpolation (a loop oracle
    in conftest, not torch's kernel); the transform is deterministic."""
    from tests.conftest import bilinear_upsample_oracle
    image = torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros((0, 30, 40), dtype=torch.uint8)
    a = EvalTransform(60, 1000)(image, masks)
    b = EvalTransform(60, 1000)(image, masks)
    assert a[0].shape == (3, 60, 80) and torch.equal(a[0], b[0]) and a[1].shape == (0, 60, 80)
    expected = bilinear_upsample_oracle(image.double().numpy(), 60, 80)
    assert np.abs(a[0].double().numpy() - expected).max() < 1e-5


def test_boxes_move_as_the_pixels_do():
    """A rectangle of whole pixels stays one under a 2x resize (bilinear >= 0.5), the flips and the quarter
    turns, so the box of the transformed mask is the oracle for apply_boxes, for every combination."""
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        h, w = (int(v) for v in torch.randint(5, 20, (2,), generator=g))
        x0, y0 = int(torch.randint(0, w - 1, (1,), generator=g)), int(torch.randint(0, h - 1, (1,), generator=g))
        x1, y1 = x0 + 1 + int(torch.randint(0, w - x0 - 1, (1,), generator=g)), \
            y0 + 1 + int(torch.randint(0, h - y0 - 1, (1,), generator=g))
        masks = torch.zeros((1, h, w), dtype=torch.uint8)
        masks[0, y0:y1, x0:x1] = 1
        box = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32)
        for hflip in (False, True):
            for vflip in (False, True):
                for turns in range(4):
                    t = SampleTransform((h, w), (2 * h, 2 * w), hflip, vflip, turns)
                    image, out, _ = t.apply(torch.rand(3, h, w), masks)
                    assert t.apply_boxes(box).tolist() == masks_to_boxes(out).tolist(), (h, w, hflip, vflip, turns)
                    assert image.shape[-2:] == out.shape[-2:]


def test_boxes_like_detectron2_apply_box_then_clip():
    """20x30 (HxW) -> 40x45: x * 1.5, y * 2, then the flip in the 45 px wide output (x -> 45 - x), then the
    clip to [0, 45] x [0, 40]; a box sticking out of the image (within the loader's tolerance) is clipped."""
    t = SampleTransform((20, 30), (40, 45), hflip=True)
    boxes = torch.tensor([[2.5, 3.25, 10.0, 7.5], [-0.6, 18.5, 30.7, 20.4]])
    assert torch.allclose(t.apply_boxes(boxes), torch.tensor([[30.0, 6.5, 41.25, 15.0], [0.0, 37.0, 45.0, 40.0]]))
    assert t.apply_boxes(torch.zeros(0, 4)).shape == (0, 4)


def _box_set(root):
    """40x40 image: a rectangle polygon whose json bbox is 1 px wider on each side than the polygon, a rectangle
    polygon without bbox, and a one-pixel RLE instance (row 7, column 31) with its bbox."""
    one_pixel = [31 * 40 + 7, 1, 40 * 40 - 31 * 40 - 8]  # column-major run lengths
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [3, 4, 12, 6],
             "segmentation": [[4, 4, 14, 4, 14, 10, 4, 10]]},
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [[20.5, 20, 30, 20, 30, 26.5, 20.5, 26.5]]},
            {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [31, 7, 1, 1],
             "segmentation": {"size": [40, 40], "counts": one_pixel}}]
    json_path, image_dir = write_coco(root, [{"id": 1, "file_name": "a.png", "height": 40, "width": 40}], anns)
    return load_coco(json_path, image_dir)


@pytest.mark.parametrize("target_format", ["sparse", "dense"])
def test_dataset_boxes_are_the_annotation_boxes_transformed(tmp_path, target_format):
    """detectron2's DatasetMapper (the authors' config: polygons, no crop) transforms the json's bbox and does
    not recompute it from the mask; without a bbox the loader takes pycocotools' toBbox of the segmentation."""
    records, cmap, _ = _box_set(tmp_path)
    no_bbox = mask_utils.toBbox(mask_utils.frPyObjects([[20.5, 20, 30, 20, 30, 26.5, 20.5, 26.5]], 40, 40))[0]
    x, y, w, h = (float(v) for v in no_bbox)
    expected = torch.tensor([[6, 8, 30, 20], [2 * x, 2 * y, 2 * (x + w), 2 * (y + h)], [62, 14, 64, 16]])
    _, target = InstanceDataset(records, cmap, EvalTransform(80, 80), target_format=target_format)[0]
    assert torch.allclose(target["boxes"], expected) and target["ann_ids"].tolist() == [1, 2, 3]
    assert masks_to_boxes(target["masks"] if target_format == "dense" else target["masks"].dense())[0].tolist() \
        == [8, 8, 28, 20]  # the mask's own box is narrower: not what detectron2 trains on
    random.seed(0)
    _, flipped = InstanceDataset(records, cmap, TrainTransform([80], 80, hflip_prob=1.0),
                                 target_format=target_format)[0]
    assert torch.allclose(flipped["boxes"], torch.stack([80 - expected[:, 2], expected[:, 1], 80 - expected[:, 0],
                                                         expected[:, 3]], 1))


def test_instances_left_empty_by_the_transform_are_dropped(tmp_path):
    """detectron2's filter_empty_instances: the one-pixel instance vanishes from the mask in a 4x downscale
    (its box stays non-empty), so it leaves the target with its label and annotation id."""
    records, cmap, _ = _box_set(tmp_path)
    for fmt in ("sparse", "dense"):
        _, target = InstanceDataset(records, cmap, EvalTransform(10, 10), target_format=fmt)[0]
        assert target["ann_ids"].tolist() == [1, 2] and target["labels"].tolist() == [1, 1]
        assert target["boxes"].shape == (2, 4) and len(target["masks"]) == 2
        assert torch.allclose(target["boxes"][0], torch.tensor([0.75, 1.0, 3.75, 2.5]))
    assert np.isclose(records[0].annotations[2].bbox, (31, 7, 1, 1)).all()  # it was loaded, then dropped
