"""Gradient Anomaly Mapping Module (GAMM): one GA map per annotation, gains/METHOD.md §2.

The authors' scripts loop over every window in Python (about a minute for a 512×512 image). Here the same
definition runs in float64 numpy only where a value can be non-zero: windows holding a pixel of the
instance, and for pairs windows holding pixels of both; elsewhere the value is known exactly. Each
statistic is a two-pass mean/std over its own ws² values (no cumulative-sum differencing, ~1e-16 relative
noise), because where the original anomaly is exactly 0 the final X / (max X + 1e-7) amplifies any noise.
Masks are kept as crops (`CropMasks`) and maps are returned as crops on their support (`compute_ga_crops`):
memory and time are O(sum of support areas + interacting pairs), never N x H x W; only instances whose
boxes meet are ever paired (found by binning boxes, `gamm_windows.overlapping_pairs`).

Conventions: pixel (row m, col n); a window is named by its top-left corner (i, j), 0 <= i <= H-ws,
0 <= j <= W-ws; COCO boxes are xywh pixels, crop boxes (x0, y0, x1, y1) int, exclusive. Deviations
(§7.1–7.3): a target without another target in its context (single-target image, isolated nucleus) or
with an empty mask gets an all-ones map; multi-polygon instances are the union of their polygons.

Support of a map. Let w be a target that gets a map, its mask's pixels in rows y0..y1, columns x0..x1.
Its map is exactly 1.0 outside the box
    rows [max(0, y0-ws+1), y1+1), or [max(0, y0-ws+1), H) when y1 >= H-ws; columns likewise with x, W
(the "painted region"; nuclei variant: the same construction applied to the window corners allowed by
both the mask and the group's inter ranges of §2.5, a sub-box of it). Proof sketch:
  1. I_w(i, j) is 0 unless window (i, j) holds a pixel of M_w, i.e. max(0, y0-ws+1) <= i <= min(H-ws, y1)
     and likewise j (nuclei: and (i, j) in the inter ranges).
  2. Pixel y takes window row min(y, H-ws) (§2.3): Map(I_w) is 0 outside those window rows, plus the
     clamped strip y > H-ws when the last window row H-ws is among them (y1 >= H-ws); columns alike.
  3. §2.4 starts from X = Map(I_w) >= 0; every subtraction is followed by max(., 0), so X stays 0 where it
     is 0; the overlap bonus only touches M_w, which lies inside the box. (Nuclei: X = max(MapI - MapO, 0).)
  4. X = 0 gives 0 · mag / max(mag) = 0, then 0 / (max X + 1e-7) · GA + 1 = 1 for either sign; (1+1)/2 = 1.
The box is tight for what can be said from the windows: each of its pixels is painted by a window holding
a mask pixel (nuclei: in range). Values inside can still be exactly 1 (isbi windows without a neighbour,
where I == O exactly). The weaker claim "1 outside the instance's box grown by ws" follows: the box
starts ws-1 above/left of the mask, and ends at y1 below unless y1 >= H-ws, where y1 + ws >= H reaches the
image edge anyway; a COCO bbox of the polygon holds the pixel bbox, so it holds for that box too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.path import Path as MplPath
from pycocotools import mask as mask_utils

from . import gamm_windows as gw
from .instances import CropMasks

VARIANTS = ("isbi", "chrom", "nuclei")
SENTINEL = gw.SENTINEL  # direction outside the mask; outside [-pi, pi] on purpose (original value)
NORM_EPS = 1e-7  # the original's X / (max X + 1e-7)
EMPTY_BOX = (0, 0, 0, 0)


def map_folder_name(window_size, ga_factor, overlap_hl) -> str:
    """Folder name of the original's map layout, e.g. ``anomap_ws5_f0.5_ol0.1``.

    Floats are formatted like the authors' f-string (``repr`` of a float: 1 -> ``1.0``); ``ws`` is an int.
    """
    return f"anomap_ws{int(window_size)}_f{float(ga_factor)}_ol{float(overlap_hl)}"


# ----------------------------------------------------------------------------------------- masks
def gamm_mask_crops(segmentations: list, height: int, width: int) -> CropMasks:
    """Rasterise COCO segmentations the way the original GAMM scripts do, as tight crops.

    Args:
        segmentations: N items, each a list of flat polygons ``[x0, y0, x1, y1, ...]`` (their union) or an
            RLE dict (``counts`` compressed str/bytes or uncompressed list, ``size`` [H, W]).
        height, width: image size.
    Returns:
        CropMasks of N masks on tight boxes (empty mask: box (0, 0, 0, 0)). Polygon pixel (row m, col n) is
        inside iff matplotlib's ``Path(vertices).contains_points`` (radius 0) counts the point (x=n, y=m)
        inside: pixel centres at integer coordinates (pycocotools' rasteriser is half a pixel off), and the
        authors' rule for lattice points ON an edge, which whole-pixel vertices put on many edges. That
        rule counts edge crossings along +x, so an edge point is in or out by the edge's direction, hence
        the winding: a whole-pixel square drawn clockwise on the image (y down) keeps the points of its
        left, right and bottom edges, drawn counter-clockwise only those of its bottom edge
        (``shapely.contains_xy`` drops them all, which changes the maps by up to the whole GA range).
        Polygons with fewer than 3 points are skipped; a multi-polygon instance is the union of its polygons
        (§7.3). Each polygon is tested on the lattice of its bbox only (no point outside can be counted in);
        an RLE is decoded at full size, one instance at a time, then cropped.
    """
    boxes, crops = np.zeros((len(segmentations), 4), np.int64), []
    for k, seg in enumerate(segmentations):
        box, crop = _rle_crop(seg, height, width) if isinstance(seg, dict) else _polygons_crop(seg, height, width)
        boxes[k] = box
        crops.append(crop)
    return CropMasks(boxes, crops, (height, width))


def gamm_masks(segmentations: list, height: int, width: int) -> np.ndarray:
    """bool [N, H, W]: ``gamm_mask_crops(...).dense()`` (same semantics; N x H x W bytes, small images)."""
    return gamm_mask_crops(segmentations, height, width).dense()


def _tight(crop, x0, y0):
    """(box, crop) shrunk to the crop's pixels; (EMPTY_BOX, [0, 0]) when it has none."""
    rows, cols = np.flatnonzero(crop.any(1)), np.flatnonzero(crop.any(0))
    if rows.size == 0:
        return EMPTY_BOX, np.zeros((0, 0), bool)
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return (x0 + c0, y0 + r0, x0 + c1, y0 + r1), np.ascontiguousarray(crop[r0:r1, c0:c1])


def _polygons_crop(polygons, height, width):
    parts = []  # (vertices, inclusive lattice box r0, r1, c0, c1) of each polygon with lattice points
    for flat in polygons:
        xy = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
        if len(xy) < 3:
            continue
        if not np.isfinite(xy).all():  # NaN/inf would turn into INT64_MIN lattice bounds (a huge crop)
            raise ValueError("polygon with non-finite (NaN/inf) coordinates; gains.annotations.load_coco rejects "
                             "these, validate segmentations with gains.annotations.check_segmentation")
        # Rows outside [min y, max y] cross no edge (matplotlib compares y coordinates exactly). Columns get
        # one more lattice point on each side of [min x, max x]: the crossing's side is decided by comparing
        # two rounded products, so a point within rounding distance of the x range could still count.
        (x_lo, y_lo), (x_hi, y_hi) = xy.min(0), xy.max(0)
        c0, r0 = max(int(np.floor(x_lo)), 0), max(int(np.ceil(y_lo)), 0)
        c1, r1 = min(int(np.ceil(x_hi)), width - 1), min(int(np.floor(y_hi)), height - 1)
        if c1 >= c0 and r1 >= r0:
            parts.append((xy, r0, r1, c0, c1))
    if not parts:
        return EMPTY_BOX, np.zeros((0, 0), bool)
    R0, C0 = min(p[1] for p in parts), min(p[3] for p in parts)
    R1, C1 = max(p[2] for p in parts), max(p[4] for p in parts)
    crop = np.zeros((R1 - R0 + 1, C1 - C0 + 1), dtype=bool)
    for xy, r0, r1, c0, c1 in parts:
        # The authors' own call (not a re-derivation of its boundary rule): exact on edge points by design.
        rows, cols = np.mgrid[r0:r1 + 1, c0:c1 + 1].astype(np.float64)
        inside = MplPath(xy).contains_points(np.column_stack([cols.ravel(), rows.ravel()]))
        crop[r0 - R0:r1 + 1 - R0, c0 - C0:c1 + 1 - C0] |= inside.reshape(rows.shape)
    return _tight(crop, int(C0), int(R0))


def _rle_crop(rle, height, width):
    if isinstance(rle["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(rle, height, width)
    elif isinstance(rle["counts"], str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"RLE of size {mask.shape} does not match the image size {(height, width)}")
    return _tight(mask, 0, 0)


# ------------------------------------------------------------------------------- nuclei groups
def nuclei_groups(boxes_xywh, window_size, height, width) -> list:
    """Interaction groups of the nuclei variant (§2.5): N lists of indices, group of i = [i] followed by
    every interacting j in index order.

    boxes_xywh: float [N, 4] COCO boxes, each expanded by ``window_size`` on every side; i and j interact when
    the expanded boxes overlap with positive area and neither contains the other. height, width: unused,
    kept for the API (as in §2.5, the expanded boxes are not clipped to the image). Only pairs of boxes
    that meet are examined, so thousands of instances are cheap.
    """
    b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    x0, y0 = b[:, 0] - window_size, b[:, 1] - window_size
    x1, y1 = b[:, 0] + b[:, 2] + window_size, b[:, 1] + b[:, 3] + window_size
    i, j = gw.overlapping_pairs(x0, y0, x1, y1)

    def contains(p, q):  # box p contains box q
        return (x0[p] <= x0[q]) & (y0[p] <= y0[q]) & (x1[p] >= x1[q]) & (y1[p] >= y1[q])

    keep = ~contains(i, j) & ~contains(j, i)
    return [[k] + partners for k, partners in enumerate(gw.neighbours(len(b), i[keep], j[keep]))]


def _group_window_ranges(boxes_xywh, group, ws, height, width):
    """Top-left window ranges (rows, cols as (start, stop)) of the nuclei variant (§2.5): intra, inter."""
    b = np.asarray(boxes_xywh, dtype=np.float64)[group]
    x0, y0 = int(b[:, 0].min()), int(b[:, 1].min())
    w = int((b[:, 0] + b[:, 2]).max() - b[:, 0].min())
    h = int((b[:, 1] + b[:, 3]).max() - b[:, 1].min())
    r_stop, c_stop = min(height - ws + 1, y0 + h), min(width - ws + 1, x0 + w)
    intra = ((max(0, y0), r_stop), (max(0, x0), c_stop))
    inter = ((max(0, y0 - ws + 1), r_stop), (max(0, x0 - ws + 1), c_stop))
    return intra, inter


# ------------------------------------------------------------------------------------ driver
def compute_ga_crops(masks, category_ids, boxes_xywh, *, variant, window_size, ga_factor, overlap_hl,
                     target_category_id) -> list:
    """GA maps of all instances of one image (gains/METHOD.md §2), in annotation order, as crops.

    Args:
        masks: CropMasks of N masks (see ``gamm_mask_crops``) or bool [N, H, W].
        category_ids: N ints, the json's original category ids.
        boxes_xywh: float [N, 4] COCO bboxes; used by the nuclei variant only (may be None otherwise).
        variant: one of VARIANTS. window_size: int window side. ga_factor: maps lie in [1, 1+ga_factor].
        overlap_hl: bonus on overlap pixels (isbi, chrom). target_category_id: category that gets maps.
    Returns:
        N pairs (box, crop): box (x0, y0, x1, y1) int, exclusive, inside the image; crop float64
        [y1-y0, x1-x0]. The full map is the crop on the box and exactly 1.0 elsewhere; the box is the
        support of the module docstring. Non-targets, targets without another target in their context
        (single-target image, isolated nucleus; §7.1/§7.2), empty masks and images smaller than a window
        get the box (0, 0, 0, 0) and a [0, 0] crop.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    masks = _as_crop_masks(masks)
    n, (height, width), ws = len(masks), masks.image_size, int(window_size)
    if len(category_ids) != n or ws < 1:
        raise ValueError(f"{len(category_ids)} category ids for {n} masks, window_size {window_size}")
    if variant == "nuclei" and n and np.shape(boxes_xywh) != (n, 4):
        raise ValueError(f"the nuclei variant needs boxes_xywh of shape ({n}, 4), got {np.shape(boxes_xywh)}")
    out = [(EMPTY_BOX, np.ones((0, 0))) for _ in range(n)]
    if n == 0 or height < max(ws, 2) or width < max(ws, 2):
        return out
    targets = [k for k in range(n) if category_ids[k] == target_category_id]
    geoms = {}
    for k in targets:
        if (g := gw.geometry(masks.crops[k], masks.boxes[k, :2], ws, height, width)) is not None:
            geoms[k] = g
    contexts = _contexts(variant, targets, geoms, boxes_xywh, ws, height, width)
    layout = _Layout(variant, geoms, contexts, ws, height, width)
    halves = {w: [] for w in layout.supports}
    for sign in (+1, -1):  # one sign at a time: its window statistics are freed before the next
        signed = _SignPass(sign, layout, variant)
        for w in halves:
            halves[w].append(signed.half_map(w, float(ga_factor), float(overlap_hl)))
    for w, (plus, minus) in halves.items():
        (r0, r1), (c0, c1) = layout.supports[w]
        out[w] = ((int(c0), int(r0), int(c1), int(r1)), (plus + minus) / 2)
    return out


def compute_ga_maps(masks, category_ids, boxes_xywh, *, variant, window_size, ga_factor, overlap_hl,
                    target_category_id) -> np.ndarray:
    """Dense GA maps: float64 [N, H, W], ``compute_ga_crops`` pasted on ones (same arguments; masks bool
    [N, H, W] or CropMasks). N x H x W x 8 bytes: for small images, tests and benchmarks (the data path
    uses the crops)."""
    crops = compute_ga_crops(masks, category_ids, boxes_xywh, variant=variant, window_size=window_size,
                             ga_factor=ga_factor, overlap_hl=overlap_hl, target_category_id=target_category_id)
    height, width = masks.image_size if isinstance(masks, CropMasks) else np.shape(masks)[1:]
    out = np.ones((len(crops), height, width))
    for k, ((x0, y0, x1, y1), crop) in enumerate(crops):
        out[k, y0:y1, x0:x1] = crop
    return out


def _as_crop_masks(masks):
    if isinstance(masks, CropMasks):
        return masks
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    return CropMasks.from_dense(masks)


@dataclass
class _Context:
    """What target w is compared with: its inter value is a mean over ``count`` other targets, of which
    only ``partners`` (non-empty masks, window boxes meeting w's; ascending, the original's order) can
    differ from the lonely value. ``ranges``: nuclei window ranges (intra, inter), else None."""
    count: int
    partners: list
    ranges: tuple | None


def _contexts(variant, targets, geoms, boxes_xywh, ws, height, width):
    """w -> _Context, for the w that get a real map: non-empty targets with another target in context."""
    if variant != "nuclei":
        if len(targets) < 2:
            return {}
        near = _meeting({k: g.window_box() for k, g in geoms.items()})
        return {w: _Context(len(targets) - 1, near[w], None) for w in sorted(geoms)}
    groups = nuclei_groups(boxes_xywh, ws, height, width)
    is_target = set(targets)
    contexts = {}
    for w in geoms:
        others = [k for k in groups[w][1:] if k in is_target]
        if others:
            partners = [k for k in others if k in geoms and _meet(geoms[w].window_box(), geoms[k].window_box())]
            contexts[w] = _Context(len(others), partners,
                                   _group_window_ranges(boxes_xywh, groups[w], ws, height, width))
    return contexts


def _meet(a, b):  # two regions ((r0, r1), (c0, c1)) overlap
    return all(max(p[0], q[0]) < min(p[1], q[1]) for p, q in zip(a, b))


def _meeting(regions):
    """{k: ascending list of the other keys whose region meets k's} for {k: ((r0, r1), (c0, c1))}, from
    binned box pairs (no all-pairs loop)."""
    keys = sorted(regions)
    if not keys:
        return {}
    boxes = np.array([[c[0], r[0], c[1], r[1]] for r, c in (regions[k] for k in keys)])
    near = gw.neighbours(len(keys), *gw.overlapping_pairs(*boxes.T))
    return {k: [keys[q] for q in near[p]] for p, k in enumerate(keys)}


class _Layout:
    """Sign-independent layout: geometries, contexts, painted regions, the support of every map, and for
    isbi/chrom the instances whose painted regions meet w's (w included, ascending)."""

    def __init__(self, variant, geoms, contexts, ws, height, width):
        self.geoms, self.contexts, self.ws, self.height, self.width = geoms, contexts, ws, height, width
        self.regions = {k: gw.painted_region(g, ws, height, width) for k, g in geoms.items()}
        self.supports = {}
        for w, ctx in contexts.items():
            support = self.regions[w]
            if ctx.ranges is not None:  # nuclei: the windows allowed by both the mask and the inter ranges
                rows, cols = gw.intersect(geoms[w].window_box(), ctx.ranges[1])
                support = gw.paint_extent(rows, ws, height), gw.paint_extent(cols, ws, width)
            if support[0][1] > support[0][0] and support[1][1] > support[1][0]:
                self.supports[w] = support  # an empty support is an all-ones map
        self.meeting = {}
        if variant != "nuclei" and contexts:
            self.meeting = {w: sorted([w] + near) for w, near in _meeting(self.regions).items()}


class _SignPass:
    """One sign f of §2.1: window statistics of every instance, pair terms on demand, the half maps."""

    def __init__(self, sign, layout, variant):
        self.layout, self.geoms, self.variant, self.ws = layout, layout.geoms, variant, layout.ws
        self.height, self.width = layout.height, layout.width
        self.stats = {k: gw.intra_stats(g, sign, variant, self.ws, self.height, self.width)
                      for k, g in self.geoms.items()}
        self._pairs, self._means = {}, {}

    def pair(self, a, k):
        """(ii, jj, term) of a and k at the windows holding both, or None; cached, symmetric."""
        key = (min(a, k), max(a, k))
        if key not in self._pairs:
            lo, hi = key
            self._pairs[key] = gw.pair_terms(self.geoms[lo], self.geoms[hi], self.stats[lo], self.stats[hi],
                                             self.variant, self.ws)
        return self._pairs[key]

    def means(self, w):
        """(I, O) float64 grids on w's window box, 0 where the window misses w's mask.

        I is the mean over the other targets of the pair term, which is the "lonely" value wherever the
        other has no pixel; windows without any neighbour get that value itself, so I == O exactly there
        (isbi). O, the mean of one identical intra value per other target, is that value. Only partners
        can share a window with w; they are summed in the original's (ascending) order.
        """
        if w not in self._means:
            ctx, stats, origin = self.layout.contexts[w], self.stats[w], self.geoms[w].win_origin
            total, present = np.zeros(stats.intra.shape), np.zeros(stats.intra.shape, dtype=int)
            for k in ctx.partners:  # work in proportion to the windows two instances share
                if (p := self.pair(w, k)) is not None:
                    total[p[0] - origin[0], p[1] - origin[1]] += p[2]
                    present[p[0] - origin[0], p[1] - origin[1]] += 1
            n = ctx.count
            inter = np.where(present > 0, (total + (n - present) * stats.lonely) / n, stats.lonely)
            self._means[w] = inter, stats.intra
        return self._means[w]

    def half_map(self, w, ga_factor, overlap_hl):
        """§2.4 for this sign: float64 map of w on ``layout.supports[w]``, in [1, 1+ga_factor]."""
        g, region, ranges = self.geoms[w], self.layout.supports[w], self.layout.contexts[w].ranges
        inter, intra = self.means(w)
        if ranges is None:
            x = self._subtract_all(w, self._paint(inter, w, region), overlap_hl)
        else:  # nuclei: window ranges of the group's box, and only w's own intra map
            inter = gw.restrict(inter, g.win_origin, ranges[1])
            intra = gw.restrict(intra, g.win_origin, ranges[0])
            x = np.maximum(self._paint(inter, w, region) - self._paint(intra, w, region), 0)
        mag = gw.magnitude(g.cy, g.cx, region[0], region[1], self.height, self.width)
        x = x * mag / g.mag_max  # the original's operation order, for the last bits
        return x / (x.max() + NORM_EPS) * ga_factor + 1

    def _paint(self, grid, k, region):
        """Map of instance k's window grid on a pixel region."""
        return gw.paint(grid, self.geoms[k].win_origin, region, self.ws, self.height, self.width)

    def _subtract_all(self, w, x, overlap_hl):
        """isbi/chrom: subtract every intra map in annotation order, clamp, add the overlap bonus.

        Instances without an intra map (non-targets, empty masks) subtract 0 from an array that is already
        >= 0, and so do those whose painted region misses w's: only ``layout.meeting[w]`` is visited.
        """
        region = self.layout.supports[w]
        for k in self.layout.meeting[w]:
            x = np.maximum(x - self._paint(self.means(k)[1], k, region), 0)
            if k != w:
                self._overlap_bonus(x, region, w, k, overlap_hl)
        return x

    def _overlap_bonus(self, x, region, w, k, overlap_hl):
        """x[M_w & M_k] += overlap_hl, in place, from the two masks' bbox crops (x lies on ``region``)."""
        gw_, gk = self.geoms[w], self.geoms[k]
        y0, y1 = max(gw_.bbox[0], gk.bbox[0]), min(gw_.bbox[1], gk.bbox[1]) + 1
        x0, x1 = max(gw_.bbox[2], gk.bbox[2]), min(gw_.bbox[3], gk.bbox[3]) + 1
        if y1 <= y0 or x1 <= x0:
            return
        both = self._bbox_part(gw_, y0, y1, x0, x1) & self._bbox_part(gk, y0, y1, x0, x1)
        if both.any():
            (r0, _), (c0, _) = region
            x[y0 - r0:y1 - r0, x0 - c0:x1 - c0][both] += overlap_hl

    def _bbox_part(self, g, y0, y1, x0, x1):
        """bool [y1-y0, x1-x0]: g's mask on pixel rows y0:y1, cols x0:x1 (inside g's bbox)."""
        return g.mask_crop(self.ws)[y0 - g.bbox[0]:y1 - g.bbox[0], x0 - g.bbox[2]:x1 - g.bbox[2]]
