"""Inference on raw images of any size: normalise, resize like detectron2, run, paste masks at full size.

`paste_masks` uses aligned coordinates, the convention of the training targets (roi_align aligned=True):
pixel (row i, col j) has its centre at (j + 0.5, i + 0.5) and mask cell c of an M-cell box [x0, x1] covers
[x0 + c * w / M, x0 + (c + 1) * w / M]. torchvision's paste_masks_in_image rounds boxes to integers and adds
a pixel (the old unaligned convention), so it is not used.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gains.transforms import resized_shape  # the data layer's resize rule, so train and test agree

__all__ = ["Predictor", "paste_masks", "resized_shape", "to_model_image"]


def _interp_matrix(lo: float, hi: float, start: int, stop: int, m: int, device, dtype) -> Tensor:
    """Bilinear weights [stop - start, m] sampling an m-cell 1-D mask spread over [lo, hi] at the pixel
    centres start + 0.5 ... stop - 0.5, with zero padding outside (grid_sample, align_corners=False)."""
    centres = torch.arange(start, stop, device=device, dtype=dtype) + 0.5
    u = (centres - lo) / max(hi - lo, 1e-6) * m - 0.5
    i0 = torch.floor(u)
    frac = u - i0
    i0 = i0.to(torch.int64)
    weights = torch.zeros((stop - start, m + 2), device=device, dtype=dtype)  # cells -1 and m absorb padding
    rows = torch.arange(stop - start, device=device)
    weights[rows, (i0 + 1).clamp(0, m + 1)] += 1 - frac
    weights[rows, (i0 + 2).clamp(0, m + 1)] += frac
    return weights[:, 1:m + 1]


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Paste per-box mask probabilities into the image and threshold them.

    masks float [N,1,M,M] (or [N,M,M]) probabilities; boxes float [N,4] xyxy in the image's pixels;
    image_size (H, W). Returns bool [N,H,W], `True` where the bilinearly resampled probability >= threshold.
    Equal to a full-image `grid_sample(align_corners=False)` of each mask over its box, computed only on the
    box's neighbourhood as two small matrix products (bilinear sampling on an axis-aligned grid is separable).
    """
    if masks.dim() == 4:
        masks = masks[:, 0]
    h, w = int(image_size[0]), int(image_size[1])
    out = torch.zeros((len(masks), h, w), dtype=torch.bool, device=masks.device)
    if len(masks) == 0:
        return out
    m = masks.shape[-1]
    work = masks.float()
    for i, (x0, y0, x1, y1) in enumerate(boxes.detach().double().cpu().tolist()):
        # A mask cell reaches half a cell beyond the box edge (zero padding fades it); one pixel more for safety.
        mx, my = math.ceil(0.5 * (x1 - x0) / m) + 1, math.ceil(0.5 * (y1 - y0) / m) + 1
        c0, c1 = max(int(math.floor(x0)) - mx, 0), min(int(math.ceil(x1)) + mx, w)
        r0, r1 = max(int(math.floor(y0)) - my, 0), min(int(math.ceil(y1)) + my, h)
        if c1 <= c0 or r1 <= r0:
            continue
        wy = _interp_matrix(y0, y1, r0, r1, m, work.device, work.dtype)
        wx = _interp_matrix(x0, x1, c0, c1, m, work.device, work.dtype)
        out[i, r0:r1, c0:c1] = (wy @ work[i] @ wx.T) >= threshold
    return out


def to_model_image(image, normalize: str = "dtype") -> Tensor:
    """numpy/tensor image -> float32 [3,H,W] in [0,1] RGB.

    Accepts H x W (grey), H x W x C (C = 1, 3, 4) of uint8 / uint16 / float / bool, or a tensor [3,H,W] /
    [1,H,W] / [H,W] / [H,W,C]. Integers are divided by their dtype's maximum (16-bit / 65535) with
    normalize="dtype", the training data's convention; "percentile" stretches the 1st-99.8th percentile,
    better for dim 16-bit fluorescence. Must match what the model was trained with (gains.imageio).
    """
    from gains.imageio import to_float_rgb

    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return to_float_rgb(array, normalize)


class Predictor:
    """`Predictor(model, min_size_test, max_size_test, device)(images)` -> one dict per image with
    `boxes` float [N,4] xyxy, `labels` int64 [N] in 1..K, `scores` float [N] and `masks` bool [N,H0,W0], all at
    the ORIGINAL image size (H0, W0) and on the CPU.

    images: a list of numpy arrays or tensors of any size (see `to_model_image`), or one of them. Each is
    resized like the evaluation data (gains.transforms: shortest edge to `min_size_test`, longest capped at
    `max_size_test`, bilinear with antialiasing like PIL's resize in detectron2), run through the model in
    eval mode, and the boxes scaled back.
    """

    def __init__(self, model: torch.nn.Module, min_size_test: int = 800, max_size_test: int = 1333,
                 device: str | torch.device | None = None, normalize: str = "dtype", mask_threshold: float = 0.5):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.min_size, self.max_size = min_size_test, max_size_test
        self.normalize, self.mask_threshold = normalize, mask_threshold

    @torch.no_grad()
    def __call__(self, images) -> list[dict[str, Tensor]]:
        if isinstance(images, (np.ndarray, Tensor)) and images.ndim <= 3:
            images = [images]  # one image; a 4-D array/tensor is iterated as a batch
        results = []
        for image in images:
            x = to_model_image(image, self.normalize).to(self.device)
            h0, w0 = x.shape[-2:]
            nh, nw = resized_shape(h0, w0, self.min_size, self.max_size)
            if (nh, nw) != (h0, w0):
                x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
            det = self.model([x])[0]
            scale = torch.tensor([w0 / nw, h0 / nh, w0 / nw, h0 / nh], device=det["boxes"].device)
            boxes = det["boxes"] * scale
            boxes = torch.stack([boxes[:, 0].clamp(0, w0), boxes[:, 1].clamp(0, h0),
                                 boxes[:, 2].clamp(0, w0), boxes[:, 3].clamp(0, h0)], dim=1)
            masks = paste_masks(det["masks"], boxes, (h0, w0), self.mask_threshold)
            results.append({"boxes": boxes.cpu(), "labels": det["labels"].cpu(), "scores": det["scores"].cpu(),
                            "masks": masks.cpu()})
        return results
