"""Whole-model tests (gains/model.py): every mode trains and evaluates, degenerate batches, missing GA maps
and bad labels, inputs left unmodified, trainable norms, and (slow) overfitting two tiny images.

All CPU, tiny images (64-128 px) and tiny heads via config overrides. The helpers here (TINY, tiny_model,
make_sample) are shared: test_backbone.py, test_mask_head.py, test_predictor.py, test_gpu_path.py and
test_tiling.py import them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gains.config import load_config
from gains.model import MODES, build_model

# Most tests build frozen BN models without weights on purpose (the fastest setting) with build_model, which
# allows it: only training a config-built model refuses it (check_backbone_init, tested below).
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


def test_bad_labels_are_reported():
    image, target = make_sample(labels=[1, 3])
    with pytest.raises(ValueError, match=r"image_id 1: labels must lie in 1..2"):
        tiny_model("mask_rcnn").train()([image], [target])


def test_training_refuses_frozen_bn_from_scratch_unless_allowed(tmp_path):
    """Frozen BN on a random ResNet is unstable: engine.train stops before any work (nothing written) with
    one line naming both fixes; the allowance key, ImageNet weights or init_weights let it through."""
    from gains import engine
    from gains.errors import ConfigError
    from gains.model import check_backbone_init

    cfg = load_config(None, TINY + ["model.backbone.depth=18", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^model\.backbone\.norm=frozen_bn with model\.backbone\.weights=null.*"
                                          r"model\.backbone\.weights=PATH, a torchvision resnet18 state dict.*"
                                          r"model\.backbone\.norm=gn model\.backbone\.freeze_at=0"):
        engine.train(cfg)
    assert not (tmp_path / "run").exists()
    for allowed in ("model.backbone.allow_frozen_bn_from_scratch=true", "model.backbone.weights=r18.pth",
                    "init_weights=model_final.pth", "model.backbone.norm=gn"):
        check_backbone_init(load_config(None, TINY + [allowed]))


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
