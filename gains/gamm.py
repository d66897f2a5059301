"""Gradient Anomaly Mapping Module (GAMM): one GA map per annotation, GAINS_METHOD.md §2.

The authors' scripts loop over every window of the image in Python (about a minute for one 512×512 image).
This module computes the same definition in float64 numpy, but only where a value can be non-zero:

- window statistics are evaluated only at windows that contain a pixel of the instance, and pair
  statistics only at windows that contain pixels of both instances; everywhere else the value is known
  exactly (0, or the "no neighbour" value below);
- every statistic is a two-pass mean/std over the ws² values of its own window (no cumulative-sum
  differencing), so values carry ~1e-16 relative noise. That matters: where the original anomaly is
  exactly 0, the final normalisation X / (max X + 1e-7) amplifies any noise;
- a window without a pixel of the neighbour k has dir_k == -4 everywhere, so e1 == d1 and e2 == d2
  mathematically; we use the intra numbers themselves there, so I == O exactly as in the original maths.

Conventions: images are H×W, pixel (row m, col n); a window is named by its top-left corner (i, j) with
0 <= i <= H-ws, 0 <= j <= W-ws; boxes in COCO xywh pixels. Deviations from the original (§7.1–7.3): a
target without another target in its context (single target image, isolated nucleus) or with an empty
mask gets an all-ones map; multi-polygon instances are the union of their polygons.
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
    """Interaction groups of the nuclei variant (§2.5).

    Each COCO box is expanded by ``window_size`` on every side (not clipped to the image); i and j interact
    when the expanded boxes overlap with positive area and neither contains the other.

    Args:
        boxes_xywh: float [N, 4] COCO boxes. height, width: image size (validated only; the original's
            expanded boxes are not clipped).
    Returns:
        N lists of indices: group of i = [i] followed by every interacting j in index order.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"bad image size {(height, width)}")
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
    """Sign-independent data of one non-empty instance mask.

    The "pad" is the mask's bounding box grown by ws-1 on every side (it may stick out of the image): it
    holds every pixel of every window that touches the mask. The "window box" is the range of top-left
    corners (clipped to the image) of those windows.
    """
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


@dataclass
class _Intra:
    """Per-window intra statistics of one instance for one sign, on its window box."""
    dirs: np.ndarray      # direction pad
    windows: tuple        # (ii, jj) global top-left corners of the windows that touch the mask
    intra: np.ndarray     # grid [nr, nc]: O value (d1 or min(d1, d2)), 0 off the mask
    lonely: np.ndarray    # grid [nr, nc]: the inter term of a window without neighbour pixels


def _intra(g, sign, variant, ws, height, width):
    dirs = _direction_pad(g, sign, ws, height, width)
    li, lj = np.nonzero(g.counts)
    ii, jj = li + g.win_origin[0], lj + g.win_origin[1]
    values = _gather(dirs, g.pad_origin, ii, jj, ws)
    d1 = _std(values)
    d2 = _masked_std(values, _gather(g.inside_pad, g.pad_origin, ii, jj, ws))
    # Without neighbour pixels dir_k == SENTINEL in the window: e1 == d1, e2 == d2 exactly in maths;
    # reusing these very numbers keeps I == O bit for bit where the original anomaly is 0.
    intra, lonely = np.zeros(g.counts.shape), np.zeros(g.counts.shape)
    intra[li, lj] = d1 if variant == "chrom" else np.minimum(d1, d2)
    lonely[li, lj] = d1 if variant == "nuclei" else np.minimum(d1, d2)
    return _Intra(dirs, (ii, jj), intra, lonely)


def _pair_terms(ga, gk, sa, sk, variant, ws):
    """Inter term of instances a and k at the windows holding pixels of both (symmetric in a, k).

    Returns (ii, jj, term) with global window corners, or None when no window holds both.
    """
    r0, c0 = max(ga.win_origin[0], gk.win_origin[0]), max(ga.win_origin[1], gk.win_origin[1])
    r1 = min(ga.win_origin[0] + ga.counts.shape[0], gk.win_origin[0] + gk.counts.shape[0])
    c1 = min(ga.win_origin[1] + ga.counts.shape[1], gk.win_origin[1] + gk.counts.shape[1])
    if r1 <= r0 or c1 <= c0:  # window-dilated boxes do not meet
        return None

    def crop(g):
        return g.counts[r0 - g.win_origin[0]:r1 - g.win_origin[0], c0 - g.win_origin[1]:c1 - g.win_origin[1]]

    li, lj = np.nonzero((crop(ga) > 0) & (crop(gk) > 0))
    if li.size == 0:
        return None
    ii, jj = li + r0, lj + c0
    va, vk = _gather(sa.dirs, ga.pad_origin, ii, jj, ws), _gather(sk.dirs, gk.pad_origin, ii, jj, ws)
    term = _std(vk - va)
    if variant != "nuclei":
        inside = np.concatenate([_gather(gk.inside_pad, gk.pad_origin, ii, jj, ws),
                                 _gather(ga.inside_pad, ga.pad_origin, ii, jj, ws)], axis=1)
        term = np.minimum(term, _masked_std(np.concatenate([vk, va], axis=1), inside))
    return ii, jj, term


# ---------------------------------------------------------------------- window maps to pixels
def _painted_region(g, ws, height, width):
    """Pixels where Map(D) of a window-box grid can be non-zero, as ((r0, r1), (c0, c1)) half-open.

    A pixel takes the window whose top-left corner it is, clamped to the last window (§2.3), so the last
    window row/column also covers the image's bottom/right strip.
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


def _meet(a, b):
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
    if variant == "nuclei" and (boxes_xywh is None or np.shape(boxes_xywh) != (n, 4)):
        raise ValueError(f"the nuclei variant needs boxes_xywh of shape ({n}, 4)")
    out = np.ones((n, height, width))
    if n == 0 or height < max(ws, 2) or width < max(ws, 2):
        return out
    targets = [k for k in range(n) if category_ids[k] == target_category_id]
    geoms = {k: _geometry(masks[k], ws) for k in targets if masks[k].any()}
    contexts = _contexts(variant, targets, geoms, boxes_xywh, ws, height, width)
    regions = {k: _painted_region(g, ws, height, width) for k, g in geoms.items()}
    args = (masks, geoms, contexts, regions, variant, ws, float(ga_factor), float(overlap_hl))
    plus, minus = _signed_maps(+1, *args), _signed_maps(-1, *args)
    for w in contexts:
        (r0, r1), (c0, c1) = regions[w]
        out[w, r0:r1, c0:c1] = (plus[w] + minus[w]) / 2
    return out


def _contexts(variant, targets, geoms, boxes_xywh, ws, height, width):
    """w -> (other target instances averaged over, nuclei window ranges or None) for maps worth computing."""
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


def _signed_maps(sign, masks, geoms, contexts, regions, variant, ws, ga_factor, overlap_hl):
    """w -> normalised half map (one sign f) on ``regions[w]``, for every w in ``contexts``."""
    height, width = masks.shape[1:]
    stats = {k: _intra(g, sign, variant, ws, height, width) for k, g in geoms.items()}
    pairs = {}

    def pair(a, k):
        key = (min(a, k), max(a, k))
        if key not in pairs:
            lo, hi = key
            pairs[key] = _pair_terms(geoms[lo], geoms[hi], stats[lo], stats[hi], variant, ws) \
                if lo in geoms and hi in geoms else None
        return pairs[key]

    def mean_over(w, others):
        """I and O grids of w: the original averages one value per other target, accumulated in order."""
        origin, inter, intra = geoms[w].win_origin, 0.0, 0.0
        for k in others:
            term = stats[w].lonely.copy()
            if (p := pair(w, k)) is not None:
                term[p[0] - origin[0], p[1] - origin[1]] = p[2]
            inter = inter + term
            intra = intra + stats[w].intra
        return inter / len(others), intra / len(others)

    means = {w: mean_over(w, others) for w, (others, _) in contexts.items()}
    halves = {}
    for w, (others, ranges) in contexts.items():
        g, region = geoms[w], regions[w]
        inter, intra = means[w]
        if ranges is not None:  # nuclei: group-box window ranges, own intra map only
            inter = _restrict(inter, g.win_origin, ranges[1])
            intra = _restrict(intra, g.win_origin, ranges[0])
            x = _paint(inter, g.win_origin, region, ws, height, width)
            x = np.maximum(x - _paint(intra, g.win_origin, region, ws, height, width), 0)
        else:
            x = _subtract_all(w, _paint(inter, g.win_origin, region, ws, height, width), masks, geoms,
                              means, regions, ws, overlap_hl)
        halves[w] = _normalise(x, g, region, ga_factor, height, width)
    return halves


def _subtract_all(w, x, masks, geoms, means, regions, ws, overlap_hl):
    """§2.4 loop of isbi/chrom: subtract every intra map in annotation order, clamp, add overlap bonus.

    Instances without an intra map (non-targets, empty masks) subtract 0 from an array that is already
    >= 0, and those whose painted region misses w's subtract 0 there: both are skipped.
    """
    height, width = masks.shape[1:]
    region = regions[w]
    (r0, r1), (c0, c1) = region
    for k in sorted(geoms):
        if not _meet(region, regions[k]):
            continue
        x = np.maximum(x - _paint(means[k][1], geoms[k].win_origin, region, ws, height, width), 0)
        if k != w:
            both = masks[w, r0:r1, c0:c1] & masks[k, r0:r1, c0:c1]
            if both.any():
                x[both] += overlap_hl
    return x


def _normalise(x, g, region, ga_factor, height, width):
    """Weight by the field magnitude and scale into [1, 1+ga_factor], in the original's operation order."""
    mag = _magnitude(g.cy, g.cx, region[0], region[1], height, width)
    x = x * mag / g.mag_max
    return x / (x.max() + NORM_EPS) * ga_factor + 1
