"""Binary instance masks stored as bounding-box crops: memory O(sum of instance areas), not N x H x W.

A field of view of 4096 x 4096 px with 2,000 nuclei is 32 GB as dense bool masks but a few MB as crops.
`CropMasks` is the one sparse mask container of the project: predictions (tiled or whole-image), the
masks GAMM rasterises, and the exports (label images, ImageJ ROIs, COCO RLE) all speak it.

Conventions: pixel (row y, col x); a box is int64 (x0, y0, x1, y1) with exclusive x1/y1, inside the image;
crop i is bool [y1 - y0, x1 - x0] and holds mask i on its box; outside its box mask i is False. An empty mask
has the box (0, 0, 0, 0) and a [0, 0] crop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from .annotations import segmentation_to_rle
from .mask_runs import runs_from_rles


@dataclass
class CropMasks:
    """N binary masks of an image of `image_size` (H, W), each kept as its box crop.

    boxes: int64 [N, 4] (x0, y0, x1, y1), exclusive right/bottom, 0 <= x0 <= x1 <= W (same for y).
    crops: N bool arrays, crop i of shape [y1 - y0, x1 - x0]. Boxes need not be tight.
    """

    boxes: np.ndarray
    crops: list
    image_size: tuple[int, int]
    _areas: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.int64).reshape(-1, 4)
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        if len(self.crops) != len(self.boxes):
            raise ValueError(f"{len(self.crops)} crops for {len(self.boxes)} boxes")
        h, w = self.image_size
        for i, (crop, (x0, y0, x1, y1)) in enumerate(zip(self.crops, self.boxes.tolist())):
            if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
                raise ValueError(f"mask {i}: box {(x0, y0, x1, y1)} is outside the {h}x{w} image")
            if np.shape(crop) != (y1 - y0, x1 - x0):
                raise ValueError(f"mask {i}: crop of shape {np.shape(crop)} does not fit its box "
                                 f"{(x0, y0, x1, y1)} ({y1 - y0}x{x1 - x0})")

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> "CropMasks":
        return cls(np.zeros((0, 4), np.int64), [], image_size)

    @classmethod
    def from_crops(cls, boxes, crops, image_size, tighten: bool = True) -> "CropMasks":
        """Masks from (box, crop) pairs, crops cast to bool; `tighten` shrinks each box to its pixels."""
        masks = cls(boxes, [np.asarray(c, dtype=bool) for c in crops], image_size)
        return masks.tight() if tighten else masks

    @classmethod
    def from_dense(cls, masks) -> "CropMasks":
        """bool/0-1 array or tensor [N, H, W] -> tight crops."""
        masks = np.asarray(masks.cpu() if hasattr(masks, "cpu") else masks).astype(bool, copy=False)
        n, h, w = masks.shape
        boxes, crops = np.zeros((n, 4), np.int64), []
        for i, m in enumerate(masks):
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            if rows.size == 0:
                crops.append(np.zeros((0, 0), bool))
                continue
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            boxes[i] = (x0, y0, x1, y1)
            crops.append(m[y0:y1, x0:x1].copy())
        return cls(boxes, crops, (h, w))

    @classmethod
    def from_rles(cls, rles: list[dict], height: int, width: int) -> "CropMasks":
        """COCO RLEs (compressed or uncompressed counts) -> tight crops, decoded from the runs inside each
        mask's box only (never a full-size array)."""

        runs = runs_from_rles(list(rles), height, width)
        boxes, crops = np.zeros((len(runs), 4), np.int64), []
        for i in range(len(runs)):
            start, end = runs.starts[runs.ptr[i]:runs.ptr[i + 1]], runs.ends[runs.ptr[i]:runs.ptr[i + 1]]
            if start.size == 0:
                crops.append(np.zeros((0, 0), bool))
                continue
            # a run may continue into the next column: split it into one segment per column
            c0, c1 = start // height, (end - 1) // height
            nseg = c1 - c0 + 1
            col = np.repeat(c0, nseg) + (np.arange(nseg.sum()) - np.repeat(np.cumsum(nseg) - nseg, nseg))
            seg0 = np.maximum(np.repeat(start, nseg), col * height) - col * height
            seg1 = np.minimum(np.repeat(end, nseg), (col + 1) * height) - col * height
            x0, x1, y0, y1 = int(col.min()), int(col.max()) + 1, int(seg0.min()), int(seg1.max())
            h_c = y1 - y0
            edges = np.zeros((x1 - x0) * h_c + 1, dtype=np.int32)  # the crop, column-major, as +1/-1 edges
            np.add.at(edges, (col - x0) * h_c + seg0 - y0, 1)
            np.add.at(edges, (col - x0) * h_c + seg1 - y0, -1)
            crops.append((np.cumsum(edges[:-1]) > 0).reshape(x1 - x0, h_c).T.copy())
            boxes[i] = (x0, y0, x1, y1)
        return cls(boxes, crops, (height, width))

    @classmethod
    def from_segmentations(cls, segmentations: list, height: int, width: int) -> "CropMasks":
        """COCO segmentations (polygon lists, RLE dicts) -> crops equal to pycocotools' rasterisation
        (`gains.annotations.segmentation_to_mask`): polygons become RLE without a full-size array, then runs."""

        return cls.from_rles([segmentation_to_rle(s, height, width) for s in segmentations], height, width)

    @classmethod
    def concatenate(cls, parts: list["CropMasks"], image_size=None) -> "CropMasks":
        if not parts:
            return cls.empty(image_size)
        size = parts[0].image_size if image_size is None else image_size
        if any(p.image_size != tuple(size) for p in parts):
            raise ValueError("cannot concatenate masks of different image sizes")
        return cls(np.concatenate([p.boxes for p in parts]), [c for p in parts for c in p.crops], size)

    # ----------------------------------------------------------------------------------- inspecting
    def __len__(self) -> int:
        return len(self.crops)

    def areas(self) -> np.ndarray:
        """int64 [N] pixel counts."""
        if self._areas is None:
            self._areas = np.array([int(np.count_nonzero(c)) for c in self.crops], dtype=np.int64)
        return self._areas

    def select(self, index) -> "CropMasks":
        """The masks at `index` (int indices or a bool mask over N), in that order."""
        index = np.asarray(index.cpu() if hasattr(index, "cpu") else index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64).reshape(-1)
        return CropMasks(self.boxes[index], [self.crops[i] for i in index], self.image_size)

    def tight(self) -> "CropMasks":
        """The same masks with every box shrunk to its foreground (empty masks: box (0, 0, 0, 0))."""
        boxes, crops = np.zeros_like(self.boxes), []
        for i, (crop, (x0, y0, _, _)) in enumerate(zip(self.crops, self.boxes.tolist())):
            rows, cols = np.flatnonzero(crop.any(1)), np.flatnonzero(crop.any(0))
            if rows.size == 0:
                crops.append(np.zeros((0, 0), bool))
                continue
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            boxes[i] = (x0 + c0, y0 + r0, x0 + c1, y0 + r1)
            crops.append(crop[r0:r1, c0:c1])
        return CropMasks(boxes, crops, self.image_size)

    def mask(self, i: int) -> np.ndarray:
        """Mask i at full image size, bool [H, W] (one at a time: the point of crops is never all at once)."""
        out = np.zeros(self.image_size, dtype=bool)
        x0, y0, x1, y1 = self.boxes[i].tolist()
        out[y0:y1, x0:x1] = self.crops[i]
        return out

    def dense(self) -> np.ndarray:
        """bool [N, H, W]: for small images and tests only (N x H x W bytes)."""
        out = np.zeros((len(self), *self.image_size), dtype=bool)
        for i, (crop, (x0, y0, x1, y1)) in enumerate(zip(self.crops, self.boxes.tolist())):
            out[i, y0:y1, x0:x1] = crop
        return out

    def xyxy(self) -> np.ndarray:
        """float32 [N, 4] tight pixel boxes (x0, y0, x1, y1), exclusive right/bottom; empty -> zeros."""
        return self.tight().boxes.astype(np.float32)

    # ---------------------------------------------------------------------------------- converting
    def to_rles(self) -> list[dict]:
        """COCO compressed RLEs {"size": [H, W], "counts": bytes}, equal to `pycocotools.mask.encode` of the
        dense masks, computed from the crops (never a full-size array)."""
        h, w = self.image_size
        out = []
        for crop, (x0, y0, x1, y1) in zip(self.crops, self.boxes.tolist()):
            counts = _column_major_counts(crop, x0, y0, h, w)
            out.append(mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w))
        return out

    def intersections(self, other: "CropMasks") -> np.ndarray:
        """int64 [N, M] pixel counts of mask i AND other's mask j (only pairs whose boxes meet are computed)."""
        out = np.zeros((len(self), len(other)), dtype=np.int64)
        if not len(self) or not len(other):
            return out
        a, b = self.boxes, other.boxes
        ix0, iy0 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
        ix1, iy1 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
        for i, j in zip(*np.nonzero((ix1 > ix0) & (iy1 > iy0))):
            x0, y0, x1, y1 = ix0[i, j], iy0[i, j], ix1[i, j], iy1[i, j]
            ca = self.crops[i][y0 - a[i, 1]:y1 - a[i, 1], x0 - a[i, 0]:x1 - a[i, 0]]
            cb = other.crops[j][y0 - b[j, 1]:y1 - b[j, 1], x0 - b[j, 0]:x1 - b[j, 0]]
            out[i, j] = np.count_nonzero(ca & cb)
        return out

    def label_image(self, scores=None, dtype=None) -> np.ndarray:
        """Instance label image [H, W]: pixel = 1 + index of the mask covering it, 0 = background.

        Where masks overlap, the higher `scores` wins the pixel (default: the earlier mask wins). dtype:
        uint16 when N < 65536, else uint32 (or as given; too small a dtype is an error).
        """
        n = len(self)
        if dtype is None:
            dtype = np.uint16 if n < 2 ** 16 else np.uint32
        if n >= np.iinfo(dtype).max + 1:
            raise ValueError(f"{n} instances do not fit a {np.dtype(dtype).name} label image; use uint32")
        order = np.arange(n) if scores is None else np.argsort(-np.asarray(scores, dtype=np.float64),
                                                                kind="stable")
        out = np.zeros(self.image_size, dtype=dtype)
        for i in order[::-1]:  # lowest priority first, so the highest-priority mask is written last
            x0, y0, x1, y1 = self.boxes[i].tolist()
            region = out[y0:y1, x0:x1]
            region[self.crops[i]] = i + 1
        return out


def _column_major_counts(crop: np.ndarray, x0: int, y0: int, h: int, w: int) -> list[int]:
    """COCO uncompressed RLE counts (alternating 0-runs and 1-runs, column-major, starting with 0s) of a
    mask that is `crop` on the box at (x0, y0) and False elsewhere in an h x w image."""
    if crop.size == 0 or not crop.any():
        return [h * w]
    padded = np.zeros((crop.shape[1], crop.shape[0] + 2), dtype=np.int8)  # one crop column per row
    padded[:, 1:-1] = crop.T
    col, row = np.nonzero(np.diff(padded, axis=1))  # run edges, in column-major order
    edges = (x0 + col) * h + y0 + row  # global column-major positions: alternately start, end
    starts, ends = edges[0::2], edges[1::2]
    # a run ending at the bottom of a column and one starting at the top of the next form one run
    join = np.flatnonzero(starts[1:] == ends[:-1])
    if join.size:
        starts = np.delete(starts, join + 1)
        ends = np.delete(ends, join)
    bounds = np.empty(2 * len(starts) + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, h * w
    bounds[1:-1:2], bounds[2:-1:2] = starts, ends
    counts = np.diff(bounds).tolist()
    return counts[:-1] if counts[-1] == 0 else counts  # pycocotools writes no empty trailing 0-run
