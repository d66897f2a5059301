"""Joint geometric transforms of an image, its instance masks and their GA maps.

One random draw decides the size and the flip for all three, so a GA map stays registered with its mask
(GAINS_METHOD.md §3): images and GA maps are resized bilinearly (align_corners=False — nearest would turn the
smooth anomaly ramps into steps), masks with nearest neighbour, and boxes are recomputed from the resized
masks.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Shortest edge -> `min_size`, unless the longest edge would exceed `max_size` (detectron2's
    ResizeShortestEdge): returns (new_height, new_width) rounded as int(x + 0.5)."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """uint8/bool [N,H,W] -> float32 [N,4] xyxy with exclusive right/bottom (a 1-pixel mask at (y, x) gives
    (x, y, x+1, y+1)). Empty masks give (0, 0, 0, 0)."""
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    masks = masks.bool()
    rows = masks.any(dim=2)  # [N,H]
    cols = masks.any(dim=1)  # [N,W]
    h, w = masks.shape[1:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~rows.any(dim=1)
    boxes[empty] = 0.0
    return boxes


def resize(image: torch.Tensor, masks: torch.Tensor, ga: torch.Tensor | None, size: tuple[int, int]):
    """Resize image float [3,H,W], masks uint8 [N,H,W] and optional GA maps float [N,H,W] to `size` (h, w)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, masks, ga
    # antialias: like PIL's bilinear resize that detectron2 uses; matters only when shrinking
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if masks.shape[0]:
        masks = F.interpolate(masks[None].float(), size=size, mode="nearest")[0].to(torch.uint8)
    else:
        masks = masks.new_zeros((0, *size))
    if ga is not None:
        ga = (F.interpolate(ga[None].float(), size=size, mode="bilinear", align_corners=False)[0]
              if ga.shape[0] else ga.new_zeros((0, *size)))
    return image, masks, ga


def hflip(image: torch.Tensor, masks: torch.Tensor, ga: torch.Tensor | None):
    """Mirror left-right; all tensors have width as their last dimension."""
    return image.flip(-1), masks.flip(-1), (ga.flip(-1) if ga is not None else None)


class TrainTransform:
    """Random shortest-edge resize (one of `min_sizes`, capped at `max_size`) + horizontal flip.

    Randomness comes from Python's `random` module, which the data loader seeds per worker and rank, so a
    run is reproducible.
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int, hflip_prob: float = 0.5):
        self.min_sizes = [int(s) for s in (min_sizes if isinstance(min_sizes, (list, tuple)) else [min_sizes])]
        self.max_size = int(max_size)
        self.hflip_prob = float(hflip_prob)

    def __call__(self, image, masks, ga=None):
        size = resized_shape(*image.shape[-2:], random.choice(self.min_sizes), self.max_size)
        image, masks, ga = resize(image, masks, ga, size)
        if random.random() < self.hflip_prob:
            image, masks, ga = hflip(image, masks, ga)
        return image, masks, ga


class EvalTransform:
    """Deterministic shortest-edge resize to `min_size` (capped at `max_size`)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = int(min_size if not isinstance(min_size, (list, tuple)) else min_size[-1])
        self.max_size = int(max_size)

    def __call__(self, image, masks, ga=None):
        size = resized_shape(*image.shape[-2:], self.min_size, self.max_size)
        return resize(image, masks, ga, size)
