"""Gradient Anomaly Mapping Module (GAMM): one GA map per annotation, GAINS_METHOD.md §2.

The authors' scripts loop over every window in Python (about a minute for a 512×512 image). Here the same
definition runs in float64 numpy only where a value can be non-zero: windows holding a pixel of the
instance, and for pairs windows holding pixels of both; elsewhere the value is known exactly. Each
statistic is a two-pass mean/std over its own ws² values (no cumulative-sum differencing, ~1e-16 relative
noise), because where the original anomaly is exactly 0 the final X / (max X + 1e-7) amplifies any noise.

Conventions: pixel (row m, col n); a window is named by its top-left corner (i, j), 0 <= i <= H-ws,
0 <= j <= W-ws; boxes are COCO xywh pixels. Deviations (§7.1–7.3): a target without another target in its
context (single-target image, isolated nucleus) or with an empty mask gets an all-ones map; multi-polygon
instances are the union of their polygons.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from numpy.lib.stride_tricks import sliding_window_view
from pycocotools import mask as mask_utils

VARIANTS = ("isbi", "chrom", "nuclei")
SENTINEL = -4.0  # direction outside the mask; outside [-pi, pi] on purpose (original value)
NORM_EPS = 1e-7  # the original's X / (max X + 1e-7)


def map_folder_name(window_size, ga_factor, overlap_hl) -> str:
    """Folder name of the original's map layout, e.g. ``anomap_ws5_f0.5_ol0.1``.

    Floats are formatted like the authors' f-string (``repr`` of a float: 1 -> ``1.0``); ``ws`` is an int.
    """
    return f"anomap_ws{int(window_size)}_f{float(ga_factor)}_ol{float(overlap_hl)}"


# ----------------------------------------------------------------------------------------- masks
def gamm_masks(segmentations: list, height: int, width: int) -> np.ndarray:
    """Rasterise COCO segmentations the way the original GAMM scripts do.

    Args:
        segmentations: N items, each a list of flat polygons ``[x0, y0, x1, y1, ...]`` (their union) or an
            RLE dict (``counts`` compressed str/bytes or uncompressed list, ``size`` [H, W]).
        height, width: image size.
    Returns:
        bool [N, H, W]. Polygon pixel (row m, col n) is inside iff the point (x=n, y=m) is strictly inside
        (pixel centres at integer coordinates, like matplotlib ``Path.contains_points``; pycocotools'
        rasteriser is half a pixel off). Polygons with fewer than 3 points are skipped.
    """
    out = np.zeros((len(segmentations), height, width), dtype=bool)
    for k, seg in enumerate(segmentations):
        out[k] = _rle_mask(seg, height, width) if isinstance(seg, dict) else _polygons_mask(seg, height, width)
    return out


def _polygons_mask(polygons, height, width):
    mask = np.zeros((height, width), dtype=bool)
    for flat in polygons:
        xy = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
        if len(xy) < 3:
            continue
        # Test only the lattice points of the polygon's bounding box.
        c0, r0 = np.maximum(np.ceil(xy.min(0)), 0).astype(int)
        c1, r1 = np.minimum(np.floor(xy.max(0)), [width - 1, height - 1]).astype(int)
        if c1 < c0 or r1 < r0:
            continue
        rows, cols = np.mgrid[r0:r1 + 1, c0:c1 + 1]
        mask[r0:r1 + 1, c0:c1 + 1] |= shapely.contains_xy(shapely.Polygon(xy), cols, rows)
    return mask


def _rle_mask(rle, height, width):
    if isinstance(rle["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(rle, height, width)
    elif isinstance(rle["counts"], str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"RLE of size {mask.shape} does not match the image size {(height, width)}")
    return mask


# ------------------------------------------------------------------------------- nuclei groups
def nuclei_groups(boxes_xywh, window_size, height, width) -> list:
    """Interaction groups of the nuclei variant (§2.5): N lists of indices, group of i = [i] followed by
    every interacting j in index order.

    boxes_xywh: float [N, 4] COCO boxes, each expanded by ``window_size`` on every side; i and j interact when
    the expanded boxes overlap with positive area and neither contains the other. height, width: unused,
    kept for the API (as in §2.5, the expanded boxes are not clipped to the image).
    """
    b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    x0, y0 = b[:, 0] - window_size, b[:, 1] - window_size
    x1, y1 = b[:, 0] + b[:, 2] + window_size, b[:, 1] + b[:, 3] + window_size
    meet = ((x0[:, None] < x1[None]) & (x0[None] < x1[:, None])
            & (y0[:, None] < y1[None]) & (y0[None] < y1[:, None]))
    contains = ((x0[:, None] <= x0[None]) & (y0[:, None] <= y0[None])  # [i, j]: box i contains box j
                & (x1[:, None] >= x1[None]) & (y1[:, None] >= y1[None]))
    interact = meet & ~contains & ~contains.T
    np.fill_diagonal(interact, False)
    return [[i] + [int(j) for j in np.flatnonzero(interact[i])] for i in range(len(b))]


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


# ------------------------------------------------------------------------------ radial fields
def _gradients(cy, cx, rows, cols, height, width):
    """(gy, gx) of z = (m-cy)² + (n-cx)² on the pixel block ``rows`` × ``cols`` ((start, stop) pairs).

    Bitwise equal to ``np.gradient(z)`` over the whole image: np.gradient is local, so computing it on the
    block grown by one pixel (clipped to the image) reproduces the central and one-sided differences.
    """
    (r0, r1), (c0, c1) = rows, cols
    R0, R1, C0, C1 = max(0, r0 - 1), min(height, r1 + 1), max(0, c0 - 1), min(width, c1 + 1)
    m = np.arange(R0, R1, dtype=np.float64)[:, None]
    n = np.arange(C0, C1, dtype=np.float64)[None, :]
    gy, gx = np.gradient((m - cy) ** 2 + (n - cx) ** 2)
    block = (slice(r0 - R0, r1 - R0), slice(c0 - C0, c1 - C0))
    return gy[block], gx[block]


def _magnitude(cy, cx, rows, cols, height, width):
    gy, gx = _gradients(cy, cx, rows, cols, height, width)
    return np.sqrt(gy ** 2 + gx ** 2)


def _max_magnitude(cy, cx, height, width):
    """max over the image of |grad z|. Inside rows/cols 1..H-2 it is 2·distance to the centroid, largest
    on that block's border, so the two outermost rows and columns hold the maximum."""
    bands = [((0, min(2, height)), (0, width)), ((max(0, height - 2), height), (0, width)),
             ((0, height), (0, min(2, width))), ((0, height), (max(0, width - 2), width))]
    return max(_magnitude(cy, cx, r, c, height, width).max() for r, c in bands)


@dataclass
class _Geometry:
    """Sign-independent data of one non-empty mask. The "pad" (mask bbox grown by ws-1, may stick out of
    the image) holds every pixel of every window touching the mask; the "window box" holds those windows'
    top-left corners (clipped to the image)."""
    cy: float
    cx: float
    bbox: tuple          # (y0, y1, x0, x1) inclusive, pixels
    pad_origin: tuple    # global (row, col) of pad[0, 0]
    inside_pad: np.ndarray  # bool [ph, pw]
    win_origin: tuple    # global top-left (i, j) of the window box's first window
    counts: np.ndarray   # int [nr, nc]: mask pixels in each window of the window box
    mag_max: float


def _geometry(mask, ws):
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max(), cols.min(), cols.max()
    pad_r0, pad_c0 = y0 - ws + 1, x0 - ws + 1
    inside = np.zeros((y1 - y0 + 2 * ws - 1, x1 - x0 + 2 * ws - 1), dtype=bool)
    inside[ws - 1:ws + y1 - y0, ws - 1:ws + x1 - x0] = mask[y0:y1 + 1, x0:x1 + 1]
    # Integer box sums are exact, unlike float cumulative sums.
    s = np.zeros((inside.shape[0] + 1, inside.shape[1] + 1), dtype=np.int64)
    s[1:, 1:] = inside.cumsum(0).cumsum(1)
    all_counts = s[ws:, ws:] - s[:-ws, ws:] - s[ws:, :-ws] + s[:-ws, :-ws]
    i0, i1 = max(0, pad_r0), min(height - ws, y1)
    j0, j1 = max(0, pad_c0), min(width - ws, x1)
    counts = all_counts[i0 - pad_r0:i1 + 1 - pad_r0, j0 - pad_c0:j1 + 1 - pad_c0]
    cy, cx = rows.sum() / rows.size, cols.sum() / cols.size
    return _Geometry(cy, cx, (y0, y1, x0, x1), (pad_r0, pad_c0), inside, (i0, j0), counts,
                     _max_magnitude(cy, cx, height, width))


def _direction_pad(g, sign, ws, height, width):
    """float64 [ph, pw]: arctan2(gy, sign·gx) inside the mask, SENTINEL elsewhere, on the geometry's pad."""
    y0, y1, x0, x1 = g.bbox
    gy, gx = _gradients(g.cy, g.cx, (y0, y1 + 1), (x0, x1 + 1), height, width)
    pad = np.full(g.inside_pad.shape, SENTINEL)
    box = (slice(ws - 1, ws + y1 - y0), slice(ws - 1, ws + x1 - x0))
    inside = g.inside_pad[box]
    pad[box][inside] = np.arctan2(gy, sign * gx)[inside]
    return pad


# -------------------------------------------------------------------------- window statistics
_BLOCK = 1 << 21  # gathered values per block of windows: every temporary stays under ~16 MB for any ws


def _gather(pad, origin, ii, jj, ws):
    """[n, ws²] values of the windows with global top-left corners (ii, jj) from a pad at ``origin``."""
    view = sliding_window_view(pad, (ws, ws))
    return view[ii - origin[0], jj - origin[1]].reshape(len(ii), ws * ws)


def _std(values):
    """Population std of each row (two-pass, like np.std): float64 [n, m] -> [n]."""
    dev = values - values.mean(axis=1, keepdims=True)
    return np.sqrt((dev * dev).mean(axis=1))


def _masked_std(values, inside):
    """Population std of the ``inside`` entries of each row; every row needs one. [n, m] -> [n]."""
    count = inside.sum(axis=1)
    mean = np.where(inside, values, 0.0).sum(axis=1) / count
    dev = np.where(inside, values - mean[:, None], 0.0)
    return np.sqrt((dev * dev).sum(axis=1) / count)


def _blockwise(fn, n, ws):
    """Concatenated fn(slice of windows) over blocks of <= _BLOCK gathered values (n > 0 windows)."""
    step = max(1, _BLOCK // (ws * ws))
    return np.concatenate([fn(slice(s, s + step)) for s in range(0, n, step)])


@dataclass
class _Intra:
    """Window statistics of one instance for one sign; grids cover its window box, 0 off the mask."""
    dirs: np.ndarray    # float64 [ph, pw] direction pad
    intra: np.ndarray   # float64 [nr, nc] intra value: d1 (chrom) or min(d1, d2)
    lonely: np.ndarray  # float64 [nr, nc] inter term where the other instance has no pixel in the window


def _intra(g, sign, variant, ws, height, width):
    dirs = _direction_pad(g, sign, ws, height, width)
    li, lj = np.nonzero(g.counts)
    ii, jj = li + g.win_origin[0], lj + g.win_origin[1]

    def d1_d2(s):
        values = _gather(dirs, g.pad_origin, ii[s], jj[s], ws)
        inside = _gather(g.inside_pad, g.pad_origin, ii[s], jj[s], ws)
        return np.stack([_std(values), _masked_std(values, inside)], axis=1)

    d1, d2 = _blockwise(d1_d2, len(ii), ws).T
    # Without neighbour pixels dir_k == SENTINEL all over the window, so e1 == d1 and e2 == d2 in exact
    # maths. Using these very numbers makes I - O exactly 0 there (isbi) or <= 0 (chrom), where rounding
    # noise would be blown up by the final X / (max X + 1e-7). For nuclei, d1 - min(d1, d2) is real.
    intra, lonely = np.zeros(g.counts.shape), np.zeros(g.counts.shape)
    intra[li, lj] = d1 if variant == "chrom" else np.minimum(d1, d2)
    lonely[li, lj] = d1 if variant == "nuclei" else np.minimum(d1, d2)
    return _Intra(dirs, intra, lonely)


def _shared_windows(ga, gk):
    """Global corners (ii, jj) of the windows holding pixels of both instances (maybe empty)."""
    r0, c0 = max(ga.win_origin[0], gk.win_origin[0]), max(ga.win_origin[1], gk.win_origin[1])
    r1 = min(ga.win_origin[0] + ga.counts.shape[0], gk.win_origin[0] + gk.counts.shape[0])
    c1 = min(ga.win_origin[1] + ga.counts.shape[1], gk.win_origin[1] + gk.counts.shape[1])
    if r1 <= r0 or c1 <= c0:  # window-dilated boxes do not meet
        return np.zeros(0, int), np.zeros(0, int)

    def crop(g):
        return g.counts[r0 - g.win_origin[0]:r1 - g.win_origin[0], c0 - g.win_origin[1]:c1 - g.win_origin[1]]

    li, lj = np.nonzero((crop(ga) > 0) & (crop(gk) > 0))
    return li + r0, lj + c0


def _pair_terms(ga, gk, sa, sk, variant, ws):
    """(ii, jj, term): inter term of a and k (symmetric) at the global corners of the windows holding
    pixels of both, or None when there is none."""
    ii, jj = _shared_windows(ga, gk)
    if ii.size == 0:
        return None

    def term(s):
        va = _gather(sa.dirs, ga.pad_origin, ii[s], jj[s], ws)
        vk = _gather(sk.dirs, gk.pad_origin, ii[s], jj[s], ws)
        e1 = _std(vk - va)
        if variant == "nuclei":
            return e1
        inside = np.concatenate([_gather(gk.inside_pad, gk.pad_origin, ii[s], jj[s], ws),
                                 _gather(ga.inside_pad, ga.pad_origin, ii[s], jj[s], ws)], axis=1)
        return np.minimum(e1, _masked_std(np.concatenate([vk, va], axis=1), inside))

    return ii, jj, _blockwise(term, len(ii), ws)


# ---------------------------------------------------------------------- window maps to pixels
def _painted_region(g, ws, height, width):
    """Pixels where Map(D) of a window-box grid can be non-zero, as ((r0, r1), (c0, c1)) half-open.

    A pixel takes the window whose top-left corner it is, clamped to the last window (§2.3), so the last
    window row/column also covers the image's bottom/right strip. It contains every pixel of the mask.
    """
    (i0, j0), (nr, nc) = g.win_origin, g.counts.shape
    r1 = height if i0 + nr - 1 == height - ws else i0 + nr
    c1 = width if j0 + nc - 1 == width - ws else j0 + nc
    return (i0, r1), (j0, c1)


def _paint(grid, origin, region, ws, height, width):
    """Map(D) on a pixel region: pixel (y, x) = D[min(y, H-ws), min(x, W-ws)], D = ``grid`` placed at window
    corner ``origin`` and 0 elsewhere. Returns float64 [r1-r0, c1-c0]."""
    (r0, r1), (c0, c1) = region
    ri = np.minimum(np.arange(r0, r1), height - ws) - origin[0]
    ci = np.minimum(np.arange(c0, c1), width - ws) - origin[1]
    ok_r, ok_c = (ri >= 0) & (ri < grid.shape[0]), (ci >= 0) & (ci < grid.shape[1])
    out = np.zeros((r1 - r0, c1 - c0))
    out[np.ix_(ok_r, ok_c)] = grid[np.ix_(ri[ok_r], ci[ok_c])]
    return out


def _meet(a, b):  # two ((r0, r1), (c0, c1)) half-open pixel regions overlap
    return all(max(p[0], q[0]) < min(p[1], q[1]) for p, q in zip(a, b))


def _restrict(grid, origin, ranges):
    """Zero a window grid outside the top-left ranges ((r0, r1), (c0, c1)) of the nuclei variant."""
    (r0, r1), (c0, c1) = ranges
    keep = np.zeros(grid.shape, dtype=bool)
    keep[max(0, r0 - origin[0]):max(0, r1 - origin[0]), max(0, c0 - origin[1]):max(0, c1 - origin[1])] = True
    return np.where(keep, grid, 0.0)


# ------------------------------------------------------------------------------------ driver
def compute_ga_maps(masks, category_ids, boxes_xywh, *, variant, window_size, ga_factor, overlap_hl,
                    target_category_id) -> np.ndarray:
    """GA maps of all instances of one image (GAINS_METHOD.md §2), in annotation order.

    Args:
        masks: bool [N, H, W] instance masks (see ``gamm_masks``).
        category_ids: N ints, the json's original category ids.
        boxes_xywh: float [N, 4] COCO bboxes; used by the nuclei variant only (may be None otherwise).
        variant: one of VARIANTS. window_size: int window side. ga_factor: maps lie in [1, 1+ga_factor].
        overlap_hl: bonus on overlap pixels (isbi, chrom). target_category_id: category that gets maps.
    Returns:
        float64 [N, H, W]. Non-targets, targets without another target in their context (single-target
        image, isolated nucleus; §7.1/§7.2), empty masks and images smaller than a window get all ones.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    n, height, width = masks.shape
    ws = int(window_size)
    if len(category_ids) != n or ws < 1:
        raise ValueError(f"{len(category_ids)} category ids for {n} masks, window_size {window_size}")
    if variant == "nuclei" and n and np.shape(boxes_xywh) != (n, 4):
        raise ValueError(f"the nuclei variant needs boxes_xywh of shape ({n}, 4), got {np.shape(boxes_xywh)}")
    out = np.ones((n, height, width))
    if n == 0 or height < max(ws, 2) or width < max(ws, 2):
        return out
    targets = [k for k in range(n) if category_ids[k] == target_category_id]
    geoms = {k: _geometry(masks[k], ws) for k in targets if masks[k].any()}
    contexts = _contexts(variant, targets, geoms, boxes_xywh, ws, height, width)
    regions = {k: _painted_region(g, ws, height, width) for k, g in geoms.items()}
    passes = [_SignPass(sign, masks, geoms, contexts, regions, variant, ws) for sign in (+1, -1)]
    for w in contexts:
        (r0, r1), (c0, c1) = regions[w]
        plus, minus = (p.half_map(w, float(ga_factor), float(overlap_hl)) for p in passes)
        out[w, r0:r1, c0:c1] = (plus + minus) / 2
    return out


def _contexts(variant, targets, geoms, boxes_xywh, ws, height, width):
    """w -> (other targets w is compared with, nuclei window ranges (intra, inter) or None), for the w
    that get a real map: non-empty targets with at least one other target in their context."""
    if variant != "nuclei":
        if len(targets) < 2:
            return {}
        return {w: ([k for k in targets if k != w], None) for w in geoms}
    groups = nuclei_groups(boxes_xywh, ws, height, width)
    is_target = set(targets)
    contexts = {}
    for w in geoms:
        others = [k for k in groups[w][1:] if k in is_target]
        if others:
            contexts[w] = (others, _group_window_ranges(boxes_xywh, groups[w], ws, height, width))
    return contexts


class _SignPass:
    """One sign f of §2.1: window statistics of every instance, pair terms on demand, the half maps."""

    def __init__(self, sign, masks, geoms, contexts, regions, variant, ws):
        self.masks, self.geoms, self.contexts, self.regions = masks, geoms, contexts, regions
        self.variant, self.ws = variant, ws
        self.height, self.width = masks.shape[1:]
        self.stats = {k: _intra(g, sign, variant, ws, self.height, self.width) for k, g in geoms.items()}
        self._pairs, self._means = {}, {}

    def pair(self, a, k):
        """(ii, jj, term) of a and k at the windows holding both, or None; cached, symmetric."""
        key = (min(a, k), max(a, k))
        if key not in self._pairs:
            lo, hi = key
            both = lo in self.geoms and hi in self.geoms  # an empty mask has no window
            self._pairs[key] = _pair_terms(self.geoms[lo], self.geoms[hi], self.stats[lo], self.stats[hi],
                                           self.variant, self.ws) if both else None
        return self._pairs[key]

    def means(self, w):
        """(I, O) float64 grids on w's window box, 0 where the window misses w's mask.

        I is the mean over the other targets of the pair term, which is the "lonely" value wherever the
        other has no pixel; windows without any neighbour get that value itself, so I == O exactly there
        (isbi). O, the mean of one identical intra value per other target, is that value.
        """
        if w not in self._means:
            others, stats, origin = self.contexts[w][0], self.stats[w], self.geoms[w].win_origin
            total, present = np.zeros(stats.intra.shape), np.zeros(stats.intra.shape, dtype=int)
            for k in others:  # work in proportion to the windows two instances share
                if (p := self.pair(w, k)) is not None:
                    total[p[0] - origin[0], p[1] - origin[1]] += p[2]
                    present[p[0] - origin[0], p[1] - origin[1]] += 1
            n = len(others)
            inter = np.where(present > 0, (total + (n - present) * stats.lonely) / n, stats.lonely)
            self._means[w] = inter, stats.intra
        return self._means[w]

    def half_map(self, w, ga_factor, overlap_hl):
        """§2.4 for this sign: float64 map of w on ``regions[w]``, in [1, 1+ga_factor]."""
        g, region, ranges = self.geoms[w], self.regions[w], self.contexts[w][1]
        inter, intra = self.means(w)
        if ranges is None:
            x = self._subtract_all(w, self._paint(inter, w), overlap_hl)
        else:  # nuclei: window ranges of the group's box, and only w's own intra map
            inter = _restrict(inter, g.win_origin, ranges[1])
            intra = _restrict(intra, g.win_origin, ranges[0])
            x = np.maximum(self._paint(inter, w) - self._paint(intra, w), 0)
        mag = _magnitude(g.cy, g.cx, region[0], region[1], self.height, self.width)
        x = x * mag / g.mag_max  # the original's operation order, for the last bits
        return x / (x.max() + NORM_EPS) * ga_factor + 1

    def _paint(self, grid, k, w=None):
        """Map of instance k's window grid on the region of w (default k)."""
        region = self.regions[k if w is None else w]
        return _paint(grid, self.geoms[k].win_origin, region, self.ws, self.height, self.width)

    def _subtract_all(self, w, x, overlap_hl):
        """isbi/chrom: subtract every intra map in annotation order, clamp, add the overlap bonus.

        Instances without an intra map (non-targets, empty masks) subtract 0 from an array that is already
        >= 0, and so do those whose painted region misses w's: both are skipped.
        """
        (r0, r1), (c0, c1) = self.regions[w]
        for k in sorted(self.geoms):
            if not _meet(self.regions[w], self.regions[k]):
                continue
            x = np.maximum(x - self._paint(self.means(k)[1], k, w), 0)
            if k != w:
                both = self.masks[w, r0:r1, c0:c1] & self.masks[k, r0:r1, c0:c1]
                if both.any():
                    x[both] += overlap_hl
        return x
