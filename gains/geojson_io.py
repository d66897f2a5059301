"""QuPath GeoJSON <-> instance masks, overlaps and holes kept.

QuPath's File > Export objects as GeoJSON writes one file per image: a FeatureCollection (or, from older
versions, a JSON array of Features), each Feature a Polygon or MultiPolygon (with holes) in image pixels,
x right, y down, origin at the image's top-left corner, with ``properties`` ``objectType`` ("annotation",
"detection", "cell", ...), optionally ``classification`` {"name": ...} and ``name``. File > Import objects
(or drag & drop) reads the same format back.

Reading: a pixel belongs to a feature when its centre is inside (holes and MultiPolygon parts even-odd;
gains.mask_polygons), the rule QuPath's own rasterisation follows; a cell's separate ``nucleusGeometry`` is
not read. A feature that is not an area (Point, LineString, ...), an invalid geometry (a self-intersecting
ring, overlapping MultiPolygon parts: shapely's validity reason is quoted) and a file declaring a ``crs``
(RFC 7946 GeoJSON has none; QuPath's pixel files never carry one, map files do) are DataErrors naming the
file and the feature. Features covering no pixel are dropped with one counted warning per file.

Writing (``write_geojson``): one Feature per mask, traced through the half-way points between its pixels and
the background (gains.mask_polygons.trace_rings), so reading it back gives exactly the mask's pixels; the
polygon's area is the pixel count minus 1/2 per part plus 1/2 per hole (the traced corners are cut by half
a pixel). Rings are valid simple rings (shapely / JTS), exteriors counter-clockwise in (x, y), holes
clockwise, as RFC 7946 asks.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import shapely
from shapely.geometry import shape

from .annotations import DataError
from .atomic import write_text_atomic
from .instances import CropMasks
from .mask_polygons import fill_rings, nest_rings, trace_rings

AREA_TYPES = ("Polygon", "MultiPolygon")
CATEGORY_SOURCES = ("none", "class", "name")
GEOJSON_CANDIDATES: Sequence[str] = ("{stem}.geojson", "{name}.geojson")
"""Where an image X.<ext>'s GeoJSON may be: X.geojson or X.<ext>.geojson, in the GeoJSON folder (default:
the image folder)."""


# ------------------------------------------------------------------------------------------------ reading
def _features(doc, path: Path) -> list:
    if isinstance(doc, list):  # QuPath before 0.3 exports a plain array of Features
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" and isinstance(doc.get("features"), list):
        return doc["features"]
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    raise DataError(f"{path}: not a GeoJSON FeatureCollection, Feature or array of Features (top-level "
                    f"{type(doc).__name__} {str(doc.get('type') if isinstance(doc, dict) else '')!r}); export "
                    "the objects with QuPath's File > Export objects as GeoJSON")


def _describe(feature: dict, i: int) -> str:
    props = feature.get("properties") or {}
    name, cls = props.get("name"), _class_name(props)
    return f"feature {i}" + (f" {name!r}" if name else "") + (f" (class {cls!r})" if cls else "")


def _class_name(props: dict) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, dict):
        cls = cls.get("name")
    return str(cls) if cls not in (None, "") else None


def _check_crs(doc, path: Path, where: str = "the file") -> None:
    crs = doc.get("crs") if isinstance(doc, dict) else None
    if crs is not None:
        name = crs.get("properties", {}).get("name") if isinstance(crs, dict) else crs
        raise DataError(f"{path}: {where} declares the coordinate reference system {name!r}; the converter "
                        "reads image pixel coordinates (x right, y down, as QuPath exports them, with no crs): "
                        "export the objects from QuPath (File > Export objects as GeoJSON) or convert them to "
                        "pixels")


def feature_geometry(feature, path: Path, i: int):
    """Feature i -> its valid shapely Polygon / MultiPolygon; DataError naming file and feature otherwise."""
    where = f"{path}: {_describe(feature, i) if isinstance(feature, dict) else f'feature {i}'}"
    if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
        raise DataError(f"{where}: not a Feature with a geometry; remove it or export the file again")
    _check_crs(feature, path, f"feature {i}")
    kind = feature["geometry"].get("type")
    if kind not in AREA_TYPES:
        raise DataError(f"{where}: a {kind} is not an area (expected {' or '.join(AREA_TYPES)}); remove the "
                        "object or export only area objects")
    try:
        geometry = shape(feature["geometry"])
    except (ValueError, TypeError, AttributeError, IndexError, shapely.errors.GEOSException) as e:
        raise DataError(f"{where}: malformed {kind} coordinates ({e}); each ring needs >= 4 [x, y] "
                        "positions, the last equal to the first") from None
    if not shapely.is_valid(geometry):
        raise DataError(f"{where}: invalid {kind}: {shapely.is_valid_reason(geometry)} (a ring crossing itself "
                        "or another ring, or overlapping parts); redraw the object's outline so that it does "
                        "not cross itself, or split it into separate objects")
    return geometry


def geometry_rings(geometry) -> list[np.ndarray]:
    """Every ring (exteriors and holes of every part) of a Polygon / MultiPolygon: float64 [P, 2] (x, y)."""
    polygons = geometry.geoms if geometry.geom_type == "MultiPolygon" else [geometry]
    return [np.asarray(ring.coords, np.float64)[:, :2] for p in polygons for ring in (p.exterior, *p.interiors)]


def read_geojson_instances(path: str | os.PathLike, height: int, width: int, category_from: str = "class",
                           stats: Counter | None = None) -> tuple[CropMasks, list]:
    """An image's GeoJSON -> (CropMasks [N] of the height x width image, category keys [N]), one mask per
    feature in file order, overlaps and holes kept. category_from "class": the classification name (None
    for unclassified objects); "name": the object's name; "none": None for all (one class). ``stats`` gets
    "features", "empty" and one count per objectType. Features covering no pixel (outside the image) are
    dropped with one counted warning. Raises DataError naming the file and the feature (see the module)."""
    if category_from not in CATEGORY_SOURCES:
        raise ValueError(f"category source must be one of {CATEGORY_SOURCES}, got {category_from!r}")
    path, stats = Path(path), (stats if stats is not None else Counter())
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read GeoJSON ({e})") from None
    _check_crs(doc, path)
    boxes, crops, categories, empty = [], [], [], []
    for i, feature in enumerate(_features(doc, path)):
        geometry = feature_geometry(feature, path, i)
        props = feature.get("properties") or {}
        stats[str(props.get("objectType", "unknown"))] += 1
        box, crop = fill_rings(geometry_rings(geometry), height, width)
        if not crop.any():
            empty.append(_describe(feature, i))
            continue
        boxes.append(box)
        crops.append(crop)
        categories.append(None if category_from == "none" else
                          _class_name(props) if category_from == "class" else (props.get("name") or None))
    stats["features"] += len(boxes) + len(empty)
    stats["empty"] += len(empty)
    if empty:
        warnings.warn(f"{path}: {len(empty)} feature(s) cover no pixel of the {height}x{width} image and were "
                      f"dropped ({', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''})", stacklevel=2)
    return CropMasks.from_crops(np.array(boxes, np.int64).reshape(-1, 4), crops, (height, width)), categories


# ------------------------------------------------------------------------------------------------ writing
def mask_geometry(crop: np.ndarray, x0: int, y0: int) -> dict | None:
    """bool crop [h, w] at (x0, y0) -> GeoJSON geometry dict (Polygon for one part, else MultiPolygon; rings
    closed, float pixel coordinates), None for an empty crop."""
    outers, holes = trace_rings(np.asarray(crop, bool))
    polygons = []
    for outer, inner in nest_rings(outers, holes):
        rings = [outer] + inner
        polygons.append([(np.vstack([r, r[:1]]) + (x0, y0)).tolist() for r in rings])
    if not polygons:
        return None
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def write_geojson(path: str | os.PathLike, masks: CropMasks, names: Sequence[str] | None = None,
                  classes: Sequence[str | None] | None = None, scores=None, object_type: str = "detection",
                  stats: Counter | None = None) -> Path:
    """Write masks [N] as a GeoJSON FeatureCollection QuPath imports (File > Import objects, or drag & drop);
    returns the path, written atomically.

    Feature i: ``geometry`` from mask_geometry, ``properties`` {"objectType": object_type ("detection": the
    kind QuPath's cell detection makes, light for thousands of objects; "annotation": editable objects),
    "name": names[i] (default ``f"{i + 1:05d}"``, the instance's id in the label TIFF), "classification":
    {"name": classes[i]} when given and not None, "measurements": {"score": scores[i]} when given}. Empty
    masks get no feature (counted in one warning). ``stats`` gets "features" and "empty".
    """
    n = len(masks)
    names = [f"{i + 1:05d}" for i in range(n)] if names is None else [str(s) for s in names]
    for what, values in (("names", names), ("classes", classes), ("scores", scores)):
        if values is not None and len(values) != n:
            raise ValueError(f"{what} has {len(values)} entries for {n} masks")
    features, empty = [], []
    for i, (crop, (x0, y0, _, _)) in enumerate(zip(masks.crops, masks.boxes.tolist())):
        geometry = mask_geometry(crop, x0, y0)
        if geometry is None:
            empty.append(names[i])
            continue
        props: dict = {"objectType": object_type, "name": names[i]}
        if classes is not None and classes[i] is not None:
            props["classification"] = {"name": str(classes[i])}
        if scores is not None:
            props["measurements"] = {"score": float(scores[i])}
        features.append({"type": "Feature", "geometry": geometry, "properties": props})
    if stats is not None:
        stats.update(features=len(features), empty=len(empty))
    if empty:
        warnings.warn(f"{Path(path).name}: {len(empty)} empty mask(s) have no feature (first: {empty[:5]})",
                      stacklevel=2)
    return write_text_atomic(path, json.dumps({"type": "FeatureCollection", "features": features},
                                              separators=(",", ":")))
