"""Joint geometric transforms of an image, its instance masks and their GA maps.

One random draw decides the size and the flip for all three, so a GA map stays registered with its mask
(gains/METHOD.md §4). All three use one geometry, pixel centres at (i + 0.5) * scale:
- images: 8-bit ones (every value k/255) with PIL's bilinear resize, exactly detectron2's ResizeTransform
  for uint8 images, so a converted checkpoint sees the authors' pixels; 16-bit and float images with
  `F.interpolate(bilinear, align_corners=False, antialias=True)` (PIL's filter, in float);
- GA maps bilinearly (align_corners=False — nearest would turn the smooth anomaly ramps into steps);
- masks like GA maps, then inside where the bilinear value is >= 0.5 (ties inside): the resized mask is
  exactly the binarised resized shape, registered with the image at any scale. (Nearest neighbour,
  floor(r * s), shifts masks by up to half a source pixel: +0.47 px at 512 -> 800; detectron2 avoids it by
  transforming polygons continuously.)
Masks and GA maps are dense tensors [N,H,W] or `SparseMaps` (patches, gains/sparse_maps.py); both go through
the same geometry with the same numbers.

Boxes follow detectron2's DatasetMapper for the authors' config (polygon masks, no crop): the annotation's
box (COCO xywh -> xyxy) goes through the same geometry as a shape of its own (`SampleTransform.apply_boxes`:
the transformed corners' extent, clipped to [0, W] x [0, H]; detectron2's transform_instance_annotations),
not recomputed from the resized mask; `nonempty_instances` is its filter_empty_instances. One random draw
(`TrainTransform.draw` -> SampleTransform) is applied to the image, masks, GA maps and boxes alike.

Beyond the paper's resize + horizontal flip (the paper configs use nothing else), training can take a random
crop (`RandomCrop`, before the resize, in original pixels) and the microscopy augmentations vertical flip,
90-degree turns and intensity scaling (`TrainTransform`, each off unless its probability is set). A new
augmentation draws random numbers only when it is on, so the paper configs' random stream is unchanged.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .sparse_maps import SparseMaps


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Shortest edge -> `min_size`, unless the longest edge would exceed `max_size` (detectron2's
    ResizeShortestEdge): returns (new_height, new_width) rounded as int(x + 0.5)."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """uint8/bool [N,H,W] (or SparseMaps) -> float32 [N,4] xyxy with exclusive right/bottom (a 1-pixel mask
    at (y, x) gives (x, y, x+1, y+1)). Empty masks give (0, 0, 0, 0)."""
    if isinstance(masks, SparseMaps):
        return masks.tight_boxes()
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


def xywh_to_xyxy(boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    """COCO boxes [[x, y, w, h], ...] (pixel-edge coordinates) -> float32 [N,4] xyxy (x, y, x + w, y + h)."""
    b = torch.tensor([[float(v) for v in box] for box in boxes], dtype=torch.float64).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1).to(torch.float32)


def nonempty_instances(boxes: torch.Tensor, masks, threshold: float = 1e-5) -> torch.Tensor:
    """bool [N]: instances to keep after the transforms, as detectron2's filter_empty_instances: box width and
    height > `threshold` and a mask with at least one pixel (a tiny instance can vanish in a downscale)."""
    wh = boxes[:, 2:] - boxes[:, :2]
    return (wh > threshold).all(1) & (mask_areas(masks) > 0)


MASK_LEVEL = 0.5 - 1e-4  # resized mask: inside at >= 0.5; the margin makes exact ties (float noise) inside


def is_8bit(image: torch.Tensor) -> bool:
    """True when every value of a float image in [0,1] is k/255 (an 8-bit source: k/255*255 is exactly k
    in float32 for every k, so the test is exact)."""
    scaled = image * 255.0
    return bool(torch.equal(scaled, scaled.round()))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float32 [C,H,W] in [0,1] -> [C,h,w]: PIL's bilinear resize for 8-bit images (module docstring),
    antialiased bilinear interpolation in float otherwise."""
    h, w = int(size[0]), int(size[1])
    if tuple(image.shape[-2:]) == (h, w):
        return image
    if image.device.type == "cpu" and is_8bit(image):
        pixels = (image * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
        pil = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        out = np.asarray(pil.resize((w, h), Image.BILINEAR))
        out = torch.from_numpy(out.reshape(h, w, -1).copy()).permute(2, 0, 1)
        return out.to(torch.float32) / 255.0
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


def resize(image: torch.Tensor, masks, ga, size: tuple[int, int]):
    """Resize image float [3,H,W], masks uint8 [N,H,W] and optional GA maps float [N,H,W] to `size` (h, w).
    Masks and GA maps may be SparseMaps (same numbers on their patches)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, masks, ga
    image = resize_image(image, size)
    if isinstance(masks, SparseMaps):
        masks = masks.to(torch.float32).resized(size, "bilinear").binarized(MASK_LEVEL)
    elif masks.shape[0]:
        masks = (F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)[0]
                 >= MASK_LEVEL).to(torch.uint8)
    else:
        masks = masks.new_zeros((0, *size))
    if isinstance(ga, SparseMaps):
        ga = ga.resized(size, "bilinear")
    elif ga is not None:
        ga = (F.interpolate(ga[None].float(), size=size, mode="bilinear", align_corners=False)[0]
              if ga.shape[0] else ga.new_zeros((0, *size)))
    return image, masks, ga


def _apply(fn_dense, fn_sparse, *maps):
    return tuple(None if m is None else fn_sparse(m) if isinstance(m, SparseMaps) else fn_dense(m) for m in maps)


def hflip(image: torch.Tensor, masks, ga):
    """Mirror left-right; all tensors have width as their last dimension."""
    return (image.flip(-1),) + _apply(lambda t: t.flip(-1), SparseMaps.hflip, masks, ga)


def vflip(image: torch.Tensor, masks, ga):
    """Mirror top-bottom."""
    return (image.flip(-2),) + _apply(lambda t: t.flip(-2), SparseMaps.vflip, masks, ga)


def rot90(image: torch.Tensor, masks, ga, k: int):
    """Turn by k x 90 degrees counter-clockwise (`torch.rot90(x, k, (-2, -1))`), as transpose + flips."""
    for _ in range(k % 4):  # rot90 once = transpose, then flip rows
        image = image.transpose(-2, -1)
        masks, ga = _apply(lambda t: t.transpose(-2, -1), SparseMaps.transpose, masks, ga)
        image, masks, ga = vflip(image, masks, ga)
    return image, masks, ga


def crop(image: torch.Tensor, masks, ga, top: int, left: int, height: int, width: int):
    """The window rows [top, top+height) x cols [left, left+width) of all three (inside the image)."""
    window = (slice(top, top + height), slice(left, left + width))
    return (image[(...,) + window],) + _apply(lambda t: t[(...,) + window],
                                             lambda m: m.crop(top, left, height, width), masks, ga)


def mask_areas(masks) -> torch.Tensor:
    """int64 [N] pixel counts of dense uint8 [N,H,W] masks or SparseMaps."""
    if isinstance(masks, SparseMaps):
        return masks.areas()
    return masks.flatten(1).ne(0).sum(1) if masks.shape[0] else torch.zeros(0, dtype=torch.int64)


def select(masks, ga, keep: torch.Tensor):
    """Instances `keep` (int64 indices) of masks and GA maps, dense or sparse."""
    return _apply(lambda t: t[keep], lambda m: m.select(keep), masks, ga)


class RandomCrop:
    """A random `size` (h, w) window of the ORIGINAL image (before the resize), for large fields of view.

    Instances cut by the window keep their visible part; parts smaller than `min_area` pixels (and
    instances left with no pixel) are dropped, and `__call__` says how many. GA maps are the full image's,
    cropped with it (GAMM ran on the whole image). An image smaller than the window on a side is not
    cropped on that side.

    `__call__(image, masks, ga=None, boxes=None)` -> (image, masks, ga, boxes, keep int64 [M] indices of the
    kept instances, dropped int = cut fragments dropped for their size). `boxes` float [N,4] xyxy in the
    image's pixels (or None) come back in the window's: an instance the window does not cut keeps its
    annotation box (shifted, clipped to the window); a cut one gets the box of its visible pixels. (The
    crop is this project's extension. detectron2's DatasetMapper, when it crops, recomputes every box from
    the masks, recompute_boxes = MODEL.MASK_ON; uncut instances here keep the box the authors' uncropped
    pipeline gives them.)
    """

    def __init__(self, size, min_area: int = 0):
        size = size if isinstance(size, (list, tuple)) else (size, size)
        self.size = (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"data.crop_size must be positive, got {size}")
        self.min_area = int(min_area)

    def __call__(self, image, masks, ga=None, boxes=None):
        h, w = image.shape[-2:]
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        before = mask_areas(masks)
        image, masks, ga = crop(image, masks, ga, top, left, ch, cw)
        after = mask_areas(masks)
        cut = after < before
        if boxes is not None:
            shifted = boxes.to(torch.float32) - torch.tensor([left, top, left, top], dtype=torch.float32)
            shifted = torch.minimum(shifted.clamp(min=0), torch.tensor([cw, ch, cw, ch], dtype=torch.float32))
            # a cut instance's clipped annotation box can be far larger than what is left of it (an L cut
            # across its corner): its box is that of its visible pixels
            boxes = torch.where(cut[:, None], masks_to_boxes(masks), shifted)
        keep_mask = (after > 0) & ~(cut & (after < self.min_area))
        dropped = int((cut & (after > 0) & ~keep_mask).sum())
        keep = torch.nonzero(keep_mask)[:, 0]
        if len(keep) < len(after):
            masks, ga = select(masks, ga, keep)
            boxes = boxes[keep] if boxes is not None else None
        return image, masks, ga, boxes, keep, dropped


@dataclass(frozen=True)
class SampleTransform:
    """What one sample gets (one draw of TrainTransform, or EvalTransform's resize), applied alike to its
    image, masks, GA maps and boxes: resize from `src_size` (h, w) to `size`, then a horizontal flip, a
    vertical flip, `rot90` counter-clockwise quarter turns, and last (image only) the `intensity` factor
    (None = off)."""

    src_size: tuple[int, int]
    size: tuple[int, int]
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0
    intensity: float | None = None

    def apply(self, image, masks, ga=None):
        """image float [3,H,W], masks uint8 [N,H,W] / SparseMaps, GA maps float [N,H,W] / SparseMaps / None."""
        image, masks, ga = resize(image, masks, ga, self.size)
        if self.hflip:
            image, masks, ga = hflip(image, masks, ga)
        if self.vflip:
            image, masks, ga = vflip(image, masks, ga)
        if self.rot90:
            image, masks, ga = rot90(image, masks, ga, self.rot90)
        if self.intensity is not None:
            image = (image * self.intensity).clamp(0.0, 1.0)
        return image, masks, ga

    def apply_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """float [N,4] xyxy in pixel-edge coordinates of the input (the image spans [0, W] x [0, H]) -> float32
        [N,4] in the output's: the corners mapped as the image's pixels are (scaled by the resize, mirrored by
        the flips, turned by rot90), then clipped to the output image, as detectron2's apply_box + clip."""
        (h, w), (nh, nw) = self.src_size, self.size
        b = boxes.to(torch.float64).reshape(-1, 4) * torch.tensor([nw / w, nh / h, nw / w, nh / h],
                                                                   dtype=torch.float64)
        x0, y0, x1, y1 = b.unbind(1)
        height, width = nh, nw
        if self.hflip:
            x0, x1 = width - x1, width - x0
        if self.vflip:
            y0, y1 = height - y1, height - y0
        for _ in range(self.rot90 % 4):  # as rot90() turns the image: transpose, then flip the rows
            x0, y0, x1, y1, height, width = y0, x0, y1, x1, width, height
            y0, y1 = height - y1, height - y0
        out = torch.stack([x0, y0, x1, y1], 1).clamp(min=0)
        return torch.minimum(out, torch.tensor([width, height, width, height], dtype=torch.float64)).to(torch.float32)


class TrainTransform:
    """Random shortest-edge resize (one of `min_sizes`, capped at `max_size`) + horizontal flip, then the
    optional microscopy augmentations: vertical flip, a random number of 90-degree turns (with probability
    `rot90_prob`; turns swap height and width after the resize), and an intensity scale drawn uniformly
    from `intensity_scale` (lo, hi) applied to the image only and clipped to [0, 1].

    Randomness comes from Python's `random` module, which the data loader seeds per sample, so a run is
    reproducible; an augmentation that is off draws nothing.
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int, hflip_prob: float = 0.5, vflip_prob: float = 0.0,
                 rot90_prob: float = 0.0, intensity_scale: Sequence[float] | None = None):
        self.min_sizes = [int(s) for s in (min_sizes if isinstance(min_sizes, (list, tuple)) else [min_sizes])]
        self.max_size = int(max_size)
        self.hflip_prob = float(hflip_prob)
        self.vflip_prob, self.rot90_prob = float(vflip_prob), float(rot90_prob)
        if intensity_scale is not None:
            lo, hi = (float(v) for v in intensity_scale)
            if not 0 < lo <= hi:
                raise ValueError(f"data.intensity_scale must be [lo, hi] with 0 < lo <= hi, got {intensity_scale}")
            intensity_scale = (lo, hi)
        self.intensity_scale = intensity_scale

    def draw(self, height: int, width: int) -> SampleTransform:
        """The transform of one sample of size (height, width): the random numbers are drawn here, in the
        order the paper configs' stream has always had (size, hflip, then only what is on)."""
        size = resized_shape(height, width, random.choice(self.min_sizes), self.max_size)
        flip = random.random() < self.hflip_prob
        vflip = self.vflip_prob > 0 and random.random() < self.vflip_prob
        turns = random.randint(1, 3) if self.rot90_prob > 0 and random.random() < self.rot90_prob else 0
        intensity = random.uniform(*self.intensity_scale) if self.intensity_scale is not None else None
        return SampleTransform((int(height), int(width)), size, flip, vflip, turns, intensity)

    def __call__(self, image, masks, ga=None):
        return self.draw(*image.shape[-2:]).apply(image, masks, ga)


class EvalTransform:
    """Deterministic shortest-edge resize to `min_size` (capped at `max_size`)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = int(min_size if not isinstance(min_size, (list, tuple)) else min_size[-1])
        self.max_size = int(max_size)

    def draw(self, height: int, width: int) -> SampleTransform:
        """The (fixed) resize of an image of size (height, width)."""
        return SampleTransform((int(height), int(width)), resized_shape(height, width, self.min_size, self.max_size))

    def __call__(self, image, masks, ga=None):
        return self.draw(*image.shape[-2:]).apply(image, masks, ga)
