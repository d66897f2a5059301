"""Slow literal GAMM oracle, written straight from gains/METHOD.md §2 with Python loops over windows.

Independent of gains/gamm.py on purpose, the masks included: ``oracle_masks`` is the authors' rasteriser
itself (matplotlib ``Path.contains_points`` on every pixel centre of the image). np.std per window, windows
painted in ascending (i, j) order, the clamp loop of §2.4, the mean of the f = +1 and f = -1 halves.
Deviations of the project (§7.1–7.3) are applied: a target without another target in its context, or with an
empty mask, gets an all-ones map; a multi-polygon instance is the union of its polygons. Meant for images of a
few dozen pixels.
"""
import numpy as np
from matplotlib.path import Path as MplPath
from pycocotools import mask as mask_utils


def oracle_masks(segmentations, height, width):
    """bool [N, H, W] GAMM masks as the authors' scripts rasterise them (gains/METHOD.md §2).

    Polygon instances (lists of flat ``[x0, y0, x1, y1, ...]``): pixel (row m, col n) is inside iff
    ``Path(vertices).contains_points`` counts the point (x=n, y=m), tested on the whole H x W lattice (no bbox
    shortcut), OR-ed over the instance's polygons; polygons with fewer than 3 points are skipped. RLE dicts
    (compressed or uncompressed counts) are decoded by pycocotools.
    """
    rows, cols = np.mgrid[:height, :width]
    points = np.column_stack([cols.ravel(), rows.ravel()])  # (x, y) of every pixel centre, row-major
    out = np.zeros((len(segmentations), height, width), dtype=bool)
    for k, seg in enumerate(segmentations):
        if isinstance(seg, dict):
            rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
            if isinstance(rle["counts"], str):
                rle = dict(rle, counts=rle["counts"].encode("ascii"))
            out[k] = mask_utils.decode(rle).astype(bool)
            continue
        for flat in seg:
            if len(flat) >= 6:
                out[k] |= MplPath(np.reshape(flat, (-1, 2))).contains_points(points).reshape(height, width)
    return out


def oracle_fields(mask, sign):
    """(dir, mag): float64 [H, W] direction (-4 outside the mask) and gradient magnitude of §2.1."""
    height, width = mask.shape
    if not mask.any():
        return np.full((height, width), -4.0), np.zeros((height, width))
    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean(), cols.mean()
    m, n = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    z = (m - cy) ** 2 + (n - cx) ** 2
    gy, gx = np.gradient(z)
    direction = np.arctan2(gy, sign * gx)
    direction[~mask] = -4.0
    return direction, np.sqrt(gy ** 2 + gx ** 2)


def oracle_window_values(dirs, masks, a, others, variant, ws, intra_range=None, inter_range=None):
    """Window grids (O_a, I_a), each [H-ws+1, W-ws+1], by looping over every window (§2.2).

    ``intra_range`` / ``inter_range``: ((i0, i1), (j0, j1)) top-left ranges (nuclei); None = all windows.
    """
    height, width = masks[a].shape
    shape = (height - ws + 1, width - ws + 1)
    full = ((0, shape[0]), (0, shape[1]))
    intra_range, inter_range = intra_range or full, inter_range or full
    O, I = np.zeros(shape), np.zeros(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            win = (slice(i, i + ws), slice(j, j + ws))
            in_a = masks[a][win]
            if not in_a.any():
                continue
            da = dirs[a][win]
            d1, d2 = np.std(da), np.std(da[in_a])
            intra = d1 if variant == "chrom" else min(d1, d2)
            if _within(i, j, intra_range):
                O[i, j] = np.mean([intra for _ in others])
            if not _within(i, j, inter_range):
                continue
            terms = []
            for k in others:
                dk, in_k = dirs[k][win], masks[k][win]
                e1 = np.std(dk - da)
                if variant == "nuclei":
                    terms.append(e1)
                else:
                    terms.append(min(e1, np.std(np.concatenate([dk[in_k], da[in_a]]))))
            I[i, j] = np.mean(terms)
    return O, I


def _within(i, j, ranges):
    (i0, i1), (j0, j1) = ranges
    return i0 <= i < i1 and j0 <= j < j1


def oracle_paint(D, ws, height, width):
    """§2.3: paint each window's value over the whole window in ascending (i, j) order."""
    out = np.zeros((height, width))
    for i in range(D.shape[0]):
        for j in range(D.shape[1]):
            out[i:i + ws, j:j + ws] = D[i, j]
    return out


def oracle_normalise(X, mag, ga_factor):
    X = X * mag / np.max(mag)
    return X / (np.max(X) + 1e-7) * ga_factor + 1


def oracle_groups(boxes_xywh, ws):
    """§2.5 interaction groups, pair by pair."""
    expanded = [(x - ws, y - ws, x + w + ws, y + h + ws) for x, y, w, h in np.asarray(boxes_xywh, float)]
    groups = []
    for i, p in enumerate(expanded):
        group = [i]
        for j, q in enumerate(expanded):
            if j == i:
                continue
            overlap = p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]
            p_has_q = p[0] <= q[0] and p[1] <= q[1] and p[2] >= q[2] and p[3] >= q[3]
            q_has_p = q[0] <= p[0] and q[1] <= p[1] and q[2] >= p[2] and q[3] >= p[3]
            if overlap and not p_has_q and not q_has_p:
                group.append(j)
        groups.append(group)
    return groups


def oracle_ga_maps(masks, category_ids, boxes_xywh, *, variant, window_size, ga_factor, overlap_hl,
                   target_category_id):
    """float64 [N, H, W] GA maps, same contract as gains.gamm.compute_ga_maps."""
    masks = np.asarray(masks, dtype=bool)
    n, height, width = masks.shape
    ws = window_size
    out = np.ones((n, height, width))
    targets = [k for k in range(n) if category_ids[k] == target_category_id]
    if variant == "nuclei":
        groups = oracle_groups(boxes_xywh, ws)
        for w in targets:
            others = [k for k in groups[w][1:] if k in targets]
            if others and masks[w].any():
                out[w] = _oracle_nuclei_map(masks, boxes_xywh, groups[w], w, others, ws, ga_factor)
        return out
    if len(targets) < 2:
        return out
    halves = {w: [] for w in targets}
    for sign in (1, -1):
        fields = {k: oracle_fields(masks[k], sign) for k in targets}
        dirs = {k: f[0] for k, f in fields.items()}
        grids = {a: oracle_window_values(dirs, masks, a, [k for k in targets if k != a], variant, ws)
                 for a in targets}
        for w in (t for t in targets if masks[t].any()):
            X = oracle_paint(grids[w][1], ws, height, width)
            for k in range(n):
                O_k = oracle_paint(grids[k][0], ws, height, width) if k in targets else 0.0
                X = np.maximum(X - O_k, 0)
                both = masks[w] & masks[k]
                if k != w and k in targets and both.any():
                    X[both] += overlap_hl
            halves[w].append(oracle_normalise(X, fields[w][1], ga_factor))
    for w in targets:
        if masks[w].any():
            out[w] = (halves[w][0] + halves[w][1]) / 2
    return out


def _oracle_nuclei_map(masks, boxes_xywh, group, w, others, ws, ga_factor):
    height, width = masks[w].shape
    b = np.asarray(boxes_xywh, float)[group]
    x0, y0 = int(b[:, 0].min()), int(b[:, 1].min())
    gw = int((b[:, 0] + b[:, 2]).max() - b[:, 0].min())
    gh = int((b[:, 1] + b[:, 3]).max() - b[:, 1].min())
    intra_range = ((max(0, y0), min(height - ws + 1, y0 + gh)), (max(0, x0), min(width - ws + 1, x0 + gw)))
    inter_range = ((max(0, y0 - ws + 1), min(height - ws + 1, y0 + gh)),
                   (max(0, x0 - ws + 1), min(width - ws + 1, x0 + gw)))
    halves = []
    for sign in (1, -1):
        fields = {k: oracle_fields(masks[k], sign) for k in [w] + others}
        dirs = {k: f[0] for k, f in fields.items()}
        O, I = oracle_window_values(dirs, masks, w, others, "nuclei", ws, intra_range, inter_range)
        X = np.maximum(oracle_paint(I, ws, height, width) - oracle_paint(O, ws, height, width), 0)
        halves.append(oracle_normalise(X, fields[w][1], ga_factor))
    return (halves[0] + halves[1]) / 2
