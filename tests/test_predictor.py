"""Predictor tests (gains/predictor.py): mask pasting, the resize rule and whole-image prediction at the
original size.

Oracles: a full-image grid_sample of each mask over its box (detectron2's GPU path, no shortcuts), the dense
paste for the crop paste, detectron2's resize sizes, and the whole-image Predictor before tiling and CropMasks.
All CPU, tiny images and tiny heads via config overrides (tiny_model from test_model.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gains.instances import CropMasks
from gains.predictor import Predictor, paste_masks, paste_masks_to_crops, resized_shape
from test_model import tiny_model


def _paste_reference(mask, box, h, w, threshold):
    """Full-image grid_sample of one mask over its box (detectron2's GPU path, no shortcuts)."""
    x0, y0, x1, y1 = box.tolist()
    ys = (torch.arange(h, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * 2 - 1
    xs = (torch.arange(w, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None]
    return F.grid_sample(mask[None, None].double(), grid, align_corners=False)[0, 0] >= threshold


@pytest.mark.parametrize("threshold", [0.5, 0.2])
def test_paste_masks_matches_reference(threshold):
    torch.manual_seed(0)
    masks = torch.rand(5, 1, 28, 28)
    masks[0] = 1.0  # a full mask shows the half-cell fade beyond the box edge
    boxes = torch.tensor([[10.2, 5.7, 90.9, 60.1], [-5.0, 3.0, 20.0, 19.5], [50.0, 40.0, 130.0, 75.0],
                          [33.3, 33.3, 34.1, 35.0], [0.0, 0.0, 120.0, 80.0]])
    out = paste_masks(masks, boxes, (80, 120), threshold)
    assert out.shape == (5, 80, 120) and out.dtype == torch.bool
    for i in range(5):
        ref = _paste_reference(masks[i, 0], boxes[i], 80, 120, threshold)
        assert int((out[i] != ref).sum()) == 0, i
    assert paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (8, 9)).shape == (0, 8, 9)


def test_paste_masks_to_crops_equals_dense_paste():
    torch.manual_seed(1)
    h, w = 70, 90
    xy = torch.rand(40, 2) * torch.tensor([w + 20.0, h + 20.0]) - 10  # some boxes stick out of the image
    boxes = torch.cat([xy, xy + torch.rand(40, 2) * 50], 1)
    boxes[0] = torch.tensor([0.0, 0.0, w, h])  # the whole image
    boxes[1] = torch.tensor([w - 3.2, h - 2.1, w + 5.0, h + 9.0])  # bottom-right corner, mostly outside
    boxes[2] = torch.tensor([20.0, 30.0, 20.0, 30.0])  # degenerate: a point
    boxes[3] = torch.tensor([40.0, 10.0, 40.0, 50.0])  # degenerate: zero width
    boxes[4] = torch.tensor([200.0, 200.0, 230.0, 240.0])  # wholly outside
    boxes[5] = torch.tensor([-30.0, -30.0, -1.0, -2.0])  # wholly outside, negative
    masks = torch.rand(40, 1, 28, 28)
    masks[0] = 1.0
    masks[6] = 0.0  # an all-background mask
    for threshold in (0.5, 0.3):
        crops = paste_masks_to_crops(masks, boxes, (h, w), threshold)
        assert isinstance(crops, CropMasks) and len(crops) == 40 and crops.image_size == (h, w)
        assert np.array_equal(crops.dense(), paste_masks(masks, boxes, (h, w), threshold).numpy())
        assert np.array_equal(crops.boxes, crops.tight().boxes)  # tight crops
    assert np.array_equal(paste_masks_to_crops(masks[:, 0], boxes, (h, w)).dense(),
                          paste_masks(masks, boxes, (h, w)).numpy())  # [N,M,M] masks too
    empty = paste_masks_to_crops(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (8, 9))
    assert len(empty) == 0 and empty.image_size == (8, 9)


def test_resized_shape_like_detectron2():
    assert resized_shape(512, 512, 800, 1333) == (800, 800)
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert resized_shape(200, 1000, 800, 1333) == (267, 1333)
    assert resized_shape(101, 77, 64, 1000) == (84, 64)


def test_predictor_any_image_original_size():
    model = tiny_model("gains", 18, "model.roi_heads.score_thresh_test=0.0")
    predictor = Predictor(model, min_size_test=64, max_size_test=128, device="cpu")
    grey16 = (np.random.default_rng(0).random((101, 77)) * 60000).astype(np.uint16)
    rgb8 = np.zeros((50, 70, 3), np.uint8)
    out = predictor([grey16, rgb8, torch.rand(3, 40, 60)])
    for res, (h, w) in zip(out, [(101, 77), (50, 70), (40, 60)]):
        n = len(res["boxes"])
        # masks are crops of the original-size image (CropMasks), one per box
        assert isinstance(res["masks"], CropMasks) and len(res["masks"]) == n and res["masks"].image_size == (h, w)
        assert res["boxes"].dtype == torch.float32 and res["scores"].dtype == torch.float32
        assert res["labels"].dtype == torch.int64 and len(res["labels"]) == len(res["scores"]) == n
        assert float(res["boxes"][:, 2].max()) <= w and float(res["boxes"][:, 3].max()) <= h
    assert not model.training
    single = predictor(rgb8)  # one array is one image
    assert len(single) == 1 and single[0]["masks"].image_size == (50, 70)


def _old_predict(model, image, min_size, max_size):
    """The whole-image Predictor before tiling and CropMasks: dense masks, the model's own detection cap
    (with today's resize, `transforms.resize_image`: PIL's for 8-bit images)."""
    from gains.predictor import to_model_image
    from gains.transforms import resize_image

    x = to_model_image(image)
    h0, w0 = x.shape[-2:]
    nh, nw = resized_shape(h0, w0, min_size, max_size)
    x = resize_image(x, (nh, nw))
    with torch.no_grad():
        det = model.eval()([x])[0]
    boxes = det["boxes"] * torch.tensor([w0 / nw, h0 / nh, w0 / nw, h0 / nh])
    boxes = torch.stack([boxes[:, 0].clamp(0, w0), boxes[:, 1].clamp(0, h0),
                         boxes[:, 2].clamp(0, w0), boxes[:, 3].clamp(0, h0)], dim=1)
    return boxes, det["labels"], det["scores"], paste_masks(det["masks"], boxes, (h0, w0))


@pytest.mark.parametrize("tiling", ["auto", "never"])
def test_predictor_whole_image_path_unchanged(tiling):
    model = tiny_model("gains", 18, "model.roi_heads.score_thresh_test=0.0")
    image = (np.random.default_rng(3).random((101, 77)) * 255).astype(np.uint8)
    boxes, labels, scores, dense = _old_predict(model, image, 64, 128)
    assert len(boxes) == model.roi_heads.max_dets  # the cap binds, so the comparison below tests it
    same_cap = Predictor(model, 64, 128, device="cpu", tiling=tiling, detections_per_tile=None)(image)[0]
    assert torch.equal(same_cap["boxes"], boxes) and torch.equal(same_cap["scores"], scores)
    assert torch.equal(same_cap["labels"], labels)
    assert np.array_equal(same_cap["masks"].dense(), dense.numpy())
    # the default cap of 300 per forward image keeps the same top detections and adds lower-scored ones
    more = Predictor(model, 64, 128, device="cpu", tiling=tiling)(image)[0]
    n = len(boxes)
    assert len(more["boxes"]) > n and model.roi_heads.max_dets == 100  # the model's cap is restored
    assert torch.allclose(more["boxes"][:n], boxes, atol=1e-4) and torch.allclose(more["scores"][:n], scores)
