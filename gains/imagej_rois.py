"""Fiji / ImageJ ROI sets -> instance masks, one ROI = one instance, overlaps kept.

A ROI set is what the ROI Manager saves (More >> Save...): a .zip of .roi files; a single .roi file and a
folder of .roi files are read too (roifile parses the bytes). Area ROIs become masks by ImageJ's own rule,
a pixel belongs to a ROI when its centre is inside (gains.mask_polygons):

* polygon, freehand, traced (the wand tool), and freehand ROIs of the ellipse and rotated-rectangle tools:
  their vertices, integer or sub-pixel;
* rectangle: the box [left, right) x [top, bottom) (sub-pixel bounds when the ROI has them);
* oval: the pixels whose centre is inside the inscribed ellipse;
* composite (shape) ROIs, e.g. from Edit > Selection > Make Inverse, XOR or a ROI with holes: all their
  sub-paths, even-odd, so holes stay holes.

Lines, polylines, angles, points, text, arrows and images are not areas; a rounded rectangle or a composite
with curved segments has no vertex list. Each of these is a DataError naming the file and the ROI, with the
Fiji step that turns it into an area. A ROI covering no pixel of the image (outside it, or fewer than 3
vertices) is dropped with one counted warning per file. Stack positions are ignored, since the data sets are
2-D, but ROIs on several different stack positions are an error: they belong to different planes.
"""
from __future__ import annotations

import re
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import roifile

from .annotations import DataError
from .instances import CropMasks
from .mask_polygons import fill_ellipse, fill_rings

T, S = roifile.ROI_TYPE, roifile.ROI_SUBTYPE
POLYGON_TYPES = (T.POLYGON, T.FREEHAND, T.TRACED)
NOT_AREAS = {T.LINE: "straight line", T.FREELINE: "freehand line", T.POLYLINE: "segmented line",
             T.ANGLE: "angle", T.POINT: "point", T.NOROI: "empty ROI"}
TO_AREA = "turn it into an area in Fiji (Edit > Selection > Line to Area for lines) or delete it"
TO_POLYGON = "turn it into a polygon in Fiji (Edit > Selection > Interpolate, interval 1)"
CATEGORY_SOURCES = ("none", "name", "group")
_DUPLICATE_SUFFIX = re.compile(r"-\d+$")  # the ROI Manager makes names unique as "cell-1", "cell-2"


def read_roi_set(path: str | Path) -> list[tuple[str, roifile.ImagejRoi]]:
    """A .zip ROI set, a .roi file or a folder of .roi files -> [(label, roi)] in the ROI Manager's order
    (zip order; sorted file names in a folder). label, for messages and as fallback name: ``ROI 3 'cell'``
    (1-based, the ROI's name, else its entry name). Raises DataError naming the file and entry for bytes
    roifile cannot parse."""
    path = Path(path)
    entries: list[tuple[str, bytes]] = []
    try:
        if path.is_dir():
            entries = [(p.name, p.read_bytes()) for p in sorted(path.glob("*.roi"))]
        elif path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as zf:
                entries = [(n, zf.read(n)) for n in zf.namelist() if not n.endswith("/")]
        else:
            entries = [(path.name, path.read_bytes())]
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read the ROI set ({e}); save it again from the ROI Manager "
                        "(More >> Save...)") from None
    out = []
    for i, (entry, data) in enumerate(entries, start=1):
        try:
            roi = roifile.ImagejRoi.frombytes(data)
        except Exception as e:  # noqa: BLE001 - roifile raises ValueError, struct.error, ...: name the entry
            raise DataError(f"{path}: ROI {i} ({entry!r}) is not an ImageJ ROI ({type(e).__name__}: {e}); "
                            "remove it from the set or save the set again from the ROI Manager") from None
        name = roi.name or Path(entry).stem
        out.append((f"ROI {i} {name!r}", roi))
    if not out:
        raise DataError(f"{path}: no ROIs found (a .zip or folder of .roi files from the ROI Manager)")
    return out


def roi_rings(roi: roifile.ImagejRoi, where: str) -> list[np.ndarray] | None:
    """The closed rings (float64 [P, 2] (x, y), image pixels) of an area ROI, None for an oval (filled
    analytically by `roi_mask`); DataError naming `where` for ROIs that are not areas."""
    if roi.subtype in (S.TEXT, S.ARROW, S.IMAGE):
        raise DataError(f"{where}: a {roi.subtype.name.lower()} ROI is not an area; {TO_AREA}")
    if roi.composite:
        try:
            return [np.asarray(r, np.float64) for r in roi.coordinates(multi=True)]
        except (NotImplementedError, RuntimeError) as e:
            raise DataError(f"{where}: composite ROI whose outline roifile cannot read ({e}); "
                            f"{TO_POLYGON}") from None
    if roi.roitype in NOT_AREAS:
        raise DataError(f"{where}: a {NOT_AREAS[roi.roitype]} ROI is not an area; {TO_AREA}")
    if roi.roitype in POLYGON_TYPES:
        return [np.asarray(roi.coordinates(), np.float64)]
    if roi.roitype == T.RECT:
        if roi.rounded_rect_arc_size > 0:
            raise DataError(f"{where}: rounded rectangle (corner diameter {roi.rounded_rect_arc_size}); "
                            f"{TO_POLYGON}")
        x0, y0, x1, y1 = _bounds(roi)
        return [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)]
    if roi.roitype == T.OVAL:
        return None
    raise DataError(f"{where}: ROI type {roi.roitype!r} is not supported; {TO_POLYGON} or delete it")


def _bounds(roi: roifile.ImagejRoi) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a rectangle or oval: the sub-pixel bounds when the ROI has them."""
    if roi.subpixelrect:
        return float(roi.xd), float(roi.yd), float(roi.xd + roi.widthd), float(roi.yd + roi.heightd)
    return float(roi.left), float(roi.top), float(roi.right), float(roi.bottom)


def roi_mask(roi: roifile.ImagejRoi, height: int, width: int, where: str
             ) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """One area ROI -> ((x0, y0, x1, y1) box, bool crop) inside a height x width image (see the module
    docstring for the rule per type); an empty crop when it covers no pixel centre."""
    rings = roi_rings(roi, where)
    if rings is None:
        return fill_ellipse(*_bounds(roi), height, width)
    return fill_rings(rings, height, width)


def roi_category(roi: roifile.ImagejRoi, label: str, source: str, where: str) -> str | int | None:
    """The category key of a ROI: None (source "none": one class), its name without the ROI Manager's
    "-N" de-duplication suffix (source "name"), or its group number 1..255 (source "group")."""
    if source == "none":
        return None
    if source == "name":
        name = roi.name or label
        return _DUPLICATE_SUFFIX.sub("", name) or name
    if source == "group":
        if not roi.group:
            raise DataError(f"{where}: the ROI has no group (group 0) but categories come from groups; set "
                            "one in the ROI Manager (Properties..., Group) or use --category-from none")
        return int(roi.group)
    raise ValueError(f"category source must be one of {CATEGORY_SOURCES}, got {source!r}")


def read_imagej_instances(path: str | Path, height: int, width: int, category_from: str = "none",
                          stats: Counter | None = None) -> tuple[CropMasks, list]:
    """An image's ROI set (see read_roi_set) -> (CropMasks [N] of the height x width image, category keys
    [N]: None, str (ROI name) or int (ROI group), see roi_category), one mask per area ROI in the set's
    order, overlaps kept. ROIs covering no pixel are dropped with one counted warning naming them.
    ``stats`` gets "rois", "empty" and one count per ROI kind ("polygon", "oval", "composite", ...).
    Raises DataError naming the file and the ROI for a ROI that is not an area, a group missing when
    asked for, or ROIs on several stack positions."""
    if category_from not in CATEGORY_SOURCES:
        raise ValueError(f"category source must be one of {CATEGORY_SOURCES}, got {category_from!r}")
    path, stats = Path(path), (stats if stats is not None else Counter())
    rois = read_roi_set(path)
    planes = sorted({(r.position, r.c_position, r.z_position, r.t_position) for _, r in rois})
    if len(planes) > 1:
        raise DataError(f"{path}: the ROIs lie on {len(planes)} different stack positions (position, c, z, t: "
                        f"{planes[:4]}); the data sets are 2-D: save the ROIs of each plane with its own image")
    boxes, crops, categories, empty = [], [], [], []
    for label, roi in rois:
        where = f"{path}: {label}"
        box, crop = roi_mask(roi, height, width, where)
        category = roi_category(roi, label, category_from, where)
        stats["composite" if roi.composite else roi.roitype.name.lower()] += 1
        if not crop.any():
            empty.append(label)
            continue
        boxes.append(box)
        crops.append(crop)
        categories.append(category)
    stats["rois"] += len(rois)
    stats["empty"] += len(empty)
    if empty:
        warnings.warn(f"{path}: {len(empty)} ROI(s) cover no pixel of the {height}x{width} image and were "
                      f"dropped ({', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''})", stacklevel=2)
    masks = CropMasks.from_crops(np.array(boxes, np.int64).reshape(-1, 4), crops, (height, width))
    return masks, categories


ROI_CANDIDATES: Sequence[str] = ("{stem}.zip", "{stem}_rois.zip", "{stem}.roi", "{stem}")
"""Where an image X.<ext>'s ROI set may be: X.zip, X_rois.zip (evaluate.py --images writes these), X.roi or
a folder X/ of .roi files, in the ROI folder (default: the image folder)."""
