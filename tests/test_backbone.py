"""Backbone tests (gains/backbone.py): ResNet-FPN weights loading, freezing and the stride layout.

Oracles: a torchvision resnet18 state dict (every tensor must load unchanged, a file of another depth is
reported by name) and the detectron2 / torchvision placement of the stride (1x1 or 3x3 conv). All CPU, tiny
images and tiny heads via config overrides (tiny_model from test_model.py).
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from gains.backbone import ResNetFPN, build_resnet, load_resnet_weights
from test_model import tiny_model


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
