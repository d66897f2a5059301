"""GAMM building blocks on crops (gains/METHOD.md §2): radial fields, window statistics, painting
window grids into pixels, and finding which boxes meet. Used by gains/gamm.py.

Every array here lives on one instance's neighbourhood (its mask bbox grown by ws-1) or on the windows
two instances share, never on the whole image: memory and time are O(support area), not O(H x W).

Conventions: pixel (row m, col n); a window is named by its top-left corner (i, j), 0 <= i <= H-ws,
0 <= j <= W-ws; a "region" is ((r0, r1), (c0, c1)), half-open pixel (or window-corner) ranges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SENTINEL = -4.0  # direction outside the mask; outside [-pi, pi] on purpose (original value)


# ------------------------------------------------------------------------------ radial fields
def gradients(cy, cx, rows, cols, height, width):
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


def magnitude(cy, cx, rows, cols, height, width):
    """float64 |grad z| on the block ``rows`` × ``cols``, bitwise as on the whole image."""
    gy, gx = gradients(cy, cx, rows, cols, height, width)
    return np.sqrt(gy ** 2 + gx ** 2)


_CORNER_SIDE_LIMIT = 1 << 15  # below it the rounding of z (~1e-8 at 4096 px) is far under the gap of 4


def max_magnitude(cy, cx, height, width):
    """max over the image of |grad z|, from 16 pixels: rows {0, 1, H-2, H-1} x cols {0, 1, W-2, W-1}.

    Why: in exact arithmetic gy depends on the row only (2(m-cy) inside, 1-2cy and 2(H-1-cy)-1 on the
    one-sided first/last rows) and gx on the column only, so |grad z|² = gy(m)² + gx(n)² is largest at a
    row maximising |gy| and a column maximising |gx|; |2(m-cy)| is convex, so those are the rows 0, 1, H-2,
    H-1. Any other row has gy² smaller by at least 4 (likewise columns), far more than the float rounding
    of z below 2^15 px a side, so the float maximum is the maximum over these pixels. Larger images fall
    back to the two outermost rows and columns (interior maxima lie on the interior block's border).
    """
    if max(height, width) > _CORNER_SIDE_LIMIT:
        bands = [((0, min(2, height)), (0, width)), ((max(0, height - 2), height), (0, width)),
                 ((0, height), (0, min(2, width))), ((0, height), (max(0, width - 2), width))]
    else:
        row_bands = [(0, min(2, height)), (max(0, height - 2), height)]
        col_bands = [(0, min(2, width)), (max(0, width - 2), width)]
        bands = [(r, c) for r in row_bands for c in col_bands]
    return max(magnitude(cy, cx, r, c, height, width).max() for r, c in bands)


@dataclass
class Geometry:
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

    def mask_crop(self, ws):
        """bool [y1-y0+1, x1-x0+1]: the mask on its bbox (a view of the pad)."""
        y0, y1, x0, x1 = self.bbox
        return self.inside_pad[ws - 1:ws + y1 - y0, ws - 1:ws + x1 - x0]

    def window_box(self):
        """Window corners of the window box as a region ((i0, i1), (j0, j1)), half-open."""
        (i0, j0), (nr, nc) = self.win_origin, self.counts.shape
        return (i0, i0 + nr), (j0, j0 + nc)


def geometry(crop, origin, ws, height, width):
    """Geometry of the mask that is ``crop`` (bool [h, w]) with top-left pixel ``origin`` = (x0, y0) and
    False elsewhere in an H x W image; None for an empty mask. Needs H, W >= ws."""
    rows, cols = np.nonzero(crop)
    if rows.size == 0:
        return None
    ox, oy = int(origin[0]), int(origin[1])
    rows, cols = rows + oy, cols + ox  # global int64 pixel indices: the centroid sums are exact
    y0, y1, x0, x1 = rows.min(), rows.max(), cols.min(), cols.max()
    pad_r0, pad_c0 = y0 - ws + 1, x0 - ws + 1
    inside = np.zeros((y1 - y0 + 2 * ws - 1, x1 - x0 + 2 * ws - 1), dtype=bool)
    inside[ws - 1:ws + y1 - y0, ws - 1:ws + x1 - x0] = crop[y0 - oy:y1 + 1 - oy, x0 - ox:x1 + 1 - ox]
    # Integer box sums are exact, unlike float cumulative sums.
    s = np.zeros((inside.shape[0] + 1, inside.shape[1] + 1), dtype=np.int64)
    s[1:, 1:] = inside.cumsum(0).cumsum(1)
    all_counts = s[ws:, ws:] - s[:-ws, ws:] - s[ws:, :-ws] + s[:-ws, :-ws]
    i0, i1 = max(0, pad_r0), min(height - ws, y1)
    j0, j1 = max(0, pad_c0), min(width - ws, x1)
    counts = all_counts[i0 - pad_r0:i1 + 1 - pad_r0, j0 - pad_c0:j1 + 1 - pad_c0]
    cy, cx = rows.sum() / rows.size, cols.sum() / cols.size
    return Geometry(cy, cx, (y0, y1, x0, x1), (pad_r0, pad_c0), inside, (i0, j0), counts,
                    max_magnitude(cy, cx, height, width))


def direction_pad(g, sign, ws, height, width):
    """float64 [ph, pw]: arctan2(gy, sign·gx) inside the mask, SENTINEL elsewhere, on the geometry's pad."""
    y0, y1, x0, x1 = g.bbox
    gy, gx = gradients(g.cy, g.cx, (y0, y1 + 1), (x0, x1 + 1), height, width)
    pad = np.full(g.inside_pad.shape, SENTINEL)
    box = (slice(ws - 1, ws + y1 - y0), slice(ws - 1, ws + x1 - x0))
    inside = g.inside_pad[box]
    pad[box][inside] = np.arctan2(gy, sign * gx)[inside]
    return pad


# -------------------------------------------------------------------------- window statistics
BLOCK = 1 << 21  # gathered values per block of windows: every temporary stays under ~16 MB for any ws


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
    """Concatenated fn(slice of windows) over blocks of <= BLOCK gathered values (n > 0 windows)."""
    step = max(1, BLOCK // (ws * ws))
    return np.concatenate([fn(slice(s, s + step)) for s in range(0, n, step)])


@dataclass
class Intra:
    """Window statistics of one instance for one sign; grids cover its window box, 0 off the mask."""
    dirs: np.ndarray    # float64 [ph, pw] direction pad
    intra: np.ndarray   # float64 [nr, nc] intra value: d1 (chrom) or min(d1, d2)
    lonely: np.ndarray  # float64 [nr, nc] inter term where the other instance has no pixel in the window


def intra_stats(g, sign, variant, ws, height, width):
    dirs = direction_pad(g, sign, ws, height, width)
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
    return Intra(dirs, intra, lonely)


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


def pair_terms(ga, gk, sa, sk, variant, ws):
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
def paint_extent(corners, ws, size):
    """Pixels (start, stop) whose window along one axis lies in the corner range ``corners`` (start, stop).

    A pixel takes the window whose top-left corner it is, clamped to the last window size-ws (§2.3): so
    the range itself, plus the strip up to the image edge when it holds the last window. Empty -> (0, 0).
    """
    start, stop = corners
    if stop <= start:
        return 0, 0
    return start, size if stop - 1 == size - ws else stop


def painted_region(g, ws, height, width):
    """Pixels where Map(D) of a window-box grid can be non-zero: rows from max(0, y0-ws+1) to y1, or to
    the bottom edge when y1 >= H-ws (the window box then holds the last window row); columns likewise.
    It contains every pixel of the mask. ((r0, r1), (c0, c1)) half-open."""
    rows, cols = g.window_box()
    return paint_extent(rows, ws, height), paint_extent(cols, ws, width)


def paint(grid, origin, region, ws, height, width):
    """Map(D) on a pixel region: pixel (y, x) = D[min(y, H-ws), min(x, W-ws)], D = ``grid`` placed at window
    corner ``origin`` and 0 elsewhere. Returns float64 [r1-r0, c1-c0]."""
    (r0, r1), (c0, c1) = region
    ri = np.minimum(np.arange(r0, r1), height - ws) - origin[0]
    ci = np.minimum(np.arange(c0, c1), width - ws) - origin[1]
    ok_r, ok_c = (ri >= 0) & (ri < grid.shape[0]), (ci >= 0) & (ci < grid.shape[1])
    out = np.zeros((r1 - r0, c1 - c0))
    out[np.ix_(ok_r, ok_c)] = grid[np.ix_(ri[ok_r], ci[ok_c])]
    return out


def restrict(grid, origin, ranges):
    """Zero a window grid outside the top-left ranges ((r0, r1), (c0, c1)) of the nuclei variant."""
    (r0, r1), (c0, c1) = ranges
    keep = np.zeros(grid.shape, dtype=bool)
    keep[max(0, r0 - origin[0]):max(0, r1 - origin[0]), max(0, c0 - origin[1]):max(0, c1 - origin[1])] = True
    return np.where(keep, grid, 0.0)


def intersect(a, b):
    """Intersection of two regions ((r0, r1), (c0, c1)); may be empty (stop <= start)."""
    return tuple((max(p[0], q[0]), min(p[1], q[1])) for p, q in zip(a, b))


# ------------------------------------------------------------------------------- which boxes meet
def overlapping_pairs(x0, y0, x1, y1):
    """All pairs of boxes whose interiors meet: x0[i] < x1[j], x0[j] < x1[i] and likewise in y.

    Args: four float or int arrays [N] (finite; non-finite boxes meet nothing).
    Returns: (i, j) int64 arrays with i < j, sorted by (i, j).
    Why not an N x N test: boxes are binned into square cells of about the mean box size, pairs are
    only formed within a cell, so time and memory are O(N + cells covered + pairs in shared cells).
    """
    x0, y0, x1, y1 = (np.asarray(v, dtype=np.float64).ravel() for v in (x0, y0, x1, y1))
    n = x0.size
    none = np.zeros(0, np.int64)
    if n < 2:
        return none, none
    ok = np.isfinite(x0) & np.isfinite(y0) & np.isfinite(x1) & np.isfinite(y1)
    lx, hx = np.where(ok, np.minimum(x0, x1), 0), np.where(ok, np.maximum(x0, x1), 0)
    ly, hy = np.where(ok, np.minimum(y0, y1), 0), np.where(ok, np.maximum(y0, y1), 0)
    side = max(1.0, float(np.sqrt(np.mean((hx - lx) * (hy - ly)))))
    # Cells of the closed box: boxes whose interiors meet share at least one cell.
    cx0, cx1 = (np.floor(v / side).astype(np.int64) for v in (lx, hx))
    cy0, cy1 = (np.floor(v / side).astype(np.int64) for v in (ly, hy))
    nx = cx1 - cx0 + 1
    cells = np.where(ok, nx * (cy1 - cy0 + 1), 0)
    owner = np.repeat(np.arange(n), cells)
    t = np.arange(owner.size) - np.repeat(np.cumsum(cells) - cells, cells)
    cx, cy = cx0[owner] + t % nx[owner], cy0[owner] + t // nx[owner]
    key = (cy - cy0.min()) * (cx1.max() - cx0.min() + 1) + (cx - cx0.min())
    order = np.argsort(key, kind="stable")
    key, owner = key[order], owner[order]
    # Every entry pairs with the later entries of its cell.
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    stops = np.r_[starts[1:], key.size]
    later = np.repeat(stops, stops - starts) - np.arange(key.size) - 1
    e = np.repeat(np.arange(key.size), later)
    f = e + 1 + np.arange(e.size) - np.repeat(np.cumsum(later) - later, later)
    a, b = owner[e], owner[f]
    code = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    i, j = code // n, code % n
    meet = (x0[i] < x1[j]) & (x0[j] < x1[i]) & (y0[i] < y1[j]) & (y0[j] < y1[i])
    return i[meet], j[meet]


def neighbours(n, i, j):
    """Adjacency lists from pairs: N sorted lists, list k holds every partner of k (both directions)."""
    src, dst = np.concatenate([i, j]), np.concatenate([j, i])
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    bounds = np.searchsorted(src, np.arange(n + 1))
    return [dst[bounds[k]:bounds[k + 1]].tolist() for k in range(n)]
