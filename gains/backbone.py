"""ResNet-18/34/50/101 + FPN (P2-P6) built from torchvision blocks, with detectron2's conventions.

- Normalisation layer: `frozen_bn` (affine constants, the choice with ImageNet weights), `bn`, `syncbn`
  (plain BN in a single process) or `gn` (GroupNorm, 32 groups; the choice when training from scratch).
- `freeze_at` follows detectron2: 0 trains everything, 1 freezes the stem, 2 the stem and res2, ... 5 all
  four stages. Frozen stages get `requires_grad=False` and their BN layers become FrozenBatchNorm2d, so
  their statistics never move either.
- `stride_in_1x1=True` is the MSRA layout of the original ResNet (and of detectron2's ImageNet weights): the
  stride-2 of a bottleneck's first block sits on its first 1x1 conv instead of the 3x3 conv (torchvision).
  Only the strides differ, so parameter names and shapes stay torchvision's either way.
- P6 is a stride-2 subsampling of P5 (torchvision LastLevelMaxPool == detectron2 LastLevelMaxPool).

Weights are read only from a local file; nothing is ever downloaded. The file's kind (torchvision state dict,
MSRA caffe2 / detectron2 `.pkl` or `.pth`) decides the input the weights expect; `ResNetFPN.weights_input`
holds it so that `gains.model.build_model` can refuse a config that would feed them other input.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .errors import CheckpointError
from .weight_names import (RESNET_BLOCKS, TORCHVISION_INPUT, InputConvention, input_convention,
                           resnet_state_from_foreign, weights_format)
from .weights_io import read_foreign_weights, torch_load_safely

logger = logging.getLogger(__name__)

WEIGHTS_EXPECTED = ("detectron2's MSRA R-50.pkl / R-101.pkl, or an ImageNet ResNet state dict saved with "
                    "torch.save(model.state_dict()) (torchvision names)")


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """model.backbone.weights names no file (a CheckpointError, so the CLIs print it as one line)."""


class WeightsMismatchError(CheckpointError, ValueError):
    """The weights file is readable but is not a ResNet state dict of this depth; the message names the keys."""

RESNET_LAYERS = {depth: (Bottleneck if bottleneck else BasicBlock, list(blocks))
                 for depth, (bottleneck, blocks) in RESNET_BLOCKS.items()}
NORMS = ("frozen_bn", "bn", "gn", "syncbn")
STAGES = ("layer1", "layer2", "layer3", "layer4")  # detectron2's res2..res5


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "syncbn":
        # Behaves as BatchNorm2d unless torch.distributed is initialised.
        return nn.SyncBatchNorm
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"backbone norm must be one of {NORMS}, got {norm!r}")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every (Sync)BatchNorm2d inside `module` by a FrozenBatchNorm2d holding the same statistics
    and affine parameters; returns the (possibly new) module."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def build_resnet(depth: int, norm: str = "frozen_bn", stride_in_1x1: bool = True) -> ResNet:
    """A torchvision ResNet trunk without `avgpool`/`fc` (so torchvision state dicts load by name).

    With `stride_in_1x1` the first bottleneck of res3..res5 strides in conv1 (1x1) instead of conv2 (3x3).
    """
    if depth not in RESNET_LAYERS:
        raise ValueError(f"backbone depth must be one of {sorted(RESNET_LAYERS)}, got {depth}")
    block, layers = RESNET_LAYERS[depth]
    net = ResNet(block, layers, norm_layer=_norm_layer(norm))
    del net.avgpool, net.fc
    if stride_in_1x1 and block is Bottleneck:
        for stage in STAGES[1:]:
            first = getattr(net, stage)[0]
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    return net


def _unwrap_state_dict(obj) -> dict:
    """Accept a bare state dict or the usual wrappers ({'state_dict': ...}, {'model': ...})."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"found a {type(obj).__name__} without tensors under names; expected "
                                   f"{WEIGHTS_EXPECTED}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _read_weights_file(path: Path) -> tuple[dict, dict]:
    """(state dict, top-level entries such as detectron2's `__author__`) of a `.pkl` (numpy-only unpickler)
    or a torch.save file (weights_only), with the usual wrappers ({'model': ...}, {'state_dict': ...}) removed."""
    if path.suffix == ".pkl":
        return read_foreign_weights(path)
    obj = torch_load_safely(path, expected=WEIGHTS_EXPECTED, what="backbone weights (model.backbone.weights)")
    meta = {k: obj[k] for k in ("__author__",) if isinstance(obj, dict) and k in obj}
    try:
        return _unwrap_state_dict(obj), meta
    except WeightsMismatchError as e:
        raise WeightsMismatchError(f"{path} (model.backbone.weights): {e}") from None


def load_resnet_weights(net: ResNet, path: str | Path) -> InputConvention:
    """Copy ImageNet weights from a local file into `net`, in place, and return the input they were trained
    on (gains.weight_names.InputConvention). Recognised by their names, whatever the suffix: a torchvision
    ResNet state dict (RGB, torchvision mean/std, stride in the 3x3 conv), MSRA caffe2 weights (detectron2's
    `R-50.pkl`, `R-101.pkl`: BGR, MSRA mean, std 1, stride in the 1x1 conv), or a detectron2 file (trunk
    taken from `backbone.bottom_up`; its convention from its `__author__` / pixel_mean / pixel_std). caffe2
    and detectron2 names are converted by gains/weight_names.py; BN statistics absent from the file are set
    to mean 0 / var 1. A gains checkpoint (a whole model) is refused with the key that takes it (init_weights).

    Errors name every missing or shape-mismatched parameter; unknown keys (other than the classifier
    `fc.*` and, with GroupNorm, BN running statistics) are reported in a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"backbone weights not found: {path}. Nothing is downloaded: put detectron2's MSRA ImageNet weights "
            "there (ImageNetPretrained/MSRA/R-50.pkl or R-101.pkl, which the paper configs' input keys fit), or "
            "a torchvision ResNet state dict (`torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V1')"
            ".state_dict(), PATH)` on a machine with internet; it needs model.input_format=RGB, torchvision's "
            "pixel_mean / pixel_std and model.backbone.stride_in_1x1=false), or train from scratch with "
            "model.backbone.weights=null model.backbone.norm=gn model.backbone.freeze_at=0")
    state, meta = _read_weights_file(path)
    fmt = weights_format(state)
    if fmt == "gains":
        raise WeightsMismatchError(f"{path} (model.backbone.weights) is a gains checkpoint of a whole model, not "
                                   f"ImageNet ResNet weights: set init_weights={path} model.backbone.weights=null")
    # unknown names fail the completeness check below; if they pass, they are torchvision's
    convention = input_convention(state, meta) or TORCHVISION_INPUT
    if fmt in ("caffe2", "detectron2"):
        state = _convert_foreign_weights(path, state)
    own = net.state_dict()
    # group by module ("layer1.2.bn1" rather than its 4 tensors) so the message stays readable
    missing = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in own
                                 if k not in state and not k.endswith("num_batches_tracked")))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or mismatched:
        raise WeightsMismatchError(f"{path} does not fit this ResNet (wrong depth?). "
                         f"Missing modules: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                         f"shape mismatches: {mismatched[:20]}{' ...' if len(mismatched) > 20 else ''}")
    ignorable = ("fc.", "running_mean", "running_var", "num_batches_tracked")
    unknown = [k for k in state if k not in own and not any(s in k for s in ignorable)]
    if unknown:
        warnings.warn(f"{path}: ignored {len(unknown)} unknown keys: {unknown[:20]}")
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
    return convention


def _convert_foreign_weights(path: Path, state: dict) -> dict:
    """MSRA caffe2 / detectron2 names -> torchvision names; ignored blobs are logged, not dropped silently."""
    state, report = resnet_state_from_foreign(state)
    logger.info("%s: %s", path, report.describe())
    if report.unknown:
        warnings.warn(f"{path}: ignored {len(report.unknown)} unknown keys: {report.unknown[:20]}")
    return state


class ResNetFPN(nn.Module):
    """ResNet trunk + FPN. `forward(x [B,3,H,W] float, H and W multiples of 32)` returns the list
    [P2, P3, P4, P5, P6] of [B, out_channels, H/s, W/s] tensors, strides s = 4, 8, 16, 32, 64."""

    strides = (4, 8, 16, 32, 64)

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", freeze_at: int = 2, stride_in_1x1: bool = True,
                 weights: str | None = None, out_channels: int = 256):
        super().__init__()
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        self.body = build_resnet(depth, norm, stride_in_1x1)
        # the input the loaded weights expect (None without weights); build_model compares it with the config
        self.weights_input: InputConvention | None = load_resnet_weights(self.body, weights) if weights else None
        self._freeze(freeze_at)
        width = 64 if RESNET_LAYERS[depth][0] is BasicBlock else 256
        self.fpn = FeaturePyramidNetwork([width, width * 2, width * 4, width * 8], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def _freeze(self, freeze_at: int) -> None:
        body = self.body
        groups = [("conv1", "bn1")] + [(s,) for s in STAGES]
        for names in groups[:freeze_at]:
            for name in names:
                module = freeze_batchnorm(getattr(body, name))
                setattr(body, name, module)
                for p in module.parameters():
                    p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        feats = {}
        for i, stage in enumerate(STAGES):
            x = getattr(b, stage)(x)
            feats[str(i)] = x
        return list(self.fpn(feats).values())
