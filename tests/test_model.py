"""Model tests: every mode trains and evaluates, degenerate batches, weights loading, numerics oracles.

All CPU, tiny images (64-128 px) and tiny heads via config overrides; no other gains module needed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import FrozenBatchNorm2d, roi_align

from gains.alrm import anomaly_loss
from gains.backbone import ResNetFPN, build_resnet, load_resnet_weights
from gains.config import load_config
from gains.model import MODES, build_model
from gains.instances import CropMasks
from gains.predictor import Predictor, paste_masks, paste_masks_to_crops, resized_shape
from gains.mask_head import crop_per_gt, mask_loss
from gains.roi_align import aligned_roi_align, assign_levels
from gains.rpn import AnchorGenerator, rpn_losses

# Most tests use frozen BN without weights on purpose (the fastest setting); its warning is tested once below.
pytestmark = pytest.mark.filterwarnings("ignore:model.backbone.norm=frozen_bn")

TINY = ["model.backbone.fpn_channels=32", "model.roi_heads.mask_conv_dim=16", "model.roi_heads.fc_dim=32",
        "model.rpn.batch_size_per_image=64", "model.roi_heads.batch_size_per_image=64",
        "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100",
        "model.rpn.pre_nms_topk_test=200", "model.rpn.post_nms_topk_test=100"]


def tiny_model(mode="gains", depth=18, *extra):
    torch.manual_seed(0)
    cfg = load_config(None, TINY + [f"model.mode={mode}", f"model.backbone.depth={depth}", *extra])
    return build_model(cfg)


def make_sample(h=96, w=96, shapes=((30, 30, 12, 9), (52, 60, 15, 15)), labels=None, seed=0, image_id=1):
    """Bright ellipses (cy, cx, ry, rx) on a noisy background -> (image [3,H,W], target dict)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    masks = np.stack([((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 for cy, cx, ry, rx in shapes]) \
        if shapes else np.zeros((0, h, w), bool)
    img = 0.2 + 0.05 * rng.standard_normal((h, w))
    for k, m in enumerate(masks):
        img[m] = 0.6 + 0.1 * k
    image = torch.from_numpy(np.clip(img, 0, 1)).float()[None].repeat(3, 1, 1)
    boxes = []
    for m in masks:
        ys, xs = np.where(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    n = len(masks)
    ga = 1.0 + 0.5 * torch.from_numpy(rng.random((n, h, w))).float()
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
              "labels": torch.tensor(labels if labels is not None else [1 + k % 2 for k in range(n)],
                                     dtype=torch.int64),
              "masks": torch.from_numpy(masks.astype(np.uint8)), "ga": ga, "image_id": image_id}
    return image, target


def empty_sample(h=64, w=80):
    return make_sample(h, w, shapes=(), image_id=7)


def assert_all_grads(model, losses):
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


LOSS_KEYS = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("mode", list(MODES))
def test_train_step_every_mode(mode, depth):
    model = tiny_model(mode, depth).train()
    imgs, tgts = zip(make_sample(), make_sample(80, 112, ((40, 50, 20, 30),), seed=1))
    losses = model(list(imgs), list(tgts))
    expected = LOSS_KEYS | ({"loss_ga"} if MODES[mode][1] else set())
    assert set(losses) == expected
    assert_all_grads(model, losses)
    has_branch = any(n.startswith("roi_heads.alrm") for n, _ in model.named_parameters())
    assert has_branch == MODES[mode][1]


def test_train_step_resnet101():
    model = tiny_model("gains", 101).train()
    image, target = make_sample()
    assert_all_grads(model, model([image], [target]))


@pytest.mark.parametrize("mode", ["mask_rcnn", "gains"])
def test_degenerate_batches_give_every_parameter_a_gradient(mode):
    # GroupNorm and nothing frozen: every parameter of the whole network must receive a gradient.
    model = tiny_model(mode, 18, "model.backbone.norm=gn", "model.backbone.freeze_at=0").train()
    for batch in ([empty_sample()], [make_sample(), empty_sample()]):
        model.zero_grad()
        imgs, tgts = zip(*batch)
        assert_all_grads(model, model(list(imgs), list(tgts)))
    # zero positive anchors and zero foreground RoIs although instances exist
    model.zero_grad()
    model.rpn.sampler.positive_fraction = 0.0
    model.roi_heads.sampler.positive_fraction = 0.0
    image, target = make_sample()
    losses = model([image], [target])
    assert float(losses["loss_mask"].detach()) == 0.0 and float(losses["loss_box_reg"].detach()) == 0.0
    assert_all_grads(model, losses)


def test_mask_rcnn_needs_no_ga_and_gains_requires_it():
    image, target = make_sample()
    target = {k: v for k, v in target.items() if k != "ga"}
    losses = tiny_model("mask_rcnn").train()([image], [target])
    assert "loss_ga" not in losses
    for mode in ("reweight_only", "branch_only", "gains"):
        with pytest.raises(KeyError, match="image_id 1.*'ga'"):
            tiny_model(mode).train()([image], [target])


def test_bad_labels_and_frozen_bn_from_scratch_are_reported():
    image, target = make_sample(labels=[1, 3])
    with pytest.raises(ValueError, match=r"image_id 1: labels must lie in 1..2"):
        tiny_model("mask_rcnn").train()([image], [target])
    from gains.engine import _build_default_model
    cfg = load_config(None, TINY + ["model.backbone.depth=18"])
    with pytest.warns(UserWarning, match="frozen_bn without model.backbone.weights"):
        _build_default_model(cfg)  # training warns; loading a checkpoint for evaluation does not


def test_inputs_are_not_modified():
    model = tiny_model("gains").train()
    image, target = make_sample()
    before = (image.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()})
    model([image], [target])
    assert torch.equal(image, before[0])
    assert all(torch.equal(target[k], v) for k, v in before[1].items() if torch.is_tensor(v))


def test_eval_outputs():
    model = tiny_model("gains", 18, "model.roi_heads.score_thresh_test=0.0").eval()
    imgs = [make_sample()[0], make_sample(70, 90)[0], empty_sample()[0]]
    with torch.no_grad():
        out = model(imgs)
    assert len(out) == 3
    for res, img in zip(out, imgs):
        n = len(res["boxes"])
        assert 0 < n <= 100
        assert res["boxes"].shape == (n, 4) and res["boxes"].dtype == torch.float32
        assert res["scores"].shape == (n,) and bool((res["scores"][:-1] >= res["scores"][1:]).all())
        assert res["labels"].dtype == torch.int64 and set(res["labels"].tolist()) <= {1, 2}
        assert res["masks"].shape == (n, 1, 28, 28) and res["masks"].dtype == torch.float32
        assert 0 <= float(res["masks"].min()) and float(res["masks"].max()) <= 1
        h, w = img.shape[1:]
        assert float(res["boxes"][:, [0, 2]].max()) <= w and float(res["boxes"][:, [1, 3]].max()) <= h
    model.roi_heads.max_dets = 5
    with torch.no_grad():
        assert len(model(imgs[:1])[0]["boxes"]) == 5


def test_weights_missing_file_and_pkl(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone weights not found.*resnet50.pth"):
        ResNetFPN(50, weights=str(tmp_path / "resnet50.pth"))
    with pytest.raises(FileNotFoundError, match="backbone weights not found.*R-50.pkl"):
        ResNetFPN(50, weights=str(tmp_path / "R-50.pkl"))  # .pkl files load (tests/test_convert_d2.py)


def test_load_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        ref.bn1.running_mean.uniform_()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = tiny_model("mask_rcnn", 18, f"model.backbone.weights={path}")
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)  # frozen stem after loading keeps the statistics
    for name, tensor in body.state_dict().items():
        assert torch.equal(tensor, ref.state_dict()[name]), name
    # a file for another depth is reported by name
    with pytest.raises(ValueError, match=r"Missing modules: .*layer1\.2\.conv1"):
        load_resnet_weights(build_resnet(34, "bn"), path)


def test_freeze_and_stride_layout():
    net = ResNetFPN(50, norm="bn", freeze_at=2, stride_in_1x1=True)
    b = net.body
    assert not any(p.requires_grad for p in b.layer1.parameters()) and not b.conv1.weight.requires_grad
    assert isinstance(b.layer1[0].bn1, FrozenBatchNorm2d) and isinstance(b.layer2[0].bn1, torch.nn.BatchNorm2d)
    assert b.layer2[0].conv1.stride == (2, 2) and b.layer2[0].conv2.stride == (1, 1)
    tv = ResNetFPN(50, freeze_at=0, stride_in_1x1=False).body
    assert tv.layer2[0].conv1.stride == (1, 1) and tv.layer2[0].conv2.stride == (2, 2)
    feats = net(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]


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


def test_level_assignment():
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 10, 10], [0, 0, 1000, 1000],
                          [0, 0, 447, 447], [0, 0, 448, 448]], dtype=torch.float32)
    assert assign_levels(boxes).tolist() == [2, 1, 0, 3, 2, 3]


def test_rpn_loss_normalisation():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    deltas = torch.zeros(1, 4, 4)
    labels = torch.tensor([[1, 0, -1, -1]])
    losses = rpn_losses(logits, deltas, labels, torch.ones(1, 4), normalizer=8.0)
    bce = math.log(2) + math.log(1 + math.e)
    assert math.isclose(float(losses["loss_rpn_cls"]), bce / 8, rel_tol=1e-6)
    assert math.isclose(float(losses["loss_rpn_loc"]), 4 / 8, rel_tol=1e-6)


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


@pytest.mark.parametrize("norm", ["bn", "syncbn"])
def test_trainable_norms(norm):
    model = tiny_model("branch_only", 18, f"model.backbone.norm={norm}", "model.backbone.freeze_at=1").train()
    image, target = make_sample()
    assert_all_grads(model, model([image, make_sample(seed=2)[0]], [target, make_sample(seed=2)[1]]))


@pytest.mark.slow
def test_overfits_two_tiny_images():
    torch.manual_seed(0)
    model = tiny_model("gains", 18, "model.backbone.norm=gn", "model.backbone.freeze_at=0",
                       "model.input_format=RGB", "model.pixel_mean=[128,128,128]", "model.pixel_std=[64,64,64]")
    model.train()
    batch = [make_sample(), make_sample(96, 112, ((40, 40, 20, 14), (44, 70, 16, 22)), seed=3)]
    imgs, tgts = zip(*batch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    history = []
    for _ in range(50):
        losses = model(list(imgs), list(tgts))
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total.detach()))
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5]), history


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
