"""Import of detectron2 GAInS / Mask R-CNN checkpoints and MSRA caffe2 ImageNet weights (gains/weight_names.py).

The detectron2 and caffe2 state dicts are generated from OUR model's shapes through the inverse tables
below, written independently of the converter's own map, with random values; every tensor must come back
where it started (cls_score rows reordered: detectron2 puts background last, we put it first).
"""
from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from gains.backbone import ResNetFPN
from gains.checkpoint import CheckpointError, load_weights_for_finetune, read_checkpoint
from gains.config import load_config
from gains.weight_names import (MSRA_INPUT, TORCHVISION_INPUT, ConversionError, WeightsInputError,
                                convert_detectron2_state_dict, input_convention)
from gains.model import build_model
from test_evaluation import rect_dataset

SMALL = ["model.backbone.fpn_channels=16", "model.roi_heads.fc_dim=16", "model.roi_heads.mask_conv_dim=8",
         "device=cpu", "data.num_workers=0", "data.min_size_test=64", "data.max_size_test=64", "test.vis=0",
         "model.rpn.pre_nms_topk_test=200", "model.rpn.post_nms_topk_test=50"]

# ---- the inverse tables (ours -> detectron2), written out independently of gains/weight_names.py
STAGE = {"1": "res2", "2": "res3", "3": "res4", "4": "res5"}
BLOCK_PART = {"conv1": "conv1", "bn1": "conv1.norm", "conv2": "conv2", "bn2": "conv2.norm", "conv3": "conv3",
              "bn3": "conv3.norm", "downsample.0": "shortcut", "downsample.1": "shortcut.norm"}
HEAD_PART = {"convs.0": "{c}1", "convs.2": "{c}2", "convs.4": "{c}3", "convs.6": "{c}4", "deconv": "deconv",
             "predictor": "predictor"}
FIXED = {
    "backbone.body.conv1": "backbone.bottom_up.stem.conv1", "backbone.body.bn1": "backbone.bottom_up.stem.conv1.norm",
    **{f"backbone.fpn.inner_blocks.{i}.0": f"backbone.fpn_lateral{i + 2}" for i in range(4)},
    **{f"backbone.fpn.layer_blocks.{i}.0": f"backbone.fpn_output{i + 2}" for i in range(4)},
    "rpn.head.conv": "proposal_generator.rpn_head.conv",
    "rpn.head.objectness": "proposal_generator.rpn_head.objectness_logits",
    "rpn.head.deltas": "proposal_generator.rpn_head.anchor_deltas",
    "roi_heads.box_head.fc1": "roi_heads.box_head.fc1", "roi_heads.box_head.fc2": "roi_heads.box_head.fc2",
    "roi_heads.box_head.cls_score": "roi_heads.box_predictor.cls_score",
    "roi_heads.box_head.bbox_pred": "roi_heads.box_predictor.bbox_pred",
    "roi_heads.alrm.guidance": "roi_heads.branch_guidance_conv_anomaly_layer2",
}


def d2_name(ours: str, plain: bool) -> str:
    module, param = ours.rsplit(".", 1)
    m = re.fullmatch(r"backbone\.body\.layer(\d)\.(\d+)\.(.+)", module)
    if m:
        return f"backbone.bottom_up.{STAGE[m.group(1)]}.{m.group(2)}.{BLOCK_PART[m.group(3)]}.{param}"
    for prefix, d2, conv in (("roi_heads.mask_head.", "roi_heads.mask_head." if plain else
                              "roi_heads.double_branch_mask_head.", "mask_fcn" if plain else "abn_fcn"),
                             ("roi_heads.alrm.branch.", "roi_heads.double_branch_anomaly_head.", "abn_fcn")):
        if module.startswith(prefix):
            return d2 + HEAD_PART[module[len(prefix):]].format(c=conv) + "." + param
    return f"{FIXED[module]}.{param}"


def random_like(key: str, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random values that keep a deep random network finite: fan-in scaled weights, BN near identity."""
    if key.endswith("running_var"):
        return torch.rand(t.shape, generator=g) + 0.5
    if t.dim() == 1:
        scale = 0.5 if key.endswith("weight") else 0.1
        return (torch.rand(t.shape, generator=g) * scale + (0.5 if key.endswith("weight") else 0.0))
    return torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5


def make_d2(model, plain: bool = False, seed: int = 0) -> tuple[dict, dict]:
    """(detectron2 state dict, the state dict the converter must produce) for `model`'s shapes."""
    g = torch.Generator().manual_seed(seed)
    d2, expected = {}, {}
    for key, t in model.state_dict().items():
        v = random_like(key, t, g)
        expected[key] = v
        if ".cls_score." in key:  # detectron2's row order: foreground 1..K, then background
            v = torch.cat([v[1:], v[:1]])
        d2[d2_name(key, plain)] = v
    if not plain:  # the authors' two dead guidance layers, same shape as the live one
        for i in (0, 1):
            for p in ("weight", "bias"):
                d2[f"roi_heads.branch_guidance_conv_anomaly_layer{i}.{p}"] = torch.randn(
                    expected[f"roi_heads.alrm.guidance.{p}"].shape, generator=g)
    d2["pixel_mean"] = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    d2["pixel_std"] = torch.ones(3, 1, 1)
    for i, cell in enumerate(model.rpn.anchor_generator.cell_anchors):
        d2[f"proposal_generator.anchor_generator.cell_anchors.{i}"] = cell.float()
    return d2, expected


def small_cfg(root, *overrides, base="configs/isbi_r50.yaml"):
    return load_config(base, SMALL + [f"data.root={root}", *overrides])


def quiet_build(cfg):
    """The model of `cfg` without weights (frozen BN on purpose: every tensor comes from the test's file)."""
    return build_model(cfg)


@pytest.fixture(scope="module")
def gains_case(tmp_path_factory):
    root = rect_dataset(tmp_path_factory.mktemp("data"))  # test.json: categories 3 and 7
    cfg = small_cfg(root)
    model = quiet_build(cfg)
    d2, expected = make_d2(model)
    return cfg, model, d2, expected


def test_every_tensor_lands_where_it_should(gains_case):
    cfg, model, d2, expected = gains_case
    out, report = convert_detectron2_state_dict(d2, num_classes=2, mode="gains", reference=model.state_dict())
    assert set(out) == set(expected) and len(report.mapped) == len(expected)
    for key, value in expected.items():
        assert torch.equal(out[key], value), key
    cls = d2["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(out["roi_heads.box_head.cls_score.weight"][0], cls[-1])  # background
    assert torch.equal(out["roi_heads.box_head.cls_score.weight"][1:], cls[:-1])
    assert torch.equal(out["roi_heads.box_head.bbox_pred.weight"], d2["roi_heads.box_predictor.bbox_pred.weight"])
    assert torch.equal(out["roi_heads.alrm.guidance.weight"], d2["roi_heads.branch_guidance_conv_anomaly_layer2.weight"])
    ignored = dict(report.ignored)
    for i in (0, 1):
        assert "dead guidance" in ignored[f"roi_heads.branch_guidance_conv_anomaly_layer{i}.weight"]
    assert {"pixel_mean", "pixel_std", "proposal_generator.anchor_generator.cell_anchors.4"} <= set(ignored)
    assert not report.problems and not report.filled


def test_plain_mask_rcnn_checkpoint(tmp_path):
    cfg = small_cfg(tmp_path, "model.mode=mask_rcnn", "model.num_classes=3")
    model = quiet_build(cfg)
    d2, expected = make_d2(model, plain=True, seed=1)
    assert "roi_heads.mask_head.mask_fcn4.weight" in d2
    out, report = convert_detectron2_state_dict(d2, num_classes=3, mode="mask_rcnn", reference=model.state_dict())
    assert all(torch.equal(out[k], v) for k, v in expected.items()) and set(out) == set(expected)
    assert torch.equal(out["roi_heads.box_head.cls_score.bias"][0], d2["roi_heads.box_predictor.cls_score.bias"][3])
    with pytest.raises(ConversionError, match="set model.mode=mask_rcnn"):
        convert_detectron2_state_dict(d2, num_classes=3, mode="gains")
    with pytest.raises(ConversionError, match="set model.num_classes=3"):
        convert_detectron2_state_dict(d2, num_classes=2, mode="mask_rcnn")


def test_unknown_missing_and_misshaped_keys_are_named(gains_case):
    cfg, model, d2, _ = gains_case
    bad = dict(d2)
    bad["roi_heads.extra_head.weight"] = torch.zeros(3)
    del bad["backbone.fpn_output3.bias"]
    bad["roi_heads.box_head.fc2.weight"] = torch.zeros(5, 16)
    with pytest.raises(ConversionError) as e:
        convert_detectron2_state_dict(bad, num_classes=2, mode="gains", reference=model.state_dict())
    for name in ("roi_heads.extra_head.weight", "backbone.fpn_output3.bias", "roi_heads.box_head.fc2.weight"):
        assert name in str(e.value)
    out, report = convert_detectron2_state_dict(bad, reference=model.state_dict(), strict=False)
    assert report.unknown == ["roi_heads.extra_head.weight"]
    assert report.missing == [("backbone.fpn_output3.bias", "backbone.fpn.layer_blocks.1.0.bias")]
    assert report.shape_mismatched == ["roi_heads.box_head.fc2.weight: file (5, 16) vs model (16, 16)"]
    assert "roi_heads.box_head.fc2.weight" not in out and len(out) == len(model.state_dict()) - 2


# ---- MSRA caffe2 ImageNet weights
def caffe2_name(ours: str) -> str:
    """torchvision ResNet name -> MSRA blob name (independent of the converter)."""
    if ours == "conv1.weight":
        return "conv1_w"
    bn = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    m = re.fullmatch(r"bn1\.(\w+)", ours)
    if m:
        return f"res_conv1_bn_{bn[m.group(1)]}"
    layer, block, part, param = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.\d)\.(\w+)", ours).groups()
    branch = {"conv1": "2a", "bn1": "2a", "conv2": "2b", "bn2": "2b", "conv3": "2c", "bn3": "2c",
              "downsample.0": "1", "downsample.1": "1"}[part]
    suffix = "w" if part.startswith("conv") or part == "downsample.0" else f"bn_{bn[param]}"
    return f"res{int(layer) + 1}_{block}_branch{branch}_{suffix}"


def test_msra_pkl_loads_into_the_backbone(tmp_path, caplog):
    net = ResNetFPN(50, freeze_at=0).body
    g = torch.Generator().manual_seed(2)
    blobs, expected = {}, {}
    for key, t in net.state_dict().items():
        stat = key.endswith(("running_mean", "running_var"))
        if stat and not key.startswith("bn1."):  # MSRA weights carry no BN statistics (stem: test the names)
            expected[key] = torch.zeros_like(t) if key.endswith("mean") else torch.ones_like(t)
            continue
        expected[key] = random_like(key, t, g)
        blobs[caffe2_name(key)] = expected[key].numpy()
    assert "res5_0_branch1_bn_s" in blobs and "res4_22_branch2a_w" not in blobs
    blobs.update(fc1000_w=np.zeros((1000, 2048), np.float32), fc1000_b=np.zeros(1000, np.float32),
                 res2_0_branch2a_w_momentum=np.zeros(1, np.float32))
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    with caplog.at_level("INFO", logger="gains.backbone"):
        backbone = ResNetFPN(50, weights=str(path))
    for key, value in expected.items():
        assert torch.equal(backbone.body.state_dict()[key], value), key
    assert "fc1000_w" in caplog.text and "res2_0_branch2a_w_momentum" in caplog.text  # ignored by name
    assert backbone.weights_input == MSRA_INPUT
    # the paper config fits the file; a config that feeds it RGB / a torchvision stride layout is refused
    assert quiet_build(small_cfg(tmp_path, f"model.backbone.weights={path}")).backbone.weights_input == MSRA_INPUT
    with pytest.raises(WeightsInputError, match=r"R-50\.pkl \(model\.backbone\.weights\) holds MSRA ImageNet "
                                                r"weights.*set model\.input_format=BGR "
                                                r"model\.backbone\.stride_in_1x1=true$"):
        quiet_build(small_cfg(tmp_path, f"model.backbone.weights={path}", "model.input_format=RGB",
                              "model.backbone.stride_in_1x1=false"))
    model = quiet_build(small_cfg(tmp_path))  # init_weights=R-50.pkl: the backbone loads, the heads are listed
    report = load_weights_for_finetune(model, path)
    assert len(report.loaded) == len(expected) and all(k.startswith("backbone.fpn") or not k.startswith(
        "backbone") for k in report.missing)
    with pytest.raises(WeightsInputError, match=r"\(init_weights\) holds MSRA.*model\.pixel_std=\[1\.0,1\.0,1\.0\]"):
        load_weights_for_finetune(quiet_build(small_cfg(tmp_path, "model.pixel_std=[57,57,57]")), path)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    with pytest.raises(CheckpointError, match="refusing to unpickle os.system"):
        read_checkpoint(evil)


def test_input_convention_of_each_kind_of_file(gains_case):
    """Which input a file's weights expect, from its names and top-level entries: detectron2 checkpoints
    their saved pixel_mean / pixel_std (BGR, stride in the 1x1 conv), torchvision names and detectron2 files
    converted from torchvision (`__author__: torchvision`) torchvision's, caffe2 names MSRA's, ours nothing."""
    _, model, d2, _ = gains_case
    saved = input_convention(d2)  # float32 buffers: MSRA's numbers to float32 rounding
    assert saved.kind == "a detectron2 checkpoint" and saved.pixel_mean == pytest.approx(MSRA_INPUT.pixel_mean)
    own = dict(d2, pixel_std=torch.tensor([57.375, 57.12, 58.395]).view(3, 1, 1))
    assert input_convention(own).pixel_std == pytest.approx((57.375, 57.12, 58.395))
    assert input_convention(own).input_format == "BGR" and input_convention(own).stride_in_1x1 is True
    trunk = {k[len("backbone.bottom_up."):]: v for k, v in d2.items() if k.startswith("backbone.bottom_up.")}
    assert input_convention(trunk) == MSRA_INPUT
    assert input_convention(trunk, {"__author__": "torchvision"}).settings() == TORCHVISION_INPUT.settings()
    assert input_convention({"conv1_w": 0, "res2_0_branch2a_w": 0}) == MSRA_INPUT
    tv = {k[len("backbone.body."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.body.")}
    assert input_convention(tv) == TORCHVISION_INPUT and input_convention(model.state_dict()) is None


def test_torchvision_weights_converted_for_detectron2_expect_torchvision_input(tmp_path):
    """detectron2's convert-torchvision-to-d2.py writes {'model': detectron2 trunk names, '__author__':
    'torchvision'}: such a .pkl loads into the trunk and asks for the torchvision input keys."""
    net = ResNetFPN(18, freeze_at=0).body
    model = {d2_name("backbone.body." + k, plain=True)[len("backbone.bottom_up."):]: np.full(t.shape, 0.5, np.float32)
             for k, t in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "stem.conv1.weight" in model and "res3.0.shortcut.norm.running_var" in model
    path = tmp_path / "R-18-torchvision.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "torchvision", "matching_heuristics": True}, f, protocol=2)
    backbone = ResNetFPN(18, weights=str(path))
    assert backbone.weights_input.settings() == TORCHVISION_INPUT.settings()
    assert float(backbone.body.layer3[0].downsample[1].running_var[0]) == 0.5
