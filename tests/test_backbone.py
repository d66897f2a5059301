"""Backbone tests (gains/backbone.py): ResNet-FPN weights loading, freezing, the stride layout, and the input
the weights expect (a file's kind must meet a config that feeds it that input).

Oracles: a torchvision resnet18 state dict (every tensor must load unchanged, a file of another depth is
reported by name), the detectron2 / torchvision placement of the stride (1x1 or 3x3 conv), and detectron2's
settings for torchvision weights (RGB, mean [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375], stride
in the 3x3 conv). All CPU, tiny images and tiny heads via config overrides (tiny_model from test_model.py).
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from gains.backbone import ResNetFPN, WeightsMismatchError, build_resnet, load_resnet_weights
from gains.checkpoint import load_weights_for_finetune, make_checkpoint, save_checkpoint
from gains.config import load_config
from gains.weight_names import WeightsInputError
from test_model import TINY, tiny_model

# detectron2's settings for torchvision ImageNet weights, as our config keys
TORCHVISION_INPUT = ["model.input_format=RGB", "model.pixel_mean=[123.675,116.28,103.53]",
                     "model.pixel_std=[58.395,57.12,57.375]"]


def torchvision_file(path, depth, wrap=None):
    """A torchvision ResNet state dict of `depth` saved with torch.save. Values do not matter here, so every
    tensor is a view of one zero (torch.save writes that storage once: a ResNet-50 file of a few KB)."""
    ref = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    zero = torch.zeros(1)
    state = {k: zero.expand(v.shape) if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    torch.save({wrap: state} if wrap else state, path)
    return path


def test_weights_missing_file_and_pkl(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone weights not found.*resnet50.pth"):
        ResNetFPN(50, weights=str(tmp_path / "resnet50.pth"))
    with pytest.raises(FileNotFoundError, match="backbone weights not found.*R-50.pkl"):
        ResNetFPN(50, weights=str(tmp_path / "R-50.pkl"))  # .pkl files load (tests/test_weight_names.py)


def test_load_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        ref.bn1.running_mean.uniform_()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = tiny_model("mask_rcnn", 18, f"model.backbone.weights={path}", *TORCHVISION_INPUT)
    assert model.backbone.weights_input.input_format == "RGB"
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


def test_torchvision_weights_refuse_the_msra_input_of_the_paper_configs(tmp_path):
    """The paper configs' defaults (BGR, MSRA mean, std 1, stride in the 1x1 conv) would feed torchvision weights
    the wrong input: one line names every key to change (no stride key for ResNet-18, which has no choice)."""
    r18 = torchvision_file(tmp_path / "r18.pth", 18)
    with pytest.raises(WeightsInputError) as e:
        tiny_model("mask_rcnn", 18, f"model.backbone.weights={r18}")
    msg = str(e.value)
    assert "\n" not in msg and f"{r18} (model.backbone.weights) holds a torchvision ResNet state dict" in msg
    assert "set model.input_format=RGB model.pixel_mean=[123.675,116.28,103.53] " \
           "model.pixel_std=[58.395,57.12,57.375]" in msg and "stride_in_1x1" not in msg
    r50 = torchvision_file(tmp_path / "r50.pth", 50, wrap="state_dict")
    for overrides in ([], TORCHVISION_INPUT):  # the paper config, then with everything but the stride
        with pytest.raises(WeightsInputError, match=r"model\.backbone\.stride_in_1x1=false"):
            tiny_model("mask_rcnn", 50, f"model.backbone.weights={r50}", *overrides)
    model = tiny_model("mask_rcnn", 50, f"model.backbone.weights={r50}", *TORCHVISION_INPUT,
                       "model.backbone.stride_in_1x1=false")
    assert model.backbone.body.layer2[0].conv2.stride == (2, 2)


def test_a_gains_checkpoint_is_no_backbone_file(tmp_path):
    path = tmp_path / "model_final.pth"
    save_checkpoint(make_checkpoint(tiny_model("mask_rcnn", 18), iteration=1), path)
    with pytest.raises(WeightsMismatchError, match=rf"gains checkpoint.*set init_weights={path} "
                                                   r"model\.backbone\.weights=null"):
        ResNetFPN(18, weights=str(path))


def test_init_weights_checks_the_input_too(tmp_path):
    """init_weights takes torchvision state dicts (as backbone.body.*) and gains checkpoints, under the same
    rule: the model must feed the backbone the input the file was trained on."""
    r18 = torchvision_file(tmp_path / "r18.pth", 18)
    with pytest.raises(WeightsInputError, match=rf"{r18} \(init_weights\) holds a torchvision .*input_format=RGB"):
        load_weights_for_finetune(tiny_model("mask_rcnn", 18), r18)
    report = load_weights_for_finetune(tiny_model("mask_rcnn", 18, *TORCHVISION_INPUT), r18)
    assert "backbone.body.layer4.1.bn2.running_var" in report.loaded and not any(
        k.startswith("backbone.body.") for k in report.missing)
    cfg = load_config(None, TINY + ["model.mode=mask_rcnn", "model.backbone.depth=18", *TORCHVISION_INPUT])
    path = tmp_path / "model_final.pth"
    save_checkpoint(make_checkpoint(tiny_model("mask_rcnn", 18, *TORCHVISION_INPUT), iteration=1, config=cfg), path)
    with pytest.raises(WeightsInputError, match=r"gains checkpoint.*set model\.input_format=RGB "
                                                r"model\.pixel_mean=\[123\.675,116\.28,103\.53\]"):
        load_weights_for_finetune(tiny_model("mask_rcnn", 18), path)
    assert not load_weights_for_finetune(tiny_model("mask_rcnn", 18, *TORCHVISION_INPUT), path).missing
