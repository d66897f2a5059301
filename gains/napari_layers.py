"""napari layers for predictions and training data, with no napari import and no plugin: each function
returns napari "layer data tuples" (data, keyword arguments, layer type), which the viewer's add_* methods
take as they are:

    import napari
    from gains.napari_layers import prediction_layers
    viewer = napari.Viewer()
    [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in prediction_layers(IMAGE, OUT)]

Three layers per image: the image, an instance labels layer (where instances overlap one wins the pixel) and
a shapes layer with every instance's outline, overlaps kept (a napari polygon has no holes: a hole shows in
the labels layer only; a mask in several pieces gives one polygon per piece, sharing its instance number).

Coordinates: napari puts pixel (row r, col c)'s centre at (r, c), so the pixel covers [r - 1/2, r + 1/2];
gains (COCO, ImageJ, QuPath) puts its corner at (c, r). Outline vertices are therefore (y - 1/2, x - 1/2) of
gains.mask_polygons.trace_rings, (row, col) order, float64 [P, 2]; napari fills them to exactly the mask's
pixels (the tests fill them back by pixel centres).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tifffile

from .annotations import load_coco
from .exports import read_instances_npz
from .imageio import read_image_array
from .instances import CropMasks
from .mask_polygons import trace_rings

LayerData = tuple  # (data, kwargs dict, layer type str), napari's LayerDataTuple


def outline_polygons(masks: CropMasks) -> tuple[list[np.ndarray], list[int]]:
    """Masks [N] -> (polygons: float64 [P, 2] (row, col) in napari's pixel-centre coordinates, the outer
    ring of each part; index of the mask each polygon outlines). Empty masks give none."""
    polygons, owner = [], []
    for i, (crop, (x0, y0, _, _)) in enumerate(zip(masks.crops, masks.boxes.tolist())):
        for ring in trace_rings(np.asarray(crop, bool))[0]:
            polygons.append(ring[:, ::-1] + (y0 - 0.5, x0 - 0.5))
            owner.append(i)
    return polygons, owner


def _layers(name: str, image: np.ndarray, masks: CropMasks, label_image: np.ndarray, features: dict
            ) -> list[LayerData]:
    polygons, owner = outline_polygons(masks)
    rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
    shape_kwargs = {"name": f"{name} outlines", "shape_type": "polygon", "face_color": "transparent",
                    "edge_color": "yellow", "edge_width": 1,
                    "features": {k: [v[i] for i in owner] for k, v in features.items()}}
    return [(image, {"name": name, "rgb": rgb}, "image"),
            (label_image, {"name": f"{name} labels"}, "labels"),
            (polygons, shape_kwargs, "shapes")]


def prediction_layers(image_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[LayerData]:
    """The outputs of ``evaluate.py --images DIR --out OUT`` for one image of DIR -> [image, labels, shapes]
    layer data tuples (see the module docstring).

    image: the file's array ([H, W] or [H, W, C], its own dtype); labels: OUT/labels/X_labels.tif (uint16
    [H, W], the higher score wins overlaps); shapes: the outlines of OUT/masks/X.npz (exact masks), with
    features "instance" (1-based, the label value and ROI / GeoJSON name), "score" and "category" (name
    from OUT/images.json). Raises FileNotFoundError naming a missing output."""
    image_path, out_dir = Path(image_path), Path(out_dir)
    stem = image_path.stem
    paths = [out_dir / "masks" / f"{stem}.npz", out_dir / "labels" / f"{stem}_labels.tif", out_dir / "images.json"]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found; predict the folder of {image_path.name} first "
                                    f"(evaluate.py --ckpt RUN/model_final.pth --images DIR --out {out_dir})")
    pred = read_instances_npz(paths[0])
    names = {c["id"]: c["name"] for c in json.loads(paths[2].read_text()).get("categories", [])}
    n = len(pred["scores"])
    features = {"instance": list(range(1, n + 1)), "score": pred["scores"].astype(float).tolist(),
                "category": [names.get(int(v), str(int(v))) for v in pred["labels"].tolist()]}
    return _layers(stem, read_image_array(image_path), pred["masks"], tifffile.imread(paths[1]), features)


def dataset_layers(root: str | os.PathLike, split: str, file_name: str) -> list[LayerData]:
    """One image of a COCO data set folder (``root/{split}.json`` + ``root/{split}/``) -> [image, labels,
    shapes] layer data tuples: the image, a uint16/uint32 label image of its annotations (pixel = 1 +
    annotation index; where annotations overlap the earlier one wins) and every annotation's outline, with
    features "annotation_id" and "category". Raises KeyError naming a file name not in the split."""
    root = Path(root)
    records, categories, _ = load_coco(root / f"{split}.json", root / split)
    by_name = {r.path.name: r for r in records}
    if file_name not in by_name:
        raise KeyError(f"{file_name!r} is not an image of {root / split}.json (e.g. {sorted(by_name)[:3]})")
    record = by_name[file_name]
    masks = CropMasks.from_segmentations([a.segmentation for a in record.annotations], record.height, record.width)
    features = {"annotation_id": [a.id for a in record.annotations],
                "category": [categories.names[a.label - 1] for a in record.annotations]}
    return _layers(Path(file_name).stem, read_image_array(record.path), masks, masks.label_image(), features)
