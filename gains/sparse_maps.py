"""Per-instance image maps (masks, GA maps) kept as patches: memory O(sum of instance areas), not N x H x W.

A training image of 1024 x 1024 px with 800 nuclei carries 800 masks and 800 GA maps: 0.8 GB of uint8 and
3.4 GB of float32 when dense, although each map differs from a constant (0 for a mask, exactly 1 for a GA
map: GAMM's support, gains/gamm.py) only on a small box. `SparseMaps` stores map i as `patches[i]` on
`boxes[i]` and `fill` elsewhere, and moves through the training transforms (resize, flips, 90-degree turns,
crops) and the RoI heads' target crops computing what the dense path computes, on the patches only:

- `resized` samples exactly like `F.interpolate` of the dense stack (same source indices and weights:
  `nearest` for masks, `bilinear` with align_corners=False for GA maps), so results match the dense path
  (masks bitwise, GA maps to float rounding);
- `roi_crops` equals `roi_align(aligned=True, sampling_ratio=0)` of the dense map (what
  `mask_head.crop_per_gt` does) by aligning each ground truth's RoIs on a canvas that covers them plus a
  margin, so the bilinear samples see the same pixels; equal up to float rounding of the sample positions.

Conventions: pixel (row y, col x); boxes int64 (x0, y0, x1, y1), exclusive right/bottom, inside the image.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align


def linear_taps(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """1-D source taps of `F.interpolate(mode="bilinear", align_corners=False)` from n_in to n_out samples:
    (i0, i1) int64 [n_out] and weights (w0, w1) float32 [n_out], output[r] = w0 * x[i0] + w1 * x[i1].

    PyTorch's rule (aten UpSample.h, no scale factor given): scale = n_in / n_out in float32, source
    s = max(scale * (r + 0.5) - 0.5, 0), i0 = floor(s), i1 = min(i0 + 1, n_in - 1), w1 = s - i0.
    """
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    s = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = s.to(torch.int64)
    w1 = s - i0.to(torch.float32)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, 1.0 - w1, w1


def nearest_taps(n_in: int, n_out: int) -> Tensor:
    """int64 [n_out] source index of `F.interpolate(mode="nearest")`: floor(r * n_in / n_out) in float32
    arithmetic (aten nearest_idx), exact copies when n_out == n_in and r // 2 when n_out == 2 n_in."""
    r = torch.arange(n_out, dtype=torch.int64)
    if n_out == n_in:
        return r
    if n_out == 2 * n_in:
        return r // 2
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    return (r.to(torch.float32) * scale).floor().to(torch.int64).clamp(max=n_in - 1)


def _weights_1d(taps, lo: int, hi: int, mode: str) -> tuple[int, int, Tensor] | None:
    """Output range [a, b) whose taps reach source [lo, hi), and its weight matrix float32 [b - a, hi - lo]
    (source entries outside [lo, hi) are left out: they hold the fill value). None when nothing reaches."""
    if mode == "nearest":
        hit = (taps >= lo) & (taps < hi)
    else:
        i0, i1 = taps[0], taps[1]
        hit = ((i0 >= lo) & (i0 < hi)) | ((i1 >= lo) & (i1 < hi))
    where = torch.nonzero(hit)[:, 0]
    if where.numel() == 0:
        return None
    a, b = int(where[0]), int(where[-1]) + 1
    rows = torch.arange(b - a)
    weights = torch.zeros((b - a, hi - lo + 2), dtype=torch.float32)  # columns 0 and -1 absorb outside taps
    if mode == "nearest":
        weights[rows, (taps[a:b] - lo + 1).clamp(0, hi - lo + 1)] = 1.0
    else:
        for idx, w in ((taps[0], taps[2]), (taps[1], taps[3])):
            weights[rows, (idx[a:b] - lo + 1).clamp(0, hi - lo + 1)] += w[a:b]
    return a, b, weights[:, 1:-1]


class SparseMaps:
    """N maps of an image of `size` (H, W): map i is `patches[i]` on `boxes[i]` and `fill` elsewhere.

    boxes int64 [N, 4]; patches: N tensors [y1 - y0, x1 - x0] of one dtype (uint8 masks or float32 GA
    maps); fill: the value off the patches (0 for masks, 1.0 for GA maps). `shape` is (N, H, W), like the
    dense stack it stands for, and `dense()` builds that stack (tests, small images).
    """

    def __init__(self, boxes, patches: list[Tensor], size: tuple[int, int], fill: float = 0.0,
                 dtype: torch.dtype | None = None):
        self.boxes = torch.as_tensor(boxes, dtype=torch.int64).reshape(-1, 4)
        self.patches = list(patches)
        self.size = (int(size[0]), int(size[1]))
        self.fill = float(fill)
        self.dtype = dtype if dtype is not None else (self.patches[0].dtype if self.patches else torch.float32)
        if len(self.patches) != len(self.boxes):
            raise ValueError(f"{len(self.patches)} patches for {len(self.boxes)} boxes")

    def __reduce__(self):
        """Pickle (a DataLoader worker sending a batch) all patches as one flat tensor: each tensor crosses
        the process boundary as its own shared-memory segment and file descriptor, which costs more than
        the batch takes to make when an image has hundreds of instances. Unpickled patches are views of
        that one tensor (disjoint, so writing one does not touch another)."""
        shapes = [tuple(p.shape) for p in self.patches]
        flat = (torch.cat([p.reshape(-1) for p in self.patches]) if self.patches
                else torch.zeros(0, dtype=self.dtype))
        return _sparse_maps_from_flat, (self.boxes, flat, shapes, self.size, self.fill, self.dtype)

    # ----------------------------------------------------------------------------------- basics
    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.patches), *self.size)

    def __len__(self) -> int:
        return len(self.patches)

    @property
    def device(self) -> torch.device:
        return self.patches[0].device if self.patches else torch.device("cpu")

    def _new(self, boxes, patches, size=None) -> "SparseMaps":
        return SparseMaps(boxes, patches, self.size if size is None else size, self.fill, self.dtype)

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "SparseMaps":
        """A copy with patches on `device` / cast to `dtype` (boxes stay on the CPU: they index patches);
        `to(torch.float32)` casts, like a tensor's `.to`."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        patches = [p.to(device=device, dtype=dtype, non_blocking=non_blocking) for p in self.patches]
        return SparseMaps(self.boxes, patches, self.size, self.fill, dtype or self.dtype)

    def select(self, index) -> "SparseMaps":
        """Maps at `index` (int64 indices or bool mask over N), in that order."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = torch.nonzero(index)[:, 0]
        index = index.to(torch.int64).reshape(-1)
        return self._new(self.boxes[index], [self.patches[i] for i in index.tolist()])

    def dense(self) -> Tensor:
        """[N, H, W] of the patches' dtype: the dense stack these maps stand for."""
        out = torch.full(self.shape, self.fill, dtype=self.dtype, device=self.device)
        for i, (p, (x0, y0, x1, y1)) in enumerate(zip(self.patches, self.boxes.tolist())):
            out[i, y0:y1, x0:x1] = p
        return out

    @classmethod
    def from_dense(cls, maps: Tensor, fill: float = 0.0) -> "SparseMaps":
        """[N, H, W] -> patches on the tight box of the values != fill (lossless)."""
        boxes, patches = torch.zeros((len(maps), 4), dtype=torch.int64), []
        for i, m in enumerate(maps):
            off = m != fill
            rows, cols = torch.nonzero(off.any(1))[:, 0], torch.nonzero(off.any(0))[:, 0]
            if rows.numel() == 0:
                patches.append(m[:0, :0].clone())
                continue
            y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            boxes[i] = torch.tensor([x0, y0, x1, y1])
            patches.append(m[y0:y1, x0:x1].clone())
        return cls(boxes, patches, maps.shape[-2:], fill, maps.dtype)

    def tight_boxes(self) -> Tensor:
        """float32 [N, 4] xyxy box of each map's values != fill (exclusive right/bottom; (0,0,0,0) when
        none): for masks, `transforms.masks_to_boxes` of the dense stack."""
        out = torch.zeros((len(self), 4), dtype=torch.float32)
        for i, (p, (x0, y0, _, _)) in enumerate(zip(self.patches, self.boxes.tolist())):
            off = p != self.fill
            rows, cols = torch.nonzero(off.any(1))[:, 0], torch.nonzero(off.any(0))[:, 0]
            if rows.numel():
                out[i] = torch.tensor([x0 + int(cols[0]), y0 + int(rows[0]),
                                       x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1], dtype=torch.float32)
        return out

    def binarized(self, level: float) -> "SparseMaps":
        """uint8 0/1 maps: 1 where the value is >= level (fill 0; requires fill < level)."""
        if self.fill >= level:
            raise ValueError("binarized() needs fill < level: the outside would turn into 1")
        return SparseMaps(self.boxes, [(p >= level).to(torch.uint8) for p in self.patches], self.size, 0.0,
                          torch.uint8)

    def areas(self) -> Tensor:
        """int64 [N] count of pixels != fill (for masks: the mask area)."""
        return torch.tensor([int((p != self.fill).sum()) for p in self.patches], dtype=torch.int64)

    # ------------------------------------------------------------------------------- geometry
    def hflip(self) -> "SparseMaps":
        w = self.size[1]
        b = self.boxes
        boxes = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        return self._new(boxes, [p.flip(-1) for p in self.patches])

    def vflip(self) -> "SparseMaps":
        h = self.size[0]
        b = self.boxes
        boxes = torch.stack([b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]], dim=1)
        return self._new(boxes, [p.flip(-2) for p in self.patches])

    def transpose(self) -> "SparseMaps":
        """Swap rows and columns (map.transpose(-2, -1)); with a flip this makes the 90-degree turns."""
        boxes = self.boxes[:, [1, 0, 3, 2]]
        return self._new(boxes, [p.transpose(-2, -1) for p in self.patches], (self.size[1], self.size[0]))

    def crop(self, top: int, left: int, height: int, width: int) -> "SparseMaps":
        """The window rows [top, top+height) x cols [left, left+width) (inside the image) as a new image."""
        out_boxes, patches = torch.zeros_like(self.boxes), []
        for i, (p, (x0, y0, x1, y1)) in enumerate(zip(self.patches, self.boxes.tolist())):
            cx0, cy0 = max(x0, left), max(y0, top)
            cx1, cy1 = min(x1, left + width), min(y1, top + height)
            if cx1 <= cx0 or cy1 <= cy0:
                patches.append(p[:0, :0])
                continue
            patches.append(p[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0])
            out_boxes[i] = torch.tensor([cx0 - left, cy0 - top, cx1 - left, cy1 - top])
        return self._new(out_boxes, patches, (height, width))

    def resized(self, size: tuple[int, int], mode: str) -> "SparseMaps":
        """What `F.interpolate(dense[None], size, mode=mode, align_corners=False (bilinear))[0]` gives,
        computed on the patches: mode "nearest" (masks, bitwise) or "bilinear" (GA maps, float rounding)."""
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"mode must be nearest or bilinear, got {mode!r}")
        (h0, w0), (h1, w1) = self.size, (int(size[0]), int(size[1]))
        if (h0, w0) == (h1, w1):
            return self
        taps = ((nearest_taps(h0, h1), nearest_taps(w0, w1)) if mode == "nearest"
                else (linear_taps(h0, h1), linear_taps(w0, w1)))
        boxes, patches = torch.zeros_like(self.boxes), []
        for i, (p, (x0, y0, x1, y1)) in enumerate(zip(self.patches, self.boxes.tolist())):
            ry = _weights_1d(taps[0], y0, y1, mode) if y1 > y0 else None
            rx = _weights_1d(taps[1], x0, x1, mode) if x1 > x0 else None
            if ry is None or rx is None:
                patches.append(p[:0, :0])
                continue
            (a, b, wy), (c, d, wx) = ry, rx
            values = p.to(torch.float32) - self.fill  # the fill part of every tap is added back below
            out = wy.to(p.device) @ values @ wx.to(p.device).T + self.fill
            if mode == "nearest" or not p.dtype.is_floating_point:
                out = out.round()
            patches.append(out.to(p.dtype))
            boxes[i] = torch.tensor([c, a, d, b])
        return self._new(boxes, patches, (h1, w1))

    # ------------------------------------------------------------------------------- RoI crops
    def roi_crops(self, rois: Tensor, gt_index: Tensor, out_size: int) -> Tensor:
        """float [R, S, S] = roi_align(dense[gt_index[r]], rois[r], S, aligned=True, sampling_ratio=0).

        rois float [R, 4] xyxy in this image's pixels; gt_index int64 [R]. Each ground truth's RoIs are
        aligned on a canvas = the union of its RoIs grown by 2 px (clipped to the image), filled with `fill`
        and its patch: every bilinear sample of those RoIs lies inside it, and where the canvas stops at the
        image border roi_align's own border rule applies exactly as on the dense map.
        """
        out = rois.new_empty((len(rois), out_size, out_size))
        if len(rois) == 0:
            return out
        h, w = self.size
        gt_cpu = gt_index.cpu()
        for g in torch.unique(gt_cpu).tolist():
            sel = torch.nonzero(gt_cpu == g)[:, 0].to(rois.device)
            r = rois[sel]
            lo, hi = r[:, :2].amin(0).tolist(), r[:, 2:].amax(0).tolist()
            cx0, cy0 = max(0, math.floor(lo[0]) - 2), max(0, math.floor(lo[1]) - 2)
            cx1, cy1 = min(w, math.ceil(hi[0]) + 2), min(h, math.ceil(hi[1]) + 2)
            cx1, cy1 = max(cx1, cx0 + 1), max(cy1, cy0 + 1)
            canvas = torch.full((cy1 - cy0, cx1 - cx0), self.fill, dtype=rois.dtype, device=rois.device)
            x0, y0, x1, y1 = self.boxes[g].tolist()
            ix0, iy0, ix1, iy1 = max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)
            if ix1 > ix0 and iy1 > iy0:
                canvas[iy0 - cy0:iy1 - cy0, ix0 - cx0:ix1 - cx0] = \
                    self.patches[g][iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0].to(canvas)
            shift = torch.tensor([cx0, cy0, cx0, cy0], dtype=rois.dtype, device=rois.device)
            local = torch.cat([torch.zeros((len(r), 1), dtype=rois.dtype, device=rois.device), r - shift], 1)
            out[sel] = roi_align(canvas[None, None], local, (out_size, out_size), 1.0, 0, aligned=True)[:, 0]
        return out


def _sparse_maps_from_flat(boxes: Tensor, flat: Tensor, shapes: list[tuple[int, int]], size: tuple[int, int],
                           fill: float, dtype: torch.dtype) -> SparseMaps:
    """Inverse of SparseMaps.__reduce__: patches as views of `flat` (1-D, the patches' elements in order)."""
    parts = flat.split([h * w for h, w in shapes]) if shapes else []
    return SparseMaps(boxes, [part.view(shape) for part, shape in zip(parts, shapes)], size, fill, dtype)


def sparse_masks_from_crops(crop_masks, dtype=torch.uint8) -> SparseMaps:
    """gains.instances.CropMasks (numpy bool crops) -> SparseMaps of uint8 masks (fill 0)."""
    patches = [torch.from_numpy(np.ascontiguousarray(c)).to(dtype) for c in crop_masks.crops]
    return SparseMaps(torch.from_numpy(crop_masks.boxes), patches, crop_masks.image_size, 0.0, dtype)
