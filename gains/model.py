"""GAInS = normalise/pad + ResNet-FPN backbone + RPN + RoI heads (+ ALRM); `build_model(cfg)`.

Modes (`model.mode`, the four ablations of gains/METHOD.md §6-§7):
| mode          | GA-weighted BCE | anomaly branch | default mask loss weight | needs `ga` |
|---------------|-----------------|----------------|--------------------------|------------|
| mask_rcnn     | no              | no             | 1.0                      | no         |
| reweight_only | yes             | no             | 1.0                      | yes        |
| branch_only   | no              | yes            | 0.75                     | yes        |
| gains         | yes             | yes            | 0.75                     | yes        |
Modes without the branch do not create its parameters. The mask loss weight is model.roi_heads.mask_loss_weight
(null = the default of the table).
"""
from __future__ import annotations


import torch
from torch import Tensor, nn

from gains.alrm import ALRM
from gains.backbone import ResNetFPN
from gains.errors import ConfigError
from gains.roi_heads import RoIHeads
from gains.rpn import RPN
from gains.sparse_maps import SparseMaps
from gains.weight_names import check_input_convention

MODES = {  # mode -> (GA-weighted mask BCE, anomaly branch)
    "mask_rcnn": (False, False),
    "reweight_only": (True, False),
    "branch_only": (False, True),
    "gains": (True, True),
}


class GAInS(nn.Module):
    """Mask R-CNN with the GAInS anomaly branch.

    `model(images, targets)` in training returns a dict of scalar losses `loss_rpn_cls`, `loss_rpn_loc`,
    `loss_cls`, `loss_box_reg`, `loss_mask` (+ `loss_ga` in branch_only/gains). In eval, `model(images)`
    returns per image `boxes` float [N,4] xyxy in the input image's pixels, `labels` int64 [N] in 1..K,
    `scores` float [N] (sorted, N <= detections_per_image) and `masks` float [N,1,28,28]: sigmoid
    probabilities of the predicted class inside its box, not pasted (see gains.predictor.paste_masks).

    images: list of float32 [3,H,W] RGB in [0,1] (already resized; sizes may differ). targets: list of dicts
    with `boxes` float32 [N,4] xyxy pixels, `labels` int64 [N] in 1..K, `masks` uint8 [N,H,W], `ga` float32
    [N,H,W] (reweight_only, branch_only, gains) and `image_id`. Inputs are never modified.

    Targets may stay on the CPU when the model is on a GPU (`takes_host_targets`; the engine leaves them
    there): they are validated on the host, where reading them costs no device sync, and copied to the
    device non-blocking; SparseMaps stay on the CPU, where their RoI crops are computed (roi_heads).
    """

    takes_host_targets = True

    def __init__(self, backbone: ResNetFPN, rpn: RPN, roi_heads: RoIHeads, pixel_mean, pixel_std,
                 input_format: str = "BGR", size_divisibility: int = 32, needs_ga: bool = False):
        super().__init__()
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"input_format must be BGR or RGB, got {input_format!r}")
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)
        self.bgr = input_format == "BGR"
        self.size_divisibility = size_divisibility
        self.needs_ga = needs_ga

    def input_settings(self) -> dict:
        """The input this model feeds its backbone, as config values: {model.input_format, model.pixel_mean,
        model.pixel_std, model.backbone.stride_in_1x1 (None for basic-block ResNets, which have no choice)}.
        Compared with what loaded weights were trained on (gains.weight_names.check_input_convention)."""
        first = self.backbone.body.layer2[0]
        bottleneck = hasattr(first, "conv3")
        return {"model.input_format": "BGR" if self.bgr else "RGB",
                "model.pixel_mean": self.pixel_mean.flatten().tolist(),
                "model.pixel_std": self.pixel_std.flatten().tolist(),
                "model.backbone.stride_in_1x1": first.conv1.stride != (1, 1) if bottleneck else None}

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """RGB [0,1] images -> one zero-padded batch [B,3,H',W'] (multiples of size_divisibility) in the
        backbone's channel order and normalisation, plus the unpadded (H, W) of each image."""
        if not images:
            raise ValueError("model got an empty list of images")
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i}: expected a [3,H,W] tensor, got shape {tuple(img.shape)}")
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        d = self.size_divisibility
        hp = -(-max(h for h, _ in sizes) // d) * d
        wp = -(-max(w for _, w in sizes) // d) * d
        device = self.pixel_mean.device
        batch = torch.zeros((len(images), 3, hp, wp), dtype=torch.float32, device=device)
        scale = 255.0 / self.pixel_std  # images are in [0,1]; mean/std are in 0-255 units
        for b, img in zip(batch, images):
            img = img.to(device=device, dtype=torch.float32)
            if self.bgr:
                img = img.flip(0)
            b[:, :img.shape[1], :img.shape[2]] = img * scale - self.pixel_mean / self.pixel_std
        return batch, sizes

    def _check_targets(self, targets: list[dict], sizes: list[tuple[int, int]]) -> list[dict]:
        """Validate at the boundary; return new dicts on the model's device (the caller's stay untouched)."""
        if targets is None or len(targets) != len(sizes):
            raise ValueError("training needs one target dict per image")
        device = self.pixel_mean.device
        keys = ("boxes", "labels", "masks") + (("ga",) if self.needs_ga else ())
        out = []
        for t, (h, w) in zip(targets, sizes):
            name = f"image_id {t.get('image_id', '?')}"
            for k in keys:
                if k not in t:
                    hint = (" (this mode uses GA maps: compute them with preprocess.py / gamm, or train with "
                            "model.mode=mask_rcnn)") if k == "ga" else ""
                    raise KeyError(f"{name}: target has no {k!r}{hint}")
            n = len(t["boxes"])
            if tuple(t["boxes"].shape) != (n, 4) or tuple(t["labels"].shape) != (n,):
                raise ValueError(f"{name}: boxes {tuple(t['boxes'].shape)} and labels {tuple(t['labels'].shape)} "
                                 "must be [N,4] and [N]")
            if n and (int(t["labels"].min()) < 1 or int(t["labels"].max()) > self.roi_heads.num_classes):
                raise ValueError(f"{name}: labels must lie in 1..{self.roi_heads.num_classes} (0 is background), "
                                 f"got {sorted(set(t['labels'].tolist()))}; check model.num_classes")
            for k in keys[2:]:
                if tuple(t[k].shape) != (n, h, w):
                    raise ValueError(f"{name}: target {k!r} has shape {tuple(t[k].shape)}, expected {(n, h, w)} "
                                     "(one map per box at the image's size)")
            # SparseMaps stay where they are (their patches are cropped there); tensors go to the device
            new = {k: t[k] if isinstance(t[k], SparseMaps) else t[k].to(device, non_blocking=True) for k in keys}
            new["boxes"] = new["boxes"].to(torch.float32)
            if "ga" in new:
                new["ga"] = new["ga"].to(torch.float32)
            out.append(new)
        return out

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        batch, sizes = self.preprocess(images)
        if self.training:
            targets = self._check_targets(targets, sizes)
        features = self.backbone(batch)
        gt_boxes = [t["boxes"] for t in targets] if self.training else None
        proposals, losses = self.rpn(features, sizes, gt_boxes)
        if self.training:
            losses.update(self.roi_heads(features, proposals, sizes, targets))
            return losses
        return self.roi_heads(features, proposals, sizes)


def check_backbone_init(cfg) -> None:
    """Before training a config-built model: ConfigError (one line, both fixes) for frozen BN on a randomly
    initialised ResNet, i.e. model.backbone.norm=frozen_bn without model.backbone.weights or init_weights,
    unless model.backbone.allow_frozen_bn_from_scratch (tests and timing runs use it on purpose). Evaluation
    is not concerned: a checkpoint supplies every weight."""
    b = cfg.model.backbone
    if b.norm == "frozen_bn" and not b.weights and not cfg.init_weights and not b.allow_frozen_bn_from_scratch:
        # frozen BN of a random ResNet is an identity: nothing normalises the activations, which grow
        # layer after layer, and training from scratch diverges or stalls
        weights = (f"weights/R-{b.depth}.pkl, detectron2's MSRA file" if b.depth in (50, 101)
                   else f"PATH, a torchvision resnet{b.depth} state dict with its input keys")  # MSRA has no R-18/34
        raise ConfigError("model.backbone.norm=frozen_bn with model.backbone.weights=null trains a randomly "
                          f"initialised ResNet under frozen BN, which is unstable: give ImageNet weights "
                          f"(model.backbone.weights={weights}) or train from scratch with model.backbone.norm=gn "
                          "model.backbone.freeze_at=0 (model.backbone.allow_frozen_bn_from_scratch=true runs it "
                          "anyway)")


def build_model(cfg) -> GAInS:
    """The one place that reads `cfg.model`: turns it into keyword arguments of the constructors.

    With model.backbone.weights, the file's input convention must match model.input_format / pixel_mean /
    pixel_std / backbone.stride_in_1x1, else WeightsInputError names the keys to set."""
    m = cfg.model
    if m.mode not in MODES:
        raise ValueError(f"model.mode must be one of {list(MODES)}, got {m.mode!r}")
    use_ga_weights, use_branch = MODES[m.mode]
    b, r, h, a = m.backbone, m.rpn, m.roi_heads, m.alrm
    backbone = ResNetFPN(depth=b.depth, norm=b.norm, freeze_at=b.freeze_at, stride_in_1x1=b.stride_in_1x1,
                         weights=b.weights, out_channels=b.fpn_channels)
    rpn = RPN(b.fpn_channels, anchor_sizes=r.anchor_sizes, aspect_ratios=r.aspect_ratios,
              strides=backbone.strides, iou_thresholds=r.iou_thresholds,
              batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction,
              nms_thresh=r.nms_thresh, pre_nms_topk_train=r.pre_nms_topk_train,
              pre_nms_topk_test=r.pre_nms_topk_test, post_nms_topk_train=r.post_nms_topk_train,
              post_nms_topk_test=r.post_nms_topk_test, min_box_size=r.min_box_size)
    alrm = (ALRM(b.fpn_channels, h.mask_conv_dim, m.num_classes, guidance_init=str(a.guidance_init))
            if use_branch else None)
    mask_loss_weight = h.mask_loss_weight if h.mask_loss_weight is not None else (0.75 if use_branch else 1.0)
    roi_heads = RoIHeads(b.fpn_channels, m.num_classes, batch_size_per_image=h.batch_size_per_image,
                         positive_fraction=h.positive_fraction, iou_threshold=h.iou_threshold,
                         box_weights=h.box_weights, box_pooler_resolution=h.box_pooler_resolution,
                         mask_pooler_resolution=h.mask_pooler_resolution, fc_dim=h.fc_dim,
                         mask_conv_dim=h.mask_conv_dim, score_thresh_test=h.score_thresh_test,
                         nms_thresh_test=h.nms_thresh_test, detections_per_image=h.detections_per_image,
                         use_ga_weights=use_ga_weights, mask_loss_weight=mask_loss_weight, alrm=alrm,
                         ga_loss_weight=a.ga_loss_weight)
    model = GAInS(backbone, rpn, roi_heads, m.pixel_mean, m.pixel_std, m.input_format,
                  needs_ga=use_ga_weights or use_branch)
    if backbone.weights_input is not None:
        check_input_convention(backbone.weights_input, model.input_settings(), f"{b.weights} (model.backbone.weights)")
    return model
