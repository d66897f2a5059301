"""What other frameworks call our parameters: the name maps of detectron2 checkpoints (the authors' released
GAInS models, plain Mask R-CNN) and MSRA ImageNet weights (caffe2 `R-50.pkl` / `R-101.pkl`), and the conversion of
their state dicts into ours, without detectron2. Whole files: gains/convert_checkpoint.py.

detectron2 -> gains (`s` stage 2..5, `i` block, `j` conv, `n` 1..4, `l` level 2..5; `.norm.*` / `.bn*.*` are
FrozenBatchNorm2d weight, bias, running_mean, running_var in both, eps 1e-5):
```
backbone.bottom_up.stem.conv1.{weight,norm.*}      backbone.body.conv1.weight, backbone.body.bn1.*
backbone.bottom_up.res{s}.{i}.conv{j}.{weight,norm.*}     backbone.body.layer{s-1}.{i}.conv{j}.weight, .bn{j}.*
backbone.bottom_up.res{s}.0.shortcut.{weight,norm.*}      backbone.body.layer{s-1}.0.downsample.{0.weight,1.*}
backbone.fpn_lateral{l}.*, backbone.fpn_output{l}.*        backbone.fpn.inner_blocks.{l-2}.0.*, .layer_blocks.{l-2}.0.*
proposal_generator.rpn_head.{conv,objectness_logits,anchor_deltas}.*    rpn.head.{conv,objectness,deltas}.*
roi_heads.box_head.fc{1,2}.*                       roi_heads.box_head.fc{1,2}.*
roi_heads.box_predictor.cls_score.* (K+1, bg LAST)  roi_heads.box_head.cls_score.* (bg FIRST: rows [K, 0..K-1])
roi_heads.box_predictor.bbox_pred.* (4K, no bg)     roi_heads.box_head.bbox_pred.* (same class order, copied)
roi_heads.double_branch_mask_head.abn_fcn{n}.*     roi_heads.mask_head.convs.{2n-2}.*
  (plain Mask R-CNN: roi_heads.mask_head.mask_fcn{n}.*)
roi_heads.double_branch_mask_head.{deconv,predictor}.*  roi_heads.mask_head.{deconv,predictor}.*  (plain: same)
roi_heads.double_branch_anomaly_head.abn_fcn{n}.*  roi_heads.alrm.branch.convs.{2n-2}.*
roi_heads.double_branch_anomaly_head.{deconv,predictor}.*  roi_heads.alrm.branch.{deconv,predictor}.*
roi_heads.branch_guidance_conv_anomaly_layer2.*    roi_heads.alrm.guidance.*  (the last layer: the live one)
```
Ignored by name with a reason: dead guidance layers 0, 1 (gains/METHOD.md §8), `pixel_mean`/`pixel_std` and
`cell_anchors` buffers (compared with the config by `convert_checkpoint`), `num_batches_tracked`. Config, not
tensors: BGR, pixel mean [103.53, 116.28, 123.675] / std 1, stride in the 1x1 conv, frozen BN; detectron2's
anchors (not rounded, offset 0) are what gains.rpn builds.
MSRA caffe2 -> torchvision ResNet: `conv1_w`, `res_conv1_bn_{s,b}` -> conv1.weight, bn1.{weight,bias};
`res{s}_{i}_branch{2a,2b,2c,1}_w` -> layer{s-1}.{i}.{conv1,conv2,conv3,downsample.0}.weight; `..._bn_{s,b,rm,riv}`
-> {bn1,bn2,bn3,downsample.1}.{weight,bias,running_mean,running_var} (detectron2's c2 map); `fc1000_*`,
`*_momentum` ignored by name. MSRA BN is a folded affine without statistics: mean 0 / var 1 are filled in.

Input conventions (`InputConvention`, `input_convention`): ImageNet weights only give the right features on the
input they were trained on. MSRA caffe2 / detectron2 files: BGR, mean [103.53, 116.28, 123.675], std 1,
stride in the 1x1 conv (detectron2's own pixel_mean / pixel_std buffers when the file has them); torchvision
ResNet state dicts and detectron2 files converted from them (`__author__: torchvision`): RGB, mean
[123.675, 116.28, 103.53], std [58.395, 57.12, 57.375], stride in the 3x3 conv (detectron2's settings for them).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace

import torch

from .errors import CheckpointError
from .weights_io import list_names

# ResNet trunk per depth: (bottleneck blocks?, blocks in res2..res5); gains.backbone builds its nets from it.
RESNET_BLOCKS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)),
                 101: (True, (3, 4, 23, 3))}
NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")
MSRA_PIXEL_MEAN, MSRA_PIXEL_STD = [103.53, 116.28, 123.675], [1.0, 1.0, 1.0]
TORCHVISION_PIXEL_MEAN, TORCHVISION_PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
D2_RESNET = "backbone.bottom_up."
GUIDANCE = re.compile(r"^roi_heads\.branch_guidance_conv_anomaly_layer(\d+)\.")
DOUBLE_MASK, PLAIN_MASK, ANOMALY = ("roi_heads.double_branch_mask_head.", "roi_heads.mask_head.",
                                    "roi_heads.double_branch_anomaly_head.")
IGNORE_RULES = [
    (re.compile(r"^pixel_(mean|std)$"), "input normalisation: config model.pixel_mean / model.pixel_std"),
    (re.compile(r"^proposal_generator\.anchor_generator\.cell_anchors\.\d+$"), "anchors: rebuilt from model.rpn"),
    (re.compile(r"\.num_batches_tracked$"), "BatchNorm step counter (frozen BN has none)")]
CAFFE2_IGNORE = [(re.compile(r"^fc1000_[wb]$"), "ImageNet classifier, unused by detection"),
                 (re.compile(r"_momentum$"), "SGD momentum blob")]


class ConversionError(CheckpointError):
    """A foreign checkpoint does not convert cleanly; the message names every offending key."""


class WeightsInputError(CheckpointError, ValueError):
    """Weights trained on one input convention meet a config that feeds the backbone another; the message
    names the config keys to change."""


def weights_format(state: dict) -> str:
    """'detectron2', 'caffe2' (MSRA names), 'gains', 'torchvision' (a bare torchvision ResNet: `conv1.weight`,
    `layer1.*`) or 'unknown', judged from the key names."""
    if any(k.startswith((D2_RESNET, "stem.conv1.", "module.backbone.bottom_up.")) for k in state):
        return "detectron2"
    if "conv1_w" in state or any(re.match(r"res\d_\d+_branch", k) for k in state):
        return "caffe2"
    if any(k.startswith("backbone.body.") for k in state):
        return "gains"
    names = {k[len("module."):] if k.startswith("module.") else k for k in state}
    return "torchvision" if "conv1.weight" in names and any(k.startswith("layer1.") for k in names) else "unknown"


# ----------------------------------------------------------------------------------------------- input conventions
INPUT_KEYS = ("model.input_format", "model.pixel_mean", "model.pixel_std", "model.backbone.stride_in_1x1")


@dataclass(frozen=True)
class InputConvention:
    """The input a backbone's weights were trained on, as our config values.

    `kind` names the file's kind in messages; `input_format` 'BGR' | 'RGB'; `pixel_mean` / `pixel_std` three
    floats in 0-255 units, in input_format's channel order; `stride_in_1x1` where the first bottleneck of
    res3..res5 strides. None anywhere means no requirement (basic-block ResNets have no stride choice; an old
    config may lack a key)."""

    kind: str
    input_format: str | None
    pixel_mean: tuple[float, ...] | None
    pixel_std: tuple[float, ...] | None
    stride_in_1x1: bool | None

    def settings(self) -> dict:
        """{dotted config key of INPUT_KEYS: value or None}."""
        values = (self.input_format, None if self.pixel_mean is None else list(self.pixel_mean),
                  None if self.pixel_std is None else list(self.pixel_std), self.stride_in_1x1)
        return dict(zip(INPUT_KEYS, values))

    def describe(self) -> str:
        """'BGR, pixel mean [...], std [...], stride in the 1x1 conv' (the parts it requires)."""
        parts = [self.input_format] if self.input_format else []
        parts += [f"pixel {name} {list(v)}" for name, v in (("mean", self.pixel_mean), ("std", self.pixel_std))
                  if v is not None]
        if self.stride_in_1x1 is not None:
            parts.append(f"stride in the {'1x1' if self.stride_in_1x1 else '3x3'} conv")
        return ", ".join(parts)

    @classmethod
    def from_config(cls, model_cfg: dict, kind: str) -> "InputConvention":
        """The convention a gains model was trained with, from the `model` section of its resolved config."""
        backbone = model_cfg.get("backbone") if isinstance(model_cfg.get("backbone"), dict) else {}
        bottleneck = RESNET_BLOCKS.get(backbone.get("depth"), (True,))[0]

        def three(key):
            value = model_cfg.get(key)
            return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) and len(value) == 3 else None
        stride = backbone.get("stride_in_1x1")
        return cls(kind, model_cfg.get("input_format") if model_cfg.get("input_format") in ("BGR", "RGB") else None,
                   three("pixel_mean"), three("pixel_std"),
                   bool(stride) if bottleneck and isinstance(stride, bool) else None)


MSRA_INPUT = InputConvention("MSRA ImageNet weights (detectron2's R-50.pkl / R-101.pkl)", "BGR", tuple(MSRA_PIXEL_MEAN),
                             tuple(MSRA_PIXEL_STD), True)
TORCHVISION_INPUT = InputConvention("a torchvision ResNet state dict", "RGB", tuple(TORCHVISION_PIXEL_MEAN),
                                    tuple(TORCHVISION_PIXEL_STD), False)


def input_convention(state: dict, meta: dict | None = None) -> InputConvention | None:
    """The convention of a weights file from its names (`weights_format`) and top-level entries (`meta`, e.g.
    detectron2's `__author__`); None for gains checkpoints (their config says it: InputConvention.from_config)
    and unknown names."""
    fmt = weights_format(state)
    if fmt == "torchvision":
        return TORCHVISION_INPUT
    if fmt == "caffe2":
        return MSRA_INPUT
    if fmt != "detectron2":
        return None
    if (meta or {}).get("__author__") == "torchvision":  # detectron2's convert-torchvision-to-d2.py output
        return replace(TORCHVISION_INPUT, kind="torchvision ResNet weights converted for detectron2")
    state = normalise_names(state)
    mean, std = state.get("pixel_mean"), state.get("pixel_std")
    if torch.is_tensor(mean) and torch.is_tensor(std) and mean.numel() == std.numel() == 3:
        # a whole detectron2 model saved its input normalisation: that is what its backbone saw
        return replace(MSRA_INPUT, kind="a detectron2 checkpoint", pixel_mean=tuple(mean.flatten().tolist()),
                       pixel_std=tuple(std.flatten().tolist()))
    return MSRA_INPUT


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):  # configs round means and stds
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(abs(float(x) - float(y)) < 1e-3 for x, y in zip(a, b)))
    return a == b


def _override(key: str, value) -> str:
    """`key=value` as typed on the command line (YAML: lists without spaces, booleans lower-case)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"


def _fits(convention: InputConvention, current: dict) -> bool:
    return all(v is None or current.get(k) is None or _same(current[k], v) for k, v in convention.settings().items())


def check_input_convention(convention: InputConvention, current: dict, where: str) -> None:
    """Raise WeightsInputError (one line) when `current` ({key of INPUT_KEYS: value}, None = no requirement)
    feeds the backbone other input than `convention` was trained on; the message names `where` (the file and
    the config key that named it), the file's kind, every `key=value` to set, and the kind of weights the
    config's own settings would fit."""
    fixes = [_override(k, v) for k, v in convention.settings().items()
             if v is not None and current.get(k) is not None and not _same(current[k], v)]
    if not fixes:
        return
    other = next((c for c in (MSRA_INPUT, TORCHVISION_INPUT) if c.kind != convention.kind and _fits(c, current)), None)
    alternative = f", or use {other.kind}, which the config's settings fit" if other is not None else ""
    raise WeightsInputError(f"{where} holds {convention.kind}, trained on {convention.describe()}, but the config "
                            f"feeds the backbone other input: set {' '.join(fixes)}{alternative}")


# ----------------------------------------------------------------------------------------------- the map
def _resnet_modules(depth: int) -> list[tuple[str, str, str]]:
    """(detectron2 conv module, our conv, our norm) for every conv of the ResNet trunk."""
    bottleneck, layers = RESNET_BLOCKS[depth]
    out = [(f"{D2_RESNET}stem.conv1", "backbone.body.conv1", "backbone.body.bn1")]
    for s, n in enumerate(layers):
        for i in range(n):
            a, b = f"{D2_RESNET}res{s + 2}.{i}.", f"backbone.body.layer{s + 1}.{i}."
            out += [(f"{a}conv{j}", f"{b}conv{j}", f"{b}bn{j}") for j in range(1, 4 if bottleneck else 3)]
            if i == 0 and (bottleneck or s > 0):  # detectron2 has a shortcut conv iff the channels change
                out.append((f"{a}shortcut", f"{b}downsample.0", f"{b}downsample.1"))
    return out


def _wb(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.weight": f"{dst}.weight", f"{src}.bias": f"{dst}.bias"}


def _head(src: str, conv: str, dst: str) -> dict[str, str]:
    pairs = [(f"{conv}{n}", f"convs.{2 * n - 2}") for n in range(1, 5)] + [("deconv",) * 2, ("predictor",) * 2]
    return {k: v for a, b in pairs for k, v in _wb(src + a, dst + b).items()}


def detectron2_key_map(depth: int, mask_head: str = "double", anomaly: bool = True,
                       guidance: int | None = 2) -> dict[str, str]:
    """detectron2 name -> our name for a model of this structure (`mask_head`: 'double' = the authors'
    double_branch_mask_head, 'plain' = detectron2's mask_head; `guidance`: index of the live guidance layer)."""
    m: dict[str, str] = {}
    for d2, conv, norm in _resnet_modules(depth):
        m[f"{d2}.weight"] = f"{conv}.weight"
        m.update({f"{d2}.norm.{p}": f"{norm}.{p}" for p in NORM_PARAMS})
    for level in range(2, 6):
        m.update(_wb(f"backbone.fpn_lateral{level}", f"backbone.fpn.inner_blocks.{level - 2}.0"))
        m.update(_wb(f"backbone.fpn_output{level}", f"backbone.fpn.layer_blocks.{level - 2}.0"))
    for d2, ours in (("conv", "conv"), ("objectness_logits", "objectness"), ("anchor_deltas", "deltas")):
        m.update(_wb(f"proposal_generator.rpn_head.{d2}", f"rpn.head.{ours}"))
    for d2 in ("box_head.fc1", "box_head.fc2", "box_predictor.cls_score", "box_predictor.bbox_pred"):
        m.update(_wb(f"roi_heads.{d2}", "roi_heads.box_head." + d2.split(".")[1]))
    double = mask_head == "double"
    m.update(_head(DOUBLE_MASK if double else PLAIN_MASK, "abn_fcn" if double else "mask_fcn", "roi_heads.mask_head."))
    if anomaly:
        m.update(_head(ANOMALY, "abn_fcn", "roi_heads.alrm.branch."))
        m.update(_wb(f"roi_heads.branch_guidance_conv_anomaly_layer{guidance}", "roi_heads.alrm.guidance"))
    return m


def normalise_names(state: dict) -> dict:
    """Drop DDP `module.` prefixes; backbone-only detectron2 files (`stem.*`, `res2.*`, e.g. torchvision
    weights converted for detectron2) get the `backbone.bottom_up.` prefix of a full model."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not any(k.startswith(D2_RESNET) for k in state):
        state = {(D2_RESNET + k if re.match(r"(stem|res[2-5])\.", k) else k): v for k, v in state.items()}
    return state


def inspect_detectron2(state: dict) -> dict:
    """Structure of a detectron2 state dict: `depth`, `mask_head` ('double'/'plain'/None), `anomaly`,
    `guidance` (live layer index or None), `dead_guidance`, `num_anchors`, and `config`: the config values
    the tensors determine (dotted key -> value)."""
    state = normalise_names(state)
    keys = list(state)
    counts = tuple(len({k.split(".")[3] for k in keys if k.startswith(f"{D2_RESNET}res{s}.")}) for s in range(2, 6))
    bottleneck = any(re.match(r"backbone\.bottom_up\.res\d\.\d+\.conv3\.", k) for k in keys)
    depth = next((d for d, (is_bottleneck, layers) in RESNET_BLOCKS.items()
                  if tuple(layers) == counts and is_bottleneck == bottleneck), None)
    if depth is None:
        raise ConversionError(f"the ResNet trunk has {counts} blocks in res2..res5 (bottleneck={bottleneck}), "
                              f"which is none of the depths {sorted(RESNET_BLOCKS)}")
    mask_head = "double" if any(k.startswith(DOUBLE_MASK) for k in keys) else \
        "plain" if any(k.startswith(PLAIN_MASK) for k in keys) else None
    anomaly = any(k.startswith(ANOMALY) for k in keys)
    layers = sorted({int(GUIDANCE.match(k).group(1)) for k in keys if GUIDANCE.match(k)})

    def dim(name, d=0):
        return int(state[name].shape[d]) if torch.is_tensor(state.get(name)) and state[name].dim() > d else None
    k1, fpn = dim("roi_heads.box_predictor.cls_score.weight"), dim("backbone.fpn_output2.weight")
    fc_in = dim("roi_heads.box_head.fc1.weight", 1)
    res = math.isqrt(fc_in // fpn) if fc_in and fpn else None
    values = {"model.backbone.depth": depth, "model.mode": "gains" if anomaly else "mask_rcnn",
              "model.num_classes": k1 - 1 if k1 else None, "model.backbone.fpn_channels": fpn,
              "model.roi_heads.fc_dim": dim("roi_heads.box_head.fc1.weight"),
              "model.roi_heads.mask_conv_dim": dim(f"{DOUBLE_MASK}abn_fcn1.weight" if mask_head == "double"
                                                   else f"{PLAIN_MASK}mask_fcn1.weight"),
              "model.roi_heads.box_pooler_resolution": res if res and res * res * fpn == fc_in else None}
    return {"depth": depth, "mask_head": mask_head, "anomaly": anomaly, "guidance": layers[-1] if layers else None,
            "dead_guidance": layers[:-1], "num_anchors": dim("proposal_generator.rpn_head.objectness_logits.weight"),
            "config": {k: v for k, v in values.items() if v is not None}}


# ----------------------------------------------------------------------------------------------- converting
@dataclass
class ConversionReport:
    """Every key's fate: mapped (source, ours), ignored (source, reason), unknown, missing (source, ours),
    shape_mismatched, filled (ours: BN defaults by rule), not_covered (model keys nothing maps to)."""

    source_format: str
    mapped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    shape_mismatched: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    not_covered: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:  # what makes a strict conversion fail
        named = [("unknown keys", self.unknown), ("missing keys", [f"{a} (-> {b})" for a, b in self.missing]),
                 ("shape mismatches", self.shape_mismatched), ("model keys nothing maps to", self.not_covered)]
        return [f"{what} ({len(keys)}): {list_names(keys)}" for what, keys in named if keys]

    def describe(self) -> str:
        lines = [f"{len(self.mapped)} tensors mapped from {self.source_format} names"]
        for reason in dict.fromkeys(r for _, r in self.ignored):
            names = [k for k, r in self.ignored if r == reason]
            lines.append(f"ignored ({reason}), {len(names)}: {list_names(names)}")
        if self.filled:
            lines.append(f"BN statistics absent from the file, set to mean 0 / var 1 ({len(self.filled)}): "
                         f"{list_names(self.filled)}")
        return "\n".join(lines + self.problems)


def _ignore_reason(name: str, value, rules) -> str | None:
    if not torch.is_tensor(value):
        return f"not a tensor ({type(value).__name__})"
    return next((reason for rx, reason in rules if rx.search(name)), None)


def _rename_all(state: dict, rules, rename, fmt: str) -> tuple[dict, ConversionReport]:
    """Rename every key (`rename` -> our name, or None = unknown) unless a rule ignores it; then give norm
    layers without running statistics (MSRA weights, FrozenBN v1 checkpoints) mean 0 / var 1."""
    report, out = ConversionReport(fmt), {}
    for name, value in state.items():
        reason = _ignore_reason(name, value, rules)
        ours = rename(name) if reason is None else None
        if reason is not None:
            report.ignored.append((name, reason))
        elif ours is None:
            report.unknown.append(name)
        else:
            out[ours] = value.detach().clone()
            report.mapped.append((name, ours))
    for key in [k[:-len("weight")] for k, v in out.items() if k.endswith(".weight") and v.dim() == 1]:
        for stat, fill in (("running_mean", torch.zeros_like), ("running_var", torch.ones_like)):
            if key + stat not in out:  # only norm layers have 1-d weights
                out[key + stat] = fill(out[key + "weight"])
                report.filled.append(key + stat)
    return out, report


def convert_detectron2_state_dict(d2_state: dict, *, num_classes: int | None = None, mode: str | None = None,
                                  reference: dict | None = None, strict: bool = True
                                  ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """detectron2 GeneralizedRCNN state dict (the authors' GAInS or plain Mask R-CNN) -> our state dict.

    `num_classes` / `mode`, when given, must agree with the tensors (K = cls_score rows - 1; an anomaly head
    means mode gains/branch_only), else ConversionError names the config key to set. `reference` (our model's
    state_dict) adds a shape check of every tensor, a dtype cast and a completeness check. With `strict`, any
    unknown, missing or mis-shaped key raises ConversionError naming them all; otherwise they are in the
    report and the dict holds what converted. cls_score rows go from background-last to background-first.
    """
    state = normalise_names(d2_state)
    info = inspect_detectron2(state)
    implied = info["config"]
    if num_classes is not None and implied.get("model.num_classes", num_classes) != num_classes:
        raise ConversionError(f"the checkpoint has {implied['model.num_classes']} classes (cls_score rows - 1) but "
                              f"the config says {num_classes}: set model.num_classes={implied['model.num_classes']}")
    if mode is not None and (mode in ("gains", "branch_only")) != info["anomaly"]:
        raise ConversionError(f"the checkpoint {'has an' if info['anomaly'] else 'has no'} anomaly branch but the "
                              f"config says model.mode={mode}: set model.mode={implied['model.mode']}")
    kmap = detectron2_key_map(info["depth"], info["mask_head"] or "double", info["anomaly"], info["guidance"])
    rules = IGNORE_RULES + [(re.compile(rf"^roi_heads\.branch_guidance_conv_anomaly_layer{i}\."),
                             f"dead guidance layer; the live one is layer{info['guidance']} (gains/METHOD.md §8)")
                            for i in info["dead_guidance"]]
    out, report = _rename_all(state, rules, kmap.get, "detectron2")
    for key in ("roi_heads.box_head.cls_score.weight", "roi_heads.box_head.cls_score.bias"):
        if key in out:  # background: detectron2's last row, our first
            out[key] = torch.cat([out[key][-1:], out[key][:-1]])
    report.missing = [(d2, ours) for d2, ours in kmap.items() if ours not in out]
    if reference is not None:
        for k, v in list(out.items()):
            ref = reference.get(k)
            if ref is None or tuple(v.shape) != tuple(ref.shape):
                theirs = f"model {tuple(ref.shape)}" if ref is not None else "not in the model"
                report.shape_mismatched.append(f"{next((a for a, b in report.mapped if b == k), k)}: "
                                               f"file {tuple(v.shape)} vs {theirs}")
                del out[k]
            else:
                out[k] = v.to(ref.dtype)
        covered = set(out) | {b for _, b in report.missing} | {b for _, b in report.mapped}
        report.not_covered = [k for k in reference if k not in covered and not k.endswith("num_batches_tracked")]
    if strict and report.problems:
        raise ConversionError("the detectron2 checkpoint does not convert cleanly:\n" + "\n".join(report.problems))
    return out, report


_CAFFE2_BRANCH = {"2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3"),
                  "1": ("downsample.0", "downsample.1")}
_CAFFE2_BN = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}


def caffe2_resnet_name(name: str) -> str | None:
    """MSRA caffe2 blob name -> torchvision ResNet name (no prefix), or None when it is not a trunk blob."""
    if name == "conv1_w":
        return "conv1.weight"
    m = re.fullmatch(r"res_conv1_bn_(s|b|rm|riv)", name)
    if m:
        return f"bn1.{_CAFFE2_BN[m.group(1)]}"
    m = re.fullmatch(r"res([2-5])_(\d+)_branch(1|2[abc])_(w|bn_s|bn_b|bn_rm|bn_riv)", name)
    if not m:
        return None
    stage, block, branch, what = m.groups()
    conv, norm = _CAFFE2_BRANCH[branch]
    prefix = f"layer{int(stage) - 1}.{int(block)}."
    return prefix + (f"{conv}.weight" if what == "w" else f"{norm}.{_CAFFE2_BN[what[3:]]}")


def resnet_state_from_foreign(state: dict) -> tuple[dict, ConversionReport]:
    """MSRA caffe2 or detectron2 weights -> torchvision ResNet trunk state dict (names of
    `gains.backbone.build_resnet`), BN statistics filled (mean 0, var 1) where the file has none. For
    detectron2 files everything outside `backbone.bottom_up` is ignored by name."""
    fmt = weights_format(state)
    if fmt == "caffe2":
        return _rename_all(state, CAFFE2_IGNORE, caffe2_resnet_name, fmt)
    if fmt != "detectron2":
        raise ConversionError(f"neither MSRA caffe2 nor detectron2 names (first keys: {list_names(list(state)[:5])})")
    state = normalise_names(state)
    kmap = {d2: ours[len("backbone.body."):] for d2, ours in
            detectron2_key_map(inspect_detectron2(state)["depth"], anomaly=False).items()
            if ours.startswith("backbone.body.")}
    rules = IGNORE_RULES + [(re.compile(rf"^(?!{re.escape(D2_RESNET)})"), "not part of the ResNet trunk")]
    return _rename_all(state, rules, kmap.get, fmt)
