"""Tiled prediction of images larger than the model's training scale (whole microscopy fields).

Grid. Tiles are `tile_size` x `tile_size` ORIGINAL pixels (a side shorter than a tile gives tiles as long as
that side). Along each axis tile k starts at k * (tile_size - tile_overlap); the last tile is flush with the
image border, so neighbours overlap by at least `tile_overlap` px and every pixel is covered. An image no
larger than a tile is one tile. Every tile of an image is resized by one factor, the scale the model was
trained at (the `detect` callable carries it: gains.predictor.Predictor.scale_of, `test.tile_scale`), so a
tile shows objects at the size training showed them, whatever `tile_size` is; tiles of equal size are
batched. Detections are mapped back by the tile's offset; their masks are pasted inside their tile only
(pixels beyond a tile edge were never seen) and stored as crops.

Merging, so one object gives one instance (boxes are the detections' float boxes in image pixels):

(a) Seam rule. A detection's box "touches" a tile edge when it lies within SEAM_MARGIN (2) px of it; only
    inner edges count (an edge on the image border cuts nothing). A box lies in a tile's INTERIOR when it
    is inside the tile and touches none of its inner edges. A detection whose box touches an inner edge
    of its own tile (it may be cut by that edge) is dropped when its box lies in the interior of another
    tile: that tile saw the whole region. Neighbouring interiors overlap by >= tile_overlap - 2 *
    SEAM_MARGIN px, so a box with both sides shorter than that lies in the interior of some tile, whose
    detection of the whole object is never dropped by this rule. (If that tile misses the object, the
    cut detections are still dropped: the rule is geometric.)
(b) Duplicate rule. Among the remaining detections, greedily in descending score (ties: tile order, then
    the model's order), a kept detection removes every detection of ANOTHER tile with the same label whose
    mask overlaps it by IoU >= merge_iou or by containment (intersection / smaller mask area) >=
    merge_containment; a removed detection removes nothing (as in NMS). Pairs within one tile are never
    merged (the model's NMS already ran), so a one-tile image seen at the whole image's scale (the
    default without data.crop_size) gives exactly the whole-image result. Only
    pairs from overlapping tiles whose mask boxes meet the tiles' common rectangle are compared
    (CropMasks.intersections): never N x N dense masks.
(c) The survivors, sorted by score (stable), are cut to `max_detections` (None = all).

Objects larger than the overlap can lie in no tile's interior; their pieces survive (a) and are merged by
(b) only when they overlap enough, so a warning names the largest box side when it exceeds tile_overlap.
Memory: the normalised float image (12 bytes/px) + O(sum of instance crop areas + one batch of tiles); no
[N, H, W] array is ever built.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from gains.instances import CropMasks

__all__ = ["SEAM_MARGIN", "tile_starts", "tile_grid", "interior", "seam_keep", "merge_duplicates",
           "predict_tiled"]

SEAM_MARGIN = 2.0  # px: a box this close to an inner tile edge counts as touching it (box rounding, resizing)


def tile_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Tile start offsets along one axis of `length` px: 0, s, 2s, ... (s = tile_size - overlap) and a last
    tile flush with the end; [0] when the axis fits one tile."""
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    starts = list(range(0, length - tile_size, stride))
    return starts + [length - tile_size]


def tile_grid(height: int, width: int, tile_size: int, overlap: int) -> np.ndarray:
    """int64 [T, 4] tiles (x0, y0, x1, y1), exclusive ends, row-major (top row first, left to right)."""
    ys, xs = tile_starts(height, tile_size, overlap), tile_starts(width, tile_size, overlap)
    th, tw = min(tile_size, height), min(tile_size, width)
    return np.array([(x, y, x + tw, y + th) for y in ys for x in xs], dtype=np.int64).reshape(-1, 4)


def interior(boxes: np.ndarray, tiles: np.ndarray, image_size: tuple[int, int],
             margin: float = SEAM_MARGIN) -> np.ndarray:
    """bool [N, T]: box n (float xyxy image px) lies in tile t and is more than `margin` px inside each of
    the tile's INNER edges (edges on the image border do not count: boxes are clamped to the image)."""
    h, w = image_size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 1, 4)
    t = np.asarray(tiles, dtype=np.float64).reshape(1, -1, 4)
    left = (t[..., 0] <= 0) | (b[..., 0] > t[..., 0] + margin)
    top = (t[..., 1] <= 0) | (b[..., 1] > t[..., 1] + margin)
    right = (t[..., 2] >= w) | (b[..., 2] < t[..., 2] - margin)
    bottom = (t[..., 3] >= h) | (b[..., 3] < t[..., 3] - margin)
    return left & top & right & bottom


def seam_keep(boxes: np.ndarray, tile_ids: np.ndarray, tiles: np.ndarray, image_size: tuple[int, int],
              margin: float = SEAM_MARGIN) -> np.ndarray:
    """Rule (a): bool [N], False for a detection that touches an inner edge of its own tile `tile_ids[n]`
    while its box lies in the interior of another tile."""
    inside = interior(boxes, tiles, image_size, margin)
    n = np.arange(len(inside))
    cut = ~inside[n, tile_ids]
    return ~(cut & inside.any(axis=1))  # a cut box is not interior to its own tile, so any() means another


def _overlapping_tile_pairs(tiles: np.ndarray):
    """(a, b, common rectangle) for tile pairs a < b whose rectangles share pixels."""
    x0 = np.maximum(tiles[:, None, 0], tiles[None, :, 0])
    y0 = np.maximum(tiles[:, None, 1], tiles[None, :, 1])
    x1 = np.minimum(tiles[:, None, 2], tiles[None, :, 2])
    y1 = np.minimum(tiles[:, None, 3], tiles[None, :, 3])
    meet = np.triu((x1 > x0) & (y1 > y0), k=1)
    for a, b in zip(*np.nonzero(meet)):
        yield int(a), int(b), (x0[a, b], y0[a, b], x1[a, b], y1[a, b])


def _meets(boxes: np.ndarray, rect) -> np.ndarray:
    x0, y0, x1, y1 = rect
    return (boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)


def _candidate_pairs(masks: CropMasks, tile_ids: np.ndarray, tiles: np.ndarray):
    """(i, j, intersection) int64 arrays for masks of different, overlapping tiles that share pixels.

    Two masks of tiles a and b can only meet inside a ∩ b, so only masks whose crop box meets that
    rectangle are compared, and CropMasks.intersections only computes pairs whose boxes meet."""
    boxes = masks.boxes
    by_tile = [np.flatnonzero(tile_ids == t) for t in range(len(tiles))]
    out_i, out_j, out_n = [], [], []
    for a, b, rect in _overlapping_tile_pairs(tiles):
        ia, ib = by_tile[a][_meets(boxes[by_tile[a]], rect)], by_tile[b][_meets(boxes[by_tile[b]], rect)]
        if not len(ia) or not len(ib):
            continue
        inter = masks.select(ia).intersections(masks.select(ib))
        ra, rb = np.nonzero(inter)
        out_i.append(ia[ra]), out_j.append(ib[rb]), out_n.append(inter[ra, rb])
    if not out_i:
        return (np.zeros(0, np.int64),) * 3
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_n)


def merge_duplicates(masks: CropMasks, labels: np.ndarray, scores: np.ndarray, tile_ids: np.ndarray,
                     tiles: np.ndarray, merge_iou: float = 0.5, merge_containment: float = 0.8) -> np.ndarray:
    """Rule (b): int64 indices of the detections kept, in descending score order (stable).

    masks: CropMasks [N] in image pixels; labels int [N]; scores float [N]; tile_ids int [N] into `tiles`."""
    n = len(masks)
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    i, j, inter = _candidate_pairs(masks, np.asarray(tile_ids), tiles)
    areas = masks.areas()
    ai, aj = areas[i], areas[j]
    iou = inter / np.maximum(ai + aj - inter, 1)
    contained = inter / np.maximum(np.minimum(ai, aj), 1)
    dup = (labels[i] == labels[j]) & ((iou >= merge_iou) | (contained >= merge_containment))
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(i[dup].tolist(), j[dup].tolist()):
        neighbours[a].append(b)
        neighbours[b].append(a)
    removed = np.zeros(n, dtype=bool)
    keep = []
    for k in np.argsort(-scores, kind="stable").tolist():
        if removed[k]:
            continue
        keep.append(k)  # greedy like NMS: every duplicate left is lower in the order, so it goes
        removed[neighbours[k]] = True
    return np.array(keep, dtype=np.int64)


def _run_tiles(image: Tensor, tiles: np.ndarray, detect: Callable, batch_size: int, progress: bool):
    """Detections of every tile in image pixels: (boxes float32 [N,4], labels, scores, CropMasks, tile_ids)."""
    from tqdm import tqdm

    h, w = image.shape[-2:]
    boxes, labels, scores, parts, tile_ids = [], [], [], [], []
    bar = tqdm(total=len(tiles), desc=f"tiles of {h}x{w}", unit="tile", dynamic_ncols=True, leave=False,
               disable=not progress or len(tiles) == 1)
    try:
        for start in range(0, len(tiles), batch_size):  # all tiles of an image have the same size
            batch = tiles[start:start + batch_size]
            dets = detect([image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in batch.tolist()])
            for t, (x0, y0, _, _), det in zip(range(start, start + len(batch)), batch.tolist(), dets):
                shift = np.array([x0, y0, x0, y0], dtype=np.int64)
                m = det["masks"]
                nonempty = (m.boxes[:, 2] > m.boxes[:, 0])[:, None]  # empty masks keep the box (0, 0, 0, 0)
                parts.append(CropMasks(np.where(nonempty, m.boxes + shift, 0), m.crops, (h, w)))
                boxes.append(det["boxes"].float() + torch.tensor(shift, dtype=torch.float32))
                labels.append(det["labels"]), scores.append(det["scores"].float())
                tile_ids.append(np.full(len(m), t, dtype=np.int64))
            bar.update(len(batch))
    finally:
        bar.close()
    return (torch.cat(boxes), torch.cat(labels), torch.cat(scores), CropMasks.concatenate(parts, (h, w)),
            np.concatenate(tile_ids))


def predict_tiled(image: Tensor, detect: Callable[[list[Tensor]], list[dict]], tile_size: int = 512,
                  tile_overlap: int = 128, batch_size: int = 4, merge_iou: float = 0.5,
                  merge_containment: float = 0.8, max_detections: int | None = None,
                  progress: bool = True) -> dict:
    """Predict one image tile by tile and merge across seams (rules in the module docstring).

    image: float32 [3,H,W] in [0,1], normalised as a whole. detect: tiles (float [3,h,w] of one size) ->
    per tile `boxes` float [n,4] xyxy tile pixels, `labels` int64, `scores` float, `masks` CropMasks of
    the tile's size (gains.predictor.Predictor._detect with the image's tile scale bound: it resizes). Returns `boxes` float32 [N,4] xyxy image pixels,
    `labels` int64 [N], `scores` float32 [N] (descending) and `masks` CropMasks of size (H, W), on the CPU.
    """
    h, w = (int(s) for s in image.shape[-2:])
    tiles = tile_grid(h, w, tile_size, tile_overlap)
    boxes, labels, scores, masks, tile_ids = _run_tiles(image, tiles, detect, batch_size, progress)
    survivors = np.flatnonzero(seam_keep(boxes.numpy(), tile_ids, tiles, (h, w)))
    masks, tile_ids = masks.select(survivors), tile_ids[survivors]
    boxes, labels, scores = boxes[survivors], labels[survivors], scores[survivors]
    keep = merge_duplicates(masks, labels.numpy(), scores.numpy(), tile_ids, tiles, merge_iou, merge_containment)
    keep = keep[:max_detections] if max_detections else keep
    index = torch.from_numpy(keep)
    out = {"boxes": boxes[index], "labels": labels[index], "scores": scores[index], "masks": masks.select(keep)}
    _warn_large_objects(out["boxes"], tile_overlap, len(tiles))
    return out


def _warn_large_objects(boxes: Tensor, tile_overlap: int, num_tiles: int) -> None:
    """Objects larger than the overlap may lie in no tile's interior: seams can split them."""
    if num_tiles < 2 or not len(boxes):
        return
    largest = float(torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).max())
    if largest > tile_overlap:
        size = math.ceil(largest)
        warnings.warn(f"objects up to {size} px but tile_overlap is {tile_overlap} px: objects cut by seams "
                      f"may be split; set test.tile_overlap >= {size} / tile_size larger", stacklevel=3)
