"""The mask head and its targets and loss: a conv + upsample head (shared by the mask branch and, in alrm.py,
the anomaly branch), the GA-aware mask BCE (gains/METHOD.md §6-§7), and the per-RoI crops of each ground truth's
mask / GA map that serve as targets and pixel weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .roi_align import aligned_roi_align
from .sparse_maps import SparseMaps

MASK_TIE = 0.5 - 1e-4  # mask target threshold: 0.5, ties (0.5 up to float rounding) count as inside


class ConvUpsampleHead(nn.Module):
    """`num_convs` x [conv3x3 + ReLU] -> features F; ReLU(deconv 2x2 s2) -> conv1x1 to K channels.

    `forward(x [R, C_in, S, S])` -> (F [R, conv_dim, S, S], logits [R, K, 2S, 2S]). Used for the mask branch
    and, in alrm.py, for the anomaly branch (same shape). Inits as detectron2's MaskRCNNConvUpsampleHead.
    """

    def __init__(self, in_channels: int, conv_dim: int, num_classes: int, num_convs: int = 4):
        super().__init__()
        convs = []
        for i in range(num_convs):
            convs += [nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, padding=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs)
        self.deconv = nn.ConvTranspose2d(conv_dim, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m is not self.predictor:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0.0)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.convs(x)
        return f, self.predictor(F.relu(self.deconv(f)))


def mask_loss(logits: Tensor, labels: Tensor, targets: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
    """GA-aware mask loss of gains/METHOD.md §6-§7 (without the mode's scalar weight):
    mean over R x M x M of `pixel_weights * BCEWithLogits(logits[r, labels[r]-1], targets)`; not normalised by
    the sum of the weights. `pixel_weights=None` is the plain Mask R-CNN BCE.

    logits [R, K, M, M]; labels [R] int64 in 1..K; targets [R, M, M] float in {0, 1};
    pixel_weights [R, M, M] float (the GA crops) or None. R == 0 gives `logits.sum() * 0`.
    """
    if len(logits) == 0:
        return logits.sum() * 0
    picked = logits[torch.arange(len(logits), device=logits.device), labels - 1]
    return F.binary_cross_entropy_with_logits(picked, targets, weight=pixel_weights, reduction="mean")


def crop_per_gt(maps: Tensor, boxes: Tensor, gt_index: Tensor, size: int) -> Tensor:
    """Crop each RoI's own ground-truth map without copying maps per RoI.

    maps [G, H, W] (any dtype, cast to float once per GT) or SparseMaps (per-GT patches, same numbers);
    boxes [R, 4] in the maps' pixels; gt_index [R] int64 index of each RoI's matched GT. Returns
    roi_align(aligned=True, sampling_ratio=0) crops [R, size, size] float: each box gets its GT as batch
    index into the [G, 1, H, W] view.
    """
    if len(boxes) == 0:
        return boxes.new_zeros((0, size, size))
    if isinstance(maps, SparseMaps):
        return maps.roi_crops(boxes, gt_index, size)
    rois = torch.cat([gt_index[:, None].to(boxes.dtype), boxes], dim=1)
    return aligned_roi_align(maps[:, None].to(boxes.dtype), rois, (size, size), 1.0, 0)[:, 0]


class TargetCrops:
    """crop_per_gt of each image's target maps at its foreground RoIs, concatenated on the RoIs' device.

    SparseMaps kept on the CPU (the model leaves them there) while the RoIs are on a GPU are cropped on the
    CPU, from one host copy of all RoIs made on first need (one device sync per batch; cropping per ground
    truth on the GPU reads each GT's RoI extent back, two syncs per instance, and moving the patches there
    costs a copy per instance), and their crops go to the device in one copy. Maps on the RoIs' device
    (dense targets, or everything on the CPU) are cropped there, as before.
    """

    def __init__(self, boxes: list[Tensor], gt_index: list[Tensor], size: int):
        self.boxes, self.gt_index, self.size = boxes, gt_index, size
        self.device = boxes[0].device
        self._host = None

    def _host_rois(self, i: int) -> tuple[Tensor, Tensor]:
        if self._host is None:
            rows = torch.cat([torch.cat([b, g[:, None].to(b.dtype)], 1) for b, g in zip(self.boxes, self.gt_index)])
            rows = rows.cpu().split([len(b) for b in self.boxes])  # GT indices < 2**24: exact in float32
            self._host = [(r[:, :4], r[:, 4].to(torch.int64)) for r in rows]
        return self._host[i]

    def __call__(self, maps: list, post=None) -> Tensor:
        parts = []
        for i, (m, b, g) in enumerate(zip(maps, self.boxes, self.gt_index)):
            if isinstance(m, SparseMaps) and m.device != self.device:
                b, g = self._host_rois(i)
            c = crop_per_gt(m, b, g, self.size)
            parts.append(post(c) if post is not None else c)
        if all(c.device == self.device for c in parts):
            return torch.cat(parts)
        out = torch.cat([c.cpu() for c in parts])
        if self.device.type == "cuda":
            out = out.pin_memory()  # page-locked: the copy below does not wait for the GPU
        return out.to(self.device, non_blocking=True)

