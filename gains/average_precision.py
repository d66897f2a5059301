"""Native COCO average precision for masks ('segm') and boxes ('bbox'), equal to pycocotools COCOeval.

The definitions are those of gains/gains/METRICS.md §3; the tie rules, the thresholds and the
accumulation order reproduce pycocotools 2.0.x so that every summary statistic agrees to rounding noise.
Nothing here calls pycocotools: masks become runs (`gains.mask_runs`) whose intersections are exact
integer pixel counts; IoUs are float64 divisions of those counts, as in pycocotools' C code.

Per-image inputs (`gt_per_image[i]` and `det_per_image[i]` describe the same image):

gt dict
    image_id     int, optional (default: the list index). Images are accumulated in sorted id order,
                 which decides score ties across images.
    labels       int [G] category ids (any integers; the ones listed in `category_ids` are evaluated).
    masks        bool/int [G,H,W] or [G,1,H,W] (numpy or torch, any device; nonzero = inside; C-contiguous
                 bool is the fast path); needed for 'segm'. Float masks are refused: threshold them first.
                 Or, without any full-size array (large images): a `MaskRuns` of G masks, a list of G COCO
                 RLE dicts, or a `gains.instances.CropMasks`; the metrics are identical. GT and detections
                 of one image must both be dense or both be runs (RLE / MaskRuns / CropMasks).
    boxes_xywh   float [G,4] COCO boxes (x, y, width, height), absolute pixels; needed for 'bbox'.
    iscrowd      bool/int [G], optional (default 0). Crowd regions are ignored and may absorb detections.
    areas        float [G], optional: the COCO 'area' field, used only for the area ranges. Default: the
                 mask pixel count, or width*height for box-only input.
det dict
    labels [D] int, scores [D] float, masks [D,H,W] (segm), boxes_xywh [D,4] (bbox). A detection's area
    (for the area ranges) is its mask pixel count for 'segm' and width*height for 'bbox'.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mask_runs import MaskRuns, empty_runs, runs_from_dense, runs_from_rles

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # pycocotools' array: entry 8 is 0.8999999999999999
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
# Inclusive on both ends, as pycocotools compares `area < lo or area > hi`.
AREA_RANGES = ((0.0, 1e10), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e10))
AREA_NAMES = ("all", "small", "medium", "large")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class ImageInstances:
    """One image, normalised; masks as `MaskRuns` (GT and detections in the same pixel order)."""

    image_id: int
    gt_labels: np.ndarray  # int64 [G]
    gt_crowd: np.ndarray  # bool [G]
    gt_areas: np.ndarray  # float64 [G], the 'area' field (area ranges only)
    gt_masks: MaskRuns | None  # G masks
    gt_boxes: np.ndarray | None  # float64 [G, 4] xywh
    det_labels: np.ndarray  # int64 [D]
    det_scores: np.ndarray  # float64 [D]
    det_masks: MaskRuns | None  # D masks
    det_boxes: np.ndarray | None  # float64 [D, 4] xywh


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _mask_runs(masks, n: int, what: str) -> MaskRuns:
    """The masks of one side of an image -> MaskRuns. Accepted: dense [N,H,W] or [N,1,H,W] bool/int masks
    (row-major runs; floats are refused: threshold them), a `MaskRuns` of N masks (used as it is), a list
    of N COCO RLE dicts of one size (column-major runs, never decoded), or an object with `to_rles()` such
    as `gains.instances.CropMasks`. Dense and run inputs give identical metrics; GT and detections of one
    image must still share a pixel order (both dense, or both RLE / runs)."""
    if isinstance(masks, MaskRuns):
        if len(masks) != n:
            raise ValueError(f"{what}: {len(masks)} masks in the MaskRuns, expected {n}")
        return masks
    if hasattr(masks, "to_rles") and hasattr(masks, "image_size"):  # CropMasks
        h, w = masks.image_size
        masks = runs_from_rles(masks.to_rles(), h, w)
        return _mask_runs(masks, n, what)
    if isinstance(masks, (list, tuple)) and all(isinstance(r, dict) for r in masks):
        if not masks:
            if n:
                raise ValueError(f"{what}: an empty RLE list for {n} instances")
            return empty_runs(1, 0)  # no pixel order to share: never compared with anything
        sizes = {tuple(int(v) for v in r.get("size", ())) for r in masks}
        if len(sizes) != 1 or len(next(iter(sizes))) != 2:
            raise ValueError(f"{what}: the RLEs need one common 'size' [H, W], got {sorted(sizes)}")
        h, w = next(iter(sizes))
        return _mask_runs(runs_from_rles(list(masks), h, w), n, what)
    m = _numpy(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3 or m.shape[0] != n:
        raise ValueError(f"{what}: masks must have shape [{n},H,W], got {tuple(m.shape)}")
    if m.dtype.kind == "f":
        raise ValueError(f"{what}: masks are floating point; binarise them (e.g. probs > 0.5) first")
    return runs_from_dense(m.reshape(n, m.shape[1] * m.shape[2]), line=m.shape[2])


def _vector(d: dict, key: str, n: int, dtype, default, what: str) -> np.ndarray:
    if d.get(key) is None:
        return np.full(n, default, dtype=dtype)
    v = _numpy(d[key]).astype(dtype).reshape(-1)
    if len(v) != n:
        raise ValueError(f"{what}: '{key}' has {len(v)} entries, expected {n}")
    return v


def _boxes(d: dict, n: int, what: str):
    if d.get("boxes_xywh") is None:
        return None
    b = _numpy(d["boxes_xywh"]).astype(np.float64).reshape(-1, 4)
    if len(b) != n:
        raise ValueError(f"{what}: 'boxes_xywh' has {len(b)} rows, expected {n}")
    return b


def normalize_images(gt_per_image, det_per_image) -> list[ImageInstances]:
    """Validate the per-image dicts (module docstring) and return them as `ImageInstances`."""
    if len(gt_per_image) != len(det_per_image):
        raise ValueError(f"{len(gt_per_image)} ground-truth images but {len(det_per_image)} detection images")
    images = []
    for i, (gt, det) in enumerate(zip(gt_per_image, det_per_image)):
        image_id = int(gt.get("image_id", i))
        what = f"image {image_id}"
        gl = _numpy(gt["labels"]).astype(np.int64).reshape(-1)
        dl = _numpy(det["labels"]).astype(np.int64).reshape(-1)
        gm = None if gt.get("masks") is None else _mask_runs(gt["masks"], len(gl), what + " GT")
        dm = None if det.get("masks") is None else _mask_runs(det["masks"], len(dl), what + " detections")
        if len(gl) and len(dl) and gm is not None and dm is not None and \
                (gm.size, gm.line) != (dm.size, dm.line):
            raise ValueError(f"{what}: GT and detection masks have different sizes or pixel orders "
                             f"({gm.size} px in lines of {gm.line} vs {dm.size} px in lines of {dm.line}); "
                             "give both as dense arrays or both as RLEs / MaskRuns of the image's size")
        gb, db = _boxes(gt, len(gl), what + " GT"), _boxes(det, len(dl), what + " detections")
        if gt.get("areas") is not None:
            areas = _vector(gt, "areas", len(gl), np.float64, 0.0, what)
        elif gm is not None:
            areas = gm.areas().astype(np.float64)
        elif gb is not None:
            areas = gb[:, 2] * gb[:, 3]
        else:
            raise ValueError(f"{what}: GT needs 'masks' or 'boxes_xywh'")
        images.append(ImageInstances(
            image_id, gl, _vector(gt, "iscrowd", len(gl), bool, False, what), areas, gm, gb,
            dl, _vector(det, "scores", len(dl), np.float64, np.nan, what), dm, db))
        if np.isnan(images[-1].det_scores).any():
            raise ValueError(f"{what}: detections need finite 'scores'")
    ids = [im.image_id for im in images]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate image ids in gt_per_image; give every image a unique 'image_id'")
    return sorted(images, key=lambda im: im.image_id)


# ----------------------------------------------------------------------------------------- overlaps
def pairwise_intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact |a_i ∩ b_j| for dense 0/1 masks a [N,P], b [M,P] -> int64 [N,M].

    The dense reference for `MaskRuns.intersections` (which the metrics use). A BLAS product is exact
    here: float32 holds every integer below 2**24, so for P below that no partial sum can round; larger
    images use float64. Never fp16/bf16/TF32.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.int64)
    dtype = np.float32 if a.shape[1] < 2**24 else np.float64
    return (a.astype(dtype) @ b.astype(dtype).T).astype(np.int64)


def mask_iou(inter: np.ndarray, det_area: np.ndarray, gt_area: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU float64 [D,G] from exact counts; a crowd GT's IoU is |d∩g|/|d| (pycocotools); 0/0 -> 0."""
    union = np.where(crowd[None, :], det_area[:, None], det_area[:, None] + gt_area[None, :] - inter)
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def box_iou_xywh(det: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """Box IoU float64 [D,G] for xywh boxes, with the operation order of pycocotools' C code so that
    results agree bit for bit; crowd GT -> intersection / detection area."""
    dx, dy, dw, dh = (c[:, None] for c in det.T)
    gx, gy, gw, gh = (c[None, :] for c in gt.T)
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    da, ga = dw * dh, gw * gh
    union = np.where(crowd[None, :], da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def score_order(scores: np.ndarray) -> np.ndarray:
    """Indices sorting by descending score; stable (mergesort), so ties keep their input order."""
    return np.argsort(-scores, kind="mergesort")


@dataclass
class CategoryOverlap:
    """One (image, category): GTs in input order, detections in score order (stable)."""

    gt_index: np.ndarray  # int64 [G] rows of the image's GT arrays
    det_index: np.ndarray  # int64 [D] rows of the image's detection arrays, by descending score
    inter: np.ndarray  # int64 [D, G] pixel intersections
    gt_pixels: np.ndarray  # int64 [G]
    det_pixels: np.ndarray  # int64 [D]


def category_overlaps(im: ImageInstances, max_dets: int | None) -> dict[int, CategoryOverlap]:
    """Per category present in the image: exact mask intersections of its GTs with its top detections."""
    out = {}
    for c in np.union1d(im.gt_labels, im.det_labels).tolist():
        gi = np.flatnonzero(im.gt_labels == c)
        di = np.flatnonzero(im.det_labels == c)
        di = di[score_order(im.det_scores[di])][:max_dets]
        if len(gi) == 0 or len(di) == 0:  # nothing to intersect; the other side's masks may be absent
            gp = im.gt_masks.take(gi).areas() if len(gi) else np.zeros(0, np.int64)
            dp = im.det_masks.take(di).areas() if len(di) else np.zeros(0, np.int64)
            out[c] = CategoryOverlap(gi, di, np.zeros((len(di), len(gi)), np.int64), gp, dp)
            continue
        gm, dm = im.gt_masks.take(gi), im.det_masks.take(di)
        out[c] = CategoryOverlap(gi, di, dm.intersections(gm), gm.areas(), dm.areas())
    return out


# ----------------------------------------------------------------------------------------- matching
@dataclass
class _Pair:
    """Inputs of the greedy matching of one (image, category), detections in score order."""

    k: int  # category index
    ious: np.ndarray  # float64 [D, G]
    crowd: np.ndarray  # bool [G]
    gt_area: np.ndarray  # float64 [G] (area field)
    det_area: np.ndarray  # float64 [D]
    scores: np.ndarray  # float64 [D]


def _in_ranges(area: np.ndarray) -> np.ndarray:
    """bool [A, N]: area inside each COCO area range (inclusive)."""
    lo = np.array([r[0] for r in AREA_RANGES])[:, None]
    hi = np.array([r[1] for r in AREA_RANGES])[:, None]
    return ~((area[None, :] < lo) | (area[None, :] > hi))


def _last_argmax(values: np.ndarray) -> np.ndarray:
    """Index of the LAST maximum along the last axis (pycocotools lets a later GT win a tie)."""
    n = values.shape[-1]
    return n - 1 - np.argmax(values[..., ::-1], axis=-1)


def _match_chunk(pairs: list[_Pair]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Greedy COCO matching of several pairs at once, vectorised over pairs, area ranges and thresholds.

    Detections are visited in score order; at threshold t each takes the best still-free GT with IoU >= t,
    preferring non-ignored GTs (pycocotools sorts ignored GTs last and stops there once it holds a
    regular one); crowd GTs stay free. Detections and GTs without any IoU >= 0.5 can neither match nor
    block anything, so they are left out of the loop. Returns per pair (matched, on_ignored) bool [A,T,D].
    """
    A, T = len(AREA_RANGES), len(IOU_THRESHOLDS)
    thr = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, None, :, None]
    can = [p.ious >= thr.min() for p in pairs]
    keep_d = [np.flatnonzero(c.any(axis=1)) for c in can]
    keep_g = [np.flatnonzero(c.any(axis=0)) for c in can]
    P, D, G = len(pairs), max(map(len, keep_d)), max(max(map(len, keep_g)), 1)
    ious = np.full((P, D, G), -1.0)  # padding never reaches a threshold
    ignored = np.ones((P, A, 1, G), dtype=bool)
    crowd = np.zeros((P, 1, 1, G), dtype=bool)
    for i, (p, d, g) in enumerate(zip(pairs, keep_d, keep_g)):
        ious[i, : len(d), : len(g)] = p.ious[np.ix_(d, g)]
        ignored[i, :, 0, : len(g)] = (p.crowd[None, :] | ~_in_ranges(p.gt_area))[:, g]
        crowd[i, 0, 0, : len(g)] = p.crowd[g]
    taken = np.zeros((P, A, T, G), dtype=bool)
    matched = np.zeros((P, A, T, D), dtype=bool)
    on_ignored = np.zeros((P, A, T, D), dtype=bool)
    p_idx, a_idx, t_idx = np.indices((P, A, T))
    for j in range(D):
        row = ious[:, j, :][:, None, None, :]  # [P,1,1,G]
        ok = (row >= thr) & (~taken | crowd)
        regular, extra = ok & ~ignored, ok & ignored
        has_regular, has_extra = regular.any(-1), extra.any(-1)
        best = np.where(has_regular, _last_argmax(np.where(regular, row, -1.0)),
                        _last_argmax(np.where(extra, row, -1.0)))
        hit = has_regular | has_extra
        matched[..., j] = hit
        on_ignored[..., j] = hit & ~has_regular
        taken[p_idx[hit], a_idx[hit], t_idx[hit], best[hit]] = True
    out = []
    for i, (p, d) in enumerate(zip(pairs, keep_d)):
        m, o = (np.zeros((A, T, len(p.scores)), dtype=bool) for _ in range(2))
        m[..., d], o[..., d] = matched[i, ..., : len(d)], on_ignored[i, ..., : len(d)]
        out.append((m, o))
    return out


def _match_all(pairs: list[_Pair], budget: int = 1 << 22):
    """Run `_match_chunk` over pairs grouped by size so padding stays bounded; returns per pair
    (det_matched [A,T,D], det_ignored [A,T,D], gt_ignored [A,G])."""
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i].crowd), len(pairs[i].scores)))
    results = [None] * len(pairs)
    start = 0
    while start < len(order):
        stop, D, G = start, 0, 1
        while stop < len(order):
            p = pairs[order[stop]]
            D2, G2 = max(D, len(p.scores)), max(G, len(p.crowd))
            if stop > start and (stop - start + 1) * D2 * G2 * 40 > budget:  # 40 = A * T
                break
            D, G, stop = D2, G2, stop + 1
        chunk = [pairs[i] for i in order[start:stop]]
        for i, (p, (dm, dig)) in enumerate(zip(chunk, _match_chunk(chunk))):
            # unmatched detections outside the area range do not count as false positives
            dig = dig | (~dm & ~_in_ranges(p.det_area)[:, None, :])
            results[order[start + i]] = (dm, dig, p.crowd[None, :] | ~_in_ranges(p.gt_area))
        start = stop
    return results


# ----------------------------------------------------------------------------------------- accumulate
def _precision_recall(pairs, matches, num_categories: int, max_dets):
    """precision float64 [T,R,K,A,M] and recall [T,K,A,M], -1 where a category has no GT (pycocotools)."""
    T, R, A, M = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES), len(max_dets)
    precision = -np.ones((T, R, num_categories, A, M))
    recall = -np.ones((T, num_categories, A, M))
    by_cat = [[] for _ in range(num_categories)]
    for p, m in zip(pairs, matches):  # pairs are in sorted image order
        by_cat[p.k].append((p, m))
    for k, items in enumerate(by_cat):
        if not items:
            continue
        scores = np.concatenate([p.scores for p, _ in items])
        rank = np.concatenate([np.arange(len(p.scores)) for p, _ in items])
        dtm = np.concatenate([m[0] for _, m in items], axis=-1)  # [A,T,N]
        dtig = np.concatenate([m[1] for _, m in items], axis=-1)
        npig = np.count_nonzero(~np.concatenate([m[2] for _, m in items], axis=-1), axis=-1)  # [A]
        for mi, max_det in enumerate(max_dets):
            keep = rank < max_det
            order = score_order(scores[keep])
            tps = (dtm[..., keep] & ~dtig[..., keep])[..., order]
            fps = (~dtm[..., keep] & ~dtig[..., keep])[..., order]
            tp_sum = np.cumsum(tps, axis=-1).astype(float)
            fp_sum = np.cumsum(fps, axis=-1).astype(float)
            for a in range(A):
                if npig[a] == 0:
                    continue
                if tp_sum.shape[-1] == 0:  # GT but no detection: recall and precision 0
                    recall[:, k, a, mi] = 0.0
                    precision[:, :, k, a, mi] = 0.0
                    continue
                rc = tp_sum[a] / npig[a]  # [T, N]
                pr = tp_sum[a] / (fp_sum[a] + tp_sum[a] + np.spacing(1))
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # monotone from the right
                recall[:, k, a, mi] = rc[:, -1]
                for t in range(T):
                    idx = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
                    # recall levels never reached get precision 0
                    n = pr.shape[1]
                    precision[t, :, k, a, mi] = np.where(idx < n, pr[t, np.minimum(idx, n - 1)], 0.0)
    return precision, recall


def _mean_valid(x: np.ndarray) -> float:
    v = x[x > -1]
    return float(np.mean(v)) if v.size else -1.0


def summarize(precision: np.ndarray, recall: np.ndarray, max_dets) -> list[float]:
    """The 12 COCOeval.stats from precision [T,R,K,A,M] and recall [T,K,A,M], every one at the largest of
    `max_dets` except AR1 / AR10 (`stat_names(max_dets)` names them).

    One deliberate difference from pycocotools' `summarize()`: its first stat (AP@[.5:.95]) is hard-coded
    to maxDets=100 and prints -1 whenever 100 is not in maxDets, while its other AP stats use the largest
    maxDets. Here stats[0] is AP at the largest maxDets too: the mean of pycocotools' own
    `eval["precision"][:, :, :, 0, -1]`, i.e. exactly its number whenever maxDets ends in 100.
    """
    last = max_dets[2]

    def ap(iou=None, area=0):
        s = precision[..., area, list(max_dets).index(last)]
        return _mean_valid(s if iou is None else s[np.where(IOU_THRESHOLDS == iou)[0]])

    def ar(area=0, max_det=last):
        return _mean_valid(recall[..., area, list(max_dets).index(max_det)])

    return [ap(), ap(0.5), ap(0.75), ap(None, 1), ap(None, 2), ap(None, 3), ar(0, max_dets[0]),
            ar(0, max_dets[1]), ar(0), ar(1), ar(2), ar(3)]


def stat_names(max_dets) -> tuple[str, ...]:
    """Names of the 12 stats for these maxDets: STAT_NAMES with the three AR@maxDets named by their caps,
    e.g. (1, 10, 1000) -> ..., "AR1", "AR10", "AR1000", ... (pycocotools prints "maxDets=1000")."""
    m = sorted(int(v) for v in max_dets)
    return STAT_NAMES[:6] + (f"AR{m[0]}", f"AR{m[1]}", f"AR{m[2]}") + STAT_NAMES[9:]


# ----------------------------------------------------------------------------------------- entry point
def _pairs(images: list[ImageInstances], category_ids, iou_type: str, max_det: int, overlaps=None):
    index = {c: k for k, c in enumerate(category_ids)}
    pairs = []
    for n, im in enumerate(images):
        unknown = set(np.unique(np.concatenate([im.gt_labels, im.det_labels])).tolist()) - set(index)
        if unknown:
            raise ValueError(f"image {im.image_id}: category ids {sorted(unknown)} are not in category_ids "
                             f"{list(category_ids)}; map labels back to the dataset's category ids")
        if iou_type == "segm":
            per_cat = overlaps[n] if overlaps is not None else category_overlaps(im, max_det)
            for c, ov in per_cat.items():
                di = ov.det_index[:max_det]
                crowd = im.gt_crowd[ov.gt_index]
                ious = mask_iou(ov.inter[:max_det], ov.det_pixels[:max_det], ov.gt_pixels, crowd)
                pairs.append(_Pair(index[c], ious, crowd, im.gt_areas[ov.gt_index],
                                   ov.det_pixels[:max_det].astype(np.float64), im.det_scores[di]))
        else:
            for c in np.union1d(im.gt_labels, im.det_labels).tolist():
                gi = np.flatnonzero(im.gt_labels == c)
                di = np.flatnonzero(im.det_labels == c)
                di = di[score_order(im.det_scores[di])][:max_det]
                crowd, db = im.gt_crowd[gi], im.det_boxes[di]
                pairs.append(_Pair(index[c], box_iou_xywh(db, im.gt_boxes[gi], crowd), crowd,
                                   im.gt_areas[gi], db[:, 2] * db[:, 3], im.det_scores[di]))
    return pairs


def evaluate_images(images: list[ImageInstances], category_ids, iou_type="segm", max_dets=(1, 10, 100),
                    overlaps=None) -> dict:
    """COCO AP over normalised images (sorted by id); see `evaluate_instances` for the result."""
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    max_dets = sorted(int(m) for m in max_dets)  # pycocotools sorts them too
    if len(max_dets) != 3:
        raise ValueError("max_dets needs exactly 3 values, like COCOeval's maxDets")
    need = "masks" if iou_type == "segm" else "boxes"
    for im in images:
        if (len(im.gt_labels) and getattr(im, f"gt_{need}") is None) or \
                (len(im.det_labels) and getattr(im, f"det_{need}") is None):
            raise ValueError(f"image {im.image_id}: iou_type {iou_type!r} needs '{need}' for GT and "
                             "detections")
    category_ids = [int(c) for c in sorted(set(category_ids))]
    pairs = _pairs(images, category_ids, iou_type, max_dets[-1], overlaps)
    precision, recall = _precision_recall(pairs, _match_all(pairs), len(category_ids), max_dets)
    stats = summarize(precision, recall, max_dets)
    at = {"AP": slice(None), "AP50": IOU_THRESHOLDS == 0.5, "AP75": IOU_THRESHOLDS == 0.75}
    # per category: area 'all', the largest max_dets (detectron2's convention); -1 = no GT
    per_category = {c: {name: _mean_valid(precision[t, :, k, 0, -1]) for name, t in at.items()}
                    for k, c in enumerate(category_ids)}
    return {"iou_type": iou_type, "stats": stats, "stat_names": list(stat_names(max_dets)),
            **{name: 100.0 * stats[i] for i, name in enumerate(STAT_NAMES[:3])},
            "per_category": per_category, "precision": precision, "recall": recall}


def evaluate_instances(gt_per_image, det_per_image, category_ids, iou_type="segm",
                       max_dets=(1, 10, 100)) -> dict:
    """COCO AP from in-memory per-image instances (dict layout in the module docstring).

    Returns {"stats": 12 floats as COCOeval.stats (fractions, -1 = undefined), "stat_names",
    "AP", "AP50", "AP75": stats[0:3] x 100, "per_category": {cat_id: {"AP", "AP50", "AP75"}} (fractions;
    -1 for a category without GT), "precision": float64 [T=10,R=101,K,A=4,M=3], "recall": [T,K,A,M]}.
    Equal to pycocotools COCOeval with `params.maxDets = max_dets` on the same data (images = the given list,
    categories = category_ids); with maxDets not ending in 100, stats[0] is AP at the largest maxDets where
    pycocotools' summarize() prints -1 (`summarize`). max_dets: COCO's three per-(image, category) caps;
    detections beyond the largest are never scored.
    """
    return evaluate_images(normalize_images(gt_per_image, det_per_image), category_ids, iou_type, max_dets)
