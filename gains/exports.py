"""Prediction outputs for Fiji / ImageJ, napari and Python, written from `CropMasks` (never [N, H, W]).

One image's predictions (N instances, in the order of the results json) can be written as

* ``write_label_image`` -> ``X_labels.tif``: instance label image [H, W], pixel = instance index + 1,
  0 = background; uint16 (ImageJ TIFF) for N < 65536, else uint32 (plain TIFF). Where instances overlap
  the higher score wins the pixel, so overlaps are lost here (use the npz for them). zlib (deflate)
  compression, no predictor.
* ``write_imagej_rois`` -> ``X_rois.zip``: ImageJ ROI set, one polygon ROI per instance (per 8-connected
  part), outlining the mask's pixel boundary (holes filled); ROI name ``00001`` = label 1 of the label image.
* ``write_instances_npz`` -> ``X_instances.npz``: every mask exactly, overlaps kept, with scores, labels
  and boxes; ``read_instances_npz`` reads it back (the layout is documented there for other readers).
* ``coco_results``: COCO results entries (compressed RLE) for the results json / pycocotools COCOeval.
* QuPath GeoJSON (holes and overlaps kept): ``gains.geojson_io.write_geojson``.

How to open them
----------------
Fiji / ImageJ
    File > Open... the label TIFF (or drag & drop it onto the Fiji window): a 16-bit image whose pixel
    values are the instance ids. Image > Lookup Tables > glasbey (or glasbey_on_dark) colours neighbouring
    ids differently. The ROI set: open the original image, then Analyze > Tools > ROI Manager, More >>
    Open... the zip (or drag & drop the zip onto the Fiji window); "Show All" in the ROI Manager overlays
    the outlines on the image, Measure gives per-instance statistics, and Image > Overlay > From ROI
    Manager makes the overlay permanent. ImageJ has no 32-bit integer image type: the uint32 label TIFF
    (65536 instances or more) is a plain TIFF that ImageJ imports as a 32-bit (float) image (ids are exact
    in float32 up to 2**24). If a TIFF does not open with File > Open, File > Import > Bio-Formats reads
    any of them.
napari
    ``viewer = napari.Viewer(); viewer.add_image(image); viewer.add_labels(tifffile.imread(path))``; or
    drag & drop the TIFF, which opens as an image layer, and right-click the layer > Convert to Labels.
Python
    ``tifffile.imread(path)`` for the label image, ``roifile.roiread(path)`` for the ROIs,
    ``read_instances_npz(path)["masks"]`` (a CropMasks) for the exact, overlapping masks.

These steps are written from the Fiji / napari documentation; the tests check the files with tifffile,
roifile, pycocotools and an independent rasterisation, not with Fiji or napari themselves.

Every file is written atomically: a temp file in the target folder, then os.replace, so an error (full
disk, bad input) never leaves a half-written file under the final name; it gets the mode open() would give
it (0o666 minus the umask), so colleagues can read it (gains.atomic).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import contourpy
import numpy as np
import roifile
import tifffile
from scipy import ndimage

from .atomic import atomic_write
from .instances import CropMasks

NPZ_FORMAT = "gains-instances-v1"
LABEL_DTYPES = (np.uint8, np.uint16, np.uint32)
# marching-squares level on the 0/1 crop (see _outer_rings): below 0.5 joins diagonal contacts (a saddle
# quad's mean, 0.5, is above it) and puts each vertex 0.25 px off its pixel edge, so rounding is unambiguous
_CONTOUR_LEVEL = 0.25


# ------------------------------------------------------------------------------------------ helpers
def _numpy(x, dtype) -> np.ndarray:
    """Array or tensor (any device) -> numpy array of `dtype`."""
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=dtype)


def _check_lengths(n: int, **arrays) -> None:
    for name, a in arrays.items():
        if len(a) != n:
            raise ValueError(f"{name} has {len(a)} entries for {n} masks")


# ------------------------------------------------------------------------------------ label image
def write_label_image(path: str | os.PathLike, masks: CropMasks, scores=None, dtype=None,
                      compression: str | None = "zlib") -> Path:
    """Write the instance label image of `masks` [H, W] as a TIFF; returns the path.

    Pixel value i + 1 = instance i (the order of `masks`, i.e. of the results json and the npz), 0 =
    background. scores: float [N] or None; where masks overlap the higher score wins the pixel (None: the
    earlier mask wins), see CropMasks.label_image. dtype: None -> uint16 for N < 65536, else uint32;
    uint8 / uint16 / uint32 may be forced (too small a dtype is an error).

    uint8 / uint16 are written with ImageJ metadata (axes YX), so ImageJ reads a plain 8/16-bit image.
    tifffile's ImageJ mode has no uint32: those are a plain (baseline) uint32 TIFF, which ImageJ imports
    as a 32-bit image. compression: "zlib" (deflate, lossless, no predictor; a 4096 x 4096 field with
    2000 nuclei is ~0.25 MB instead of 32 MB) or None. The data are in strips, one 2-D image: ImageJ's
    own reader decompresses deflate strips; tifffile's warning that ImageJ hyperstacks do not support
    compression is about multi-image stacks. Should a reader still refuse the file, open it with
    Fiji's File > Import > Bio-Formats or write it with compression=None.
    """
    if dtype is not None and np.dtype(dtype) not in [np.dtype(d) for d in LABEL_DTYPES]:
        raise ValueError(f"label image dtype must be uint8, uint16 or uint32, got {np.dtype(dtype).name}")
    if scores is not None:
        scores = _numpy(scores, np.float64)
        _check_lengths(len(masks), scores=scores)
    labels = masks.label_image(scores, dtype)
    imagej = labels.dtype != np.uint32
    return atomic_write(path, lambda tmp: tifffile.imwrite(
        tmp, labels, imagej=imagej, metadata={"axes": "YX"} if imagej else None, photometric="minisblack",
        compression=compression))


# ------------------------------------------------------------------------------------- ImageJ ROIs
def _outer_rings(crop: np.ndarray) -> tuple[list[np.ndarray], bool]:
    """Outer pixel boundaries of a non-empty bool crop [h, w] -> (rings, had_holes).

    rings: int64 [P, 2] (x, y) polygons in crop coordinates, one per 8-connected part, vertices on pixel
    corners (pixel (r, c) is the square [c, c+1] x [r, r+1]), one vertex per change of direction, ordered
    by the part's first pixel in raster order. Holes are filled first (had_holes says whether there were
    any), so a ring's interior is exactly its part's pixels plus its holes.

    Marching squares (contourpy) on the pixel centres finds, in order along each boundary, every pixel edge
    between a foreground and a background pixel; `_pixel_corners` turns that edge sequence into corners.
    A saddle quad (two diagonal foreground pixels) has mean 0.5 > level, so contourpy's serial algorithm
    joins them: diagonal contacts stay one part (8-connectivity), a pinch point where the ring touches itself.
    Memory: one float64 copy of the (padded) crop.
    """
    filled = ndimage.binary_fill_holes(crop)  # background 4-connected = complement of 8-connected parts
    had_holes = bool(np.count_nonzero(filled) > np.count_nonzero(crop))
    z = np.pad(filled, 1).astype(np.float64)  # background border: every ring closes
    # z[j, i] is the centre of crop pixel (j - 1, i - 1): crop coordinates (i - 0.5, j - 0.5)
    xs, ys = np.arange(z.shape[1]) - 0.5, np.arange(z.shape[0]) - 0.5
    lines = contourpy.contour_generator(xs, ys, z, line_type=contourpy.LineType.Separate).lines(_CONTOUR_LEVEL)
    rings = [_pixel_corners(line[:-1]) for line in lines]  # closed lines repeat their first point
    return sorted(rings, key=_raster_key), had_holes


def _pixel_corners(vertices: np.ndarray) -> np.ndarray:
    """Closed marching-squares line float [P, 2] (x, y) -> its pixel boundary, int64 [Q, 2] corners.

    Each vertex lies on the segment between a foreground and a background pixel centre and stands for the
    pixel edge that segment crosses. A vertex on a row of centres (y = r + 0.5, copied exactly by contourpy)
    crosses a vertical edge x = X; any other vertex crosses a horizontal edge y = Y. The level puts the
    vertex 0.25 px from its edge, so rounding its crossing coordinate gives X (or Y) exactly. Consecutive
    vertices lie in one quad, whose centre is a pixel corner: crossing a vertical then a horizontal edge (or
    the reverse) turns there, at (X of the vertical one, Y of the horizontal one); two edges of the same
    orientation continue straight and need no vertex.
    """
    on_vertical = vertices[:, 1] % 1 == 0.5
    edge = np.rint(vertices).astype(np.int64)  # only the crossing coordinate of each vertex is used
    next_vertical, next_edge = np.roll(on_vertical, -1), np.roll(edge, -1, 0)
    x = np.where(on_vertical, edge[:, 0], next_edge[:, 0])
    y = np.where(on_vertical, next_edge[:, 1], edge[:, 1])
    return np.stack([x, y], 1)[on_vertical != next_vertical]


def _raster_key(ring: np.ndarray) -> tuple[int, int]:
    """(y, x) of the top-left corner of a ring's first pixel in raster order (its topmost-leftmost vertex)."""
    top = ring[:, 1].min()
    return int(top), int(ring[ring[:, 1] == top, 0].min())


def _roi_names(n: int, names) -> list[str]:
    if names is None:
        return [f"{i + 1:05d}" for i in range(n)]
    names = [str(s) for s in names]
    _check_lengths(n, names=names)
    if len(set(names)) != n:
        raise ValueError("ROI names must be unique (they are the file names inside the zip)")
    return names


def write_imagej_rois(path: str | os.PathLike, masks: CropMasks, names: Sequence[str] | None = None,
                      stats: Counter | None = None) -> Path:
    """Write an ImageJ / Fiji ROI set (.zip) with one polygon ROI per instance; returns the path.

    names: N strings (unique), default ``f"{i + 1:05d}"`` = the instance's id in the label image. ROIs are
    written in instance order (the ROI Manager's order; zero-padded names also sort that way) with no stack
    position (they apply to every slice). Each ROI is an integer-vertex POLYGON tracing the pixel boundary:
    its edges run along pixel edges, so every pixel is wholly inside or wholly outside it, and filling it
    by pixel centres (x + 0.5, y + 0.5), as ImageJ's polygon filler does, or by pixel area gives back
    exactly the mask's pixels (the tests check the centre rule).

    Masks with several 8-connected parts: one ROI per part, named ``{name}-{k}``, k = 1, 2, ... in raster
    order of the parts' first pixels (separate polygons rather than one composite ROI: every ImageJ
    tool handles a polygon, and each part stays an editable outline). Holes: each ROI traces the outer
    boundary only, so holes are filled in the ROIs (the label image and the npz keep them). Empty masks
    get no ROI. Masks with holes and empty masks are counted in one warning.

    stats: optional Counter; "rois", "empty", "multi_part" (masks split into several ROIs) and "holes_filled"
    are added to it.
    """
    names = _roi_names(len(masks), names)
    counts, rois, empty = Counter(), [], []
    for i, (crop, box) in enumerate(zip(masks.crops, masks.boxes.tolist())):
        if not crop.any():
            empty.append(names[i])
            continue
        rings, had_holes = _outer_rings(crop)
        counts["holes_filled"] += had_holes
        counts["multi_part"] += len(rings) > 1
        for k, ring in enumerate(rings, start=1):
            roi = roifile.ImagejRoi.frompoints(ring + np.array(box[:2], np.int64),
                                               name=names[i] if len(rings) == 1 else f"{names[i]}-{k}")
            roi.roitype = roifile.ROI_TYPE.POLYGON  # frompoints makes FREEHAND; same vertices, plain polygon
            rois.append(roi)
    counts["rois"], counts["empty"] = len(rois), len(empty)
    if stats is not None:
        stats.update(counts)
    if empty or counts["holes_filled"]:
        warnings.warn(f"{Path(path).name}: {len(empty)} empty mask(s) have no ROI (first: {empty[:5]}); "
                      f"{counts['holes_filled']} mask(s) with holes are outlined by their outer boundary "
                      "(holes filled in the ROIs; the label image and the npz keep them)", stacklevel=2)
    return atomic_write(path, lambda tmp: roifile.roiwrite(tmp, rois, mode="w"))


# ------------------------------------------------------------------------------------------- npz
def write_instances_npz(path: str | os.PathLike, masks: CropMasks, scores, labels, boxes) -> Path:
    """Write masks (exact, overlaps kept) with scores float [N], labels int [N], boxes float [N, 4] to a
    compressed npz (np.savez_compressed); returns the path. Crops are stored as given (not tightened).

    Layout (N instances; read with ``np.load(path)``, no pickles):

    ==============  ==============  ===========================================================================
    format          str scalar      "gains-instances-v1"
    image_size      int64 [2]       (H, W) of the image
    crop_boxes      int64 [N, 4]    (x0, y0, x1, y1) of crop i, exclusive x1 / y1; (0, 0, 0, 0) = empty mask
    crop_offsets    int64 [N + 1]   crop i's bytes are crop_bits[crop_offsets[i]:crop_offsets[i + 1]]
    crop_bits       uint8 [B]       every crop np.packbits'ed (row-major, most significant bit first) and
                                    padded to whole bytes on its own, concatenated in instance order
    scores          float32 [N]     detection scores
    labels          int64 [N]       contiguous class labels (1..K, as the model predicts them)
    boxes           float32 [N, 4]  predicted boxes (x0, y0, x1, y1) in pixels (the model's, not the crops')
    ==============  ==============  ===========================================================================

    Mask i of the full image: ``m = np.zeros((H, W), bool)``; with (x0, y0, x1, y1) = crop_boxes[i] and
    h, w = y1 - y0, x1 - x0: ``m[y0:y1, x0:x1] = np.unpackbits(crop_bits[o[i]:o[i + 1]], count=h * w)
    .reshape(h, w).astype(bool)`` where o = crop_offsets.
    """
    n = len(masks)
    scores, labels = _numpy(scores, np.float32).reshape(-1), _numpy(labels, np.int64).reshape(-1)
    boxes = _numpy(boxes, np.float32).reshape(-1, 4)
    _check_lengths(n, scores=scores, labels=labels, boxes=boxes)
    packed = [np.packbits(crop.reshape(-1)) for crop in masks.crops]
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([p.size for p in packed], dtype=np.int64)
    arrays = {"format": np.array(NPZ_FORMAT), "image_size": np.array(masks.image_size, np.int64),
              "crop_boxes": masks.boxes.astype(np.int64), "crop_offsets": offsets,
              "crop_bits": np.concatenate(packed) if packed else np.zeros(0, np.uint8),
              "scores": scores, "labels": labels, "boxes": boxes}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a path
            np.savez_compressed(f, **arrays)
    return atomic_write(path, write)


def read_instances_npz(path: str | os.PathLike) -> dict:
    """Read a `write_instances_npz` file -> {"masks": CropMasks, "scores": float32 [N], "labels": int64 [N],
    "boxes": float32 [N, 4]}."""
    with np.load(path, allow_pickle=False) as f:
        if "format" not in f.files or str(f["format"]) != NPZ_FORMAT:
            raise ValueError(f"{path}: not a {NPZ_FORMAT} file (format {f.get('format')!r})")
        data = {k: f[k] for k in f.files}
    crop_boxes, offsets, bits = data["crop_boxes"], data["crop_offsets"], data["crop_bits"]
    crops = []
    for (x0, y0, x1, y1), start, stop in zip(crop_boxes.tolist(), offsets[:-1].tolist(), offsets[1:].tolist()):
        h, w = y1 - y0, x1 - x0
        crops.append(np.unpackbits(bits[start:stop], count=h * w).reshape(h, w).astype(bool))
    return {"masks": CropMasks(crop_boxes, crops, tuple(data["image_size"].tolist())),
            "scores": data["scores"], "labels": data["labels"], "boxes": data["boxes"]}


# ------------------------------------------------------------------------------------- COCO results
def coco_results(masks: CropMasks, boxes, scores, labels, image_id: int,
                 to_json_category: Callable[[int], int] = int) -> list[dict]:
    """COCO results entries of one image, in instance order: {"image_id": int, "category_id":
    to_json_category(label) (e.g. CategoryMap.to_json_id), "score": float (full precision), "bbox": [x, y,
    w, h] of `boxes` float [N, 4] (x0, y0, x1, y1), "segmentation": {"size": [H, W], "counts": str}}.

    The RLEs come from the crops (CropMasks.to_rles) and equal pycocotools.mask.encode of the dense masks.
    """
    boxes = _numpy(boxes, None).reshape(-1, 4).tolist()
    scores, labels = _numpy(scores, None).reshape(-1).tolist(), _numpy(labels, None).reshape(-1).tolist()
    _check_lengths(len(masks), boxes=boxes, scores=scores, labels=labels)
    out = []
    for rle, (x0, y0, x1, y1), score, label in zip(masks.to_rles(), boxes, scores, labels):
        out.append({"image_id": int(image_id), "category_id": int(to_json_category(int(label))),
                    # full precision: re-scoring the file reproduces the in-memory ranking, ties included
                    "score": float(score), "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "segmentation": {"size": [int(s) for s in rle["size"]],
                                     "counts": rle["counts"].decode("ascii")}})
    return out
