"""Foreign annotations -> COCO data set folders: instance label images, labelme json, a real DSB2018 sample.

A data set folder has the layout the configs use: ``out/{split}.json`` + ``out/{split}/<images>`` per split
(train/val/test). It is written atomically (temp folder + rename, as gains.synthetic does) and checked with
gains.annotations.load_coco before the rename, so a folder that exists is one the loader accepts.
Coordinates follow COCO: x right, y down, pixel (row r, col c) covers [c, c+1] x [r, r+1].
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from .atomic import atomic_folder
from .annotations import DataError, load_coco
from .imageio import read_image_array, read_image_size
from .mask_polygons import crop_annotation

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABEL_SUFFIX = "_masks"                               # cellpose's naming: X.tif <-> X_masks.tif
REGION_SHAPES = ("polygon", "rectangle", "circle")   # labelme shape types that become instances
SPLITS = ("train", "val", "test")
STARDIST_PIP = "/work/venv/bin/pip install --no-deps stardist==0.9.2"


# ------------------------------------------------------------------------------------ label images -> COCO
def _check_label_image(label: np.ndarray, where: str) -> np.ndarray:
    if label.ndim == 3 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.ndim != 2:
        raise DataError(f"{where}: a label image must be 2-D (one integer id per pixel), got shape "
                        f"{label.shape}; colour-coded RGB labels are not supported: save one id per pixel")
    if label.dtype == bool or not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"{where}: label image dtype {label.dtype}; expected 8/16/32-bit integers "
                        "(0 = background, each positive id = one instance)")
    if label.size and label.min() < 0:
        raise DataError(f"{where}: negative ids in the label image; use 0 for background and ids >= 1")
    return label


def label_image_to_annotations(label: np.ndarray, *, image_id: int, first_id: int = 1, category_id: int = 1,
                               segmentation: str = "polygon", holes: str = "rle", min_polygon_pixels: int = 3,
                               min_iou: float = 0.95, stats: Counter | None = None) -> list[dict]:
    """Label image int [H, W] (0 = background; 8..64-bit; ids need not be contiguous) -> COCO annotations,
    one per positive id in ascending order, ids ``first_id``, first_id + 1, ...; ``bbox`` [x, y, w, h] of the
    pixels, ``area`` the pixel count, ``iscrowd`` 0. Label images cannot express overlaps.

    segmentation: "polygon": one pixel-exact ring per connected part ([[x0, y0, x1, y1, ...], ...], half-integer
    coordinates), all parts in one annotation; "rle": compressed RLE (counts str) for every instance.
    holes: COCO polygons are united and cannot cut holes: "rle" stores instances with holes as RLE (exact),
    "fill" keeps the outer rings (holes filled). Instances under ``min_polygon_pixels`` are kept as RLE, and so
    are polygons whose rasterisation has IoU < ``min_iou`` with the pixels (a safety net). ``stats`` (Counter)
    gets "instances", "multi_part", "rle_tiny", "rle_holes", "rle_fallback" added.
    """
    label = _check_label_image(np.asarray(label), f"image id {image_id}")
    # ids -> 1..K (find_objects allocates up to the largest id); 0 stays background even if nothing is
    ids, compact = np.unique(label, return_inverse=True)
    compact = compact.reshape(label.shape) + int(ids[0] != 0)
    annotations = []
    for k, sl in enumerate(ndimage.find_objects(compact), start=1):  # every k in 1..K occurs: no None
        annotations.append(crop_annotation(compact[sl] == k, sl[1].start, sl[0].start, *label.shape,
                                           ann_id=first_id + len(annotations), image_id=image_id,
                                           category_id=category_id, segmentation=segmentation, holes=holes,
                                           min_polygon_pixels=min_polygon_pixels, min_iou=min_iou, stats=stats))
    return annotations


def _labels_coco(entries: Sequence[tuple[str, np.ndarray]], category: dict, description: str, **options) -> dict:
    """[(file_name, label [H, W])] -> COCO dict, image ids 1..N, annotation ids 1..M, counters in info."""
    images, annotations, stats = [], [], Counter()
    for image_id, (name, label) in enumerate(entries, start=1):
        images.append({"id": image_id, "file_name": name, "height": label.shape[0], "width": label.shape[1]})
        annotations += label_image_to_annotations(label, image_id=image_id, first_id=len(annotations) + 1,
                                                  category_id=category["id"], stats=stats, **options)
    return {"info": {"description": description, "conversion": dict(stats)}, "images": images,
            "annotations": annotations, "categories": [category]}


def labels_to_coco(pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]], category_id: int = 1,
                   category_name: str = "cell", **options) -> dict:
    """(image file, label image file) pairs -> COCO dict (image ids 1..N in pair order, file_name = the image's
    name). ``options`` go to label_image_to_annotations (segmentation, holes, min_polygon_pixels, min_iou);
    its counters land in ``info["conversion"]``. Label images cannot express overlapping instances.
    Raises DataError when an image and its label differ in size or a label image is not integer 2-D."""
    entries = []
    for image_path, label_path in pairs:
        image_path, label_path = Path(image_path), Path(label_path)
        if label_path.suffix.lower() in (".tif", ".tiff"):
            label = read_image_array(label_path)
        else:  # not read_image_array: palette PNGs must give their indices, not colours
            with Image.open(label_path) as im:
                label = np.array(im)
        label, size = _check_label_image(label, str(label_path)), read_image_size(image_path)
        if size != label.shape:
            raise DataError(f"{image_path} is {size[0]}x{size[1]} (HxW) but its label image {label_path} is "
                            f"{label.shape[0]}x{label.shape[1]}; they must match pixel for pixel")
        entries.append((image_path.name, label))
    return _labels_coco(entries, {"id": int(category_id), "name": category_name},
                        "converted from instance label images by gains.dataset_converters", **options)


def pair_label_files(images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None = None,
                     what: str = "label image") -> list[tuple[Path, Path]]:
    """[(image, label image)] sorted by image name: ``X.<ext>`` <-> ``X_masks.<ext>`` in ``images_dir``, or
    <-> ``X.<ext>`` / ``X_masks.<ext>`` in ``labels_dir`` (any image suffixes). Raises DataError listing
    unpaired or ambiguous files, or when there is no image; ``what`` names the paired files in it (instance
    stacks are paired the same way)."""
    def listing(folder) -> list[Path]:
        if not Path(folder).is_dir():
            raise DataError(f"folder {folder} not found")
        return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                      and not p.name.startswith("."))
    images = listing(images_dir)
    labels = listing(labels_dir) if labels_dir else [p for p in images if p.stem.endswith(LABEL_SUFFIX)]
    images = images if labels_dir else [p for p in images if not p.stem.endswith(LABEL_SUFFIX)]
    by_stem: dict[str, list[Path]] = {}
    for p in labels:
        by_stem.setdefault(p.stem.removesuffix(LABEL_SUFFIX), []).append(p)
    found = [(image, by_stem.pop(image.stem, [])) for image in images]
    problems = {f"images without a {what}": [i for i, ls in found if not ls],
                f"images with several {what}s": [i for i, ls in found if len(ls) > 1],
                f"{what}s without an image": [p for ps in by_stem.values() for p in ps]}
    problems = [f"{kind} ({len(ps)}): {', '.join(p.name for p in ps[:10])}{' ...' if len(ps) > 10 else ''}"
                for kind, ps in problems.items() if ps]
    if problems:
        raise DataError(f"pairing {images_dir} with {labels_dir or images_dir}: " + "; ".join(problems)
                        + f". Name each {what} X{LABEL_SUFFIX}.<ext> beside X.<ext>, or X.<ext> in its own folder")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {images_dir}")
    return [(image, ls[0]) for image, ls in found]


# ------------------------------------------------------------------------------------------ labelme -> COCO
def _shape_polygon(shape: dict, where: str) -> list[float] | None:
    """One labelme shape -> flat polygon [x0, y0, ...], or None for shape types that are not regions."""
    kind, pts = shape.get("shape_type") or "polygon", np.asarray(shape.get("points", []), np.float64)
    if kind not in REGION_SHAPES:
        return None
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < (3 if kind == "polygon" else 2):
        raise DataError(f"{where}: {kind} with points {shape.get('points')!r}; a polygon needs >= 3 [x, y] "
                        "points, a rectangle and a circle 2")
    if kind == "rectangle":  # two opposite corners, any order
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    elif kind == "circle":   # centre and a point on the circle; ~2 px edges, 16..128 vertices
        r = float(np.hypot(*(pts[1] - pts[0])))
        t = np.linspace(0, 2 * np.pi, int(np.clip(np.ceil(np.pi * r), 16, 128)), endpoint=False)
        pts = pts[0] + r * np.stack([np.cos(t), np.sin(t)], 1)
    return np.round(pts, 3).ravel().tolist()


def _read_labelme(json_paths) -> tuple[list[tuple[Path, dict]], list[str]]:
    """-> ([(json path, document)], sorted labels of the shapes that become instances)."""
    docs = []
    for p in map(Path, json_paths):
        try:
            docs.append((p, json.loads(p.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{p}: cannot read labelme json ({e})") from None
    return docs, sorted({str(s.get("label")) for _, d in docs for s in d.get("shapes", [])
                         if (s.get("shape_type") or "polygon") in REGION_SHAPES})


def _labelme_image(doc: dict, json_path: Path) -> tuple[str, Path | np.ndarray]:
    """(file_name, source) of a labelme json's image: the file at imagePath (relative to the json) if it
    exists, keeping its format and bit depth, else the embedded imageData decoded to an array (-> PNG)."""
    image_path = (doc.get("imagePath") or "").replace("\\", "/")  # labelme on Windows writes backslashes
    path = json_path.parent / image_path
    if image_path and path.is_file():
        return path.name, path
    if doc.get("imageData"):
        with Image.open(io.BytesIO(base64.b64decode(doc["imageData"]))) as im:
            array = np.array(im.convert("RGB") if im.mode == "P" else im)
        return (Path(image_path).stem or json_path.stem) + ".png", array
    raise DataError(f"{json_path}: image {path} not found and no embedded imageData; put the image beside "
                    "the json or save the json with image data")


def labelme_to_coco(json_paths: Sequence[str | os.PathLike], categories: Mapping[str, int] | None = None
                    ) -> tuple[dict, dict[str, Path | np.ndarray]]:
    """labelme json files -> (COCO dict, {file_name: image source}) ready for write_coco_dataset.

    Shapes of type polygon, rectangle (2 corners) and circle (centre + rim point) become polygons; other types
    (point, line, linestrip, mask) are skipped with one counted warning. Shapes of one image sharing (label,
    group_id) form one instance (several polygons); a shape without group_id is its own instance, as in
    labelme's own labelme2coco, and like it the points are copied unchanged.
    ``categories``: {label: category id}; labels outside it are an error listing them. None: ids 1..K for the
    sorted labels. Image ids are 1..N in json order; a source is the image file (Path, copied) or the embedded
    imageData decoded to an array (written as PNG). ``bbox`` and ``area`` come from the pycocotools
    rasterisation; instances covering no pixel are dropped with a counted warning.
    Raises DataError for an image size differing from imageHeight/imageWidth, a missing image, malformed
    shapes, unknown labels or two images with the same file name.
    """
    docs, labels = _read_labelme(json_paths)
    name_to_id = ({str(k): int(v) for k, v in categories.items()} if categories is not None
                  else {name: i for i, name in enumerate(labels, start=1)})
    unknown = [name for name in labels if name not in name_to_id]
    if unknown:
        raise DataError(f"labels {unknown} are not among the categories {sorted(name_to_id)}; add them to "
                        "the category map or fix the labels")
    images, annotations, sources, skipped, empty = [], [], {}, [], []
    for image_id, (json_path, doc) in enumerate(docs, start=1):
        name, source = _labelme_image(doc, json_path)
        if name in sources:
            raise DataError(f"{json_path}: image file name {name!r} is used by two labelme files; rename one")
        h, w = read_image_size(source) if isinstance(source, Path) else source.shape[:2]
        if (doc.get("imageHeight"), doc.get("imageWidth")) != (h, w):
            raise DataError(f"{json_path}: the image is {h}x{w} (HxW) but the json says imageHeight="
                            f"{doc.get('imageHeight')}, imageWidth={doc.get('imageWidth')}; fix one of them")
        sources[name] = source
        images.append({"id": image_id, "file_name": name, "height": int(h), "width": int(w)})
        instances: dict = {}
        for i, shape in enumerate(doc.get("shapes", [])):
            poly = _shape_polygon(shape, f"{json_path}: shape {i} ({shape.get('label')!r})")
            if poly is None:
                skipped.append(f"{json_path.name}:{i}")
                continue
            label, group = str(shape.get("label")), shape.get("group_id")
            instances.setdefault((label, group) if group is not None else (label, None, i), []).append(poly)
        for key, polys in instances.items():
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, int(h), int(w)))
            if int(mask_utils.area(rle)) == 0:
                empty.append(f"{json_path.name}:{key[0]}")
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": name_to_id[key[0]], "segmentation": polys,
                                "area": float(mask_utils.area(rle)),
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    for items, what in ((skipped, "labelme shapes that are not regions (point/line/linestrip/mask) skipped"),
                        (empty, "labelme instances covering no pixel dropped")):
        if items:
            warnings.warn(f"{len(items)} {what} ({', '.join(items[:5])}{' ...' if len(items) > 5 else ''})",
                          stacklevel=2)
    cats = [{"id": i, "name": n} for n, i in sorted(name_to_id.items(), key=lambda kv: kv[1])]
    return ({"info": {"description": "converted from labelme by gains.dataset_converters"}, "images": images,
             "annotations": annotations, "categories": cats}, sources)


# ----------------------------------------------------------------------------------------- data set folders
def split_items(items: Sequence, ratios: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> dict[str, list]:
    """Deterministic shuffle-and-cut of ``items`` into {"train", "val", "test"} by ``ratios`` (normalised).

    Counts are the largest-remainder rounding of n * ratio; each split with a positive ratio gets >= 1 item
    while the largest split can spare one. Splits with ratio 0 are left out; order within a split follows
    ``items``.
    """
    ratios = np.asarray(ratios, np.float64)
    if ratios.shape != (3,) or (ratios < 0).any() or ratios.sum() <= 0:
        raise ValueError(f"split ratios must be 3 non-negative numbers (train val test), got {list(ratios)}")
    n, ratios = len(items), ratios / ratios.sum()
    counts = np.floor(n * ratios).astype(int)
    for i in np.argsort(-(n * ratios - counts), kind="stable")[:n - counts.sum()]:
        counts[i] += 1
    for i in np.flatnonzero((ratios > 0) & (counts == 0)):
        largest = int(np.argmax(counts))
        if counts[largest] > 1:
            counts[largest], counts[i] = counts[largest] - 1, 1
    parts = np.split(np.random.default_rng(seed).permutation(n), np.cumsum(counts)[:-1])
    return {s: [items[j] for j in sorted(part)] for s, part, r in zip(SPLITS, parts, ratios) if r > 0}


def _write_image(path: Path, source, height: int, width: int) -> None:
    if not isinstance(source, np.ndarray):
        shutil.copyfile(source, path)
        return
    if source.dtype not in (np.uint8, np.uint16) or source.shape[:2] != (height, width):
        raise DataError(f"{path.name}: array {source.dtype} {source.shape} must be uint8/uint16 with "
                        f"height x width {height}x{width} as in the json")
    Image.fromarray(source).save(path)  # format from the suffix: PNG, TIFF, ...


def write_coco_dataset(out_dir: str | os.PathLike, splits: Mapping[str, tuple[dict, object]], *,
                       overwrite: bool = False) -> dict[str, Path]:
    """Write ``out_dir/{split}.json`` + ``out_dir/{split}/`` for each split, atomically.

    splits: {split name: (COCO dict, images)}; images are image file paths (matched to ``file_name`` by name)
    or {file_name: Path | ndarray uint8 [H, W] / [H, W, C] or uint16 [H, W]} (arrays saved in the format the
    suffix names). overwrite: replace an existing ``out_dir``, else an existing non-empty folder is an error.
    Returns {"<split>_json": Path, "<split>_images": Path} per split. The set is built in a temporary folder
    beside ``out_dir``, checked with load_coco (errors raise) and renamed into place: a failure leaves neither
    a half data set nor the temporary folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another folder or overwrite it "
                              "(overwrite=True / --overwrite)")
    def fill(tmp: Path) -> None:
        for split, (coco, images) in splits.items():
            if not isinstance(images, Mapping):
                images = {Path(p).name: Path(p) for p in images}
            names = [im["file_name"] for im in coco["images"]]
            missing, extra = sorted(set(names) - set(images)), sorted(set(images) - set(names))
            if missing or extra or len(set(names)) != len(names):
                raise DataError(f"split {split!r}: json file names and image sources differ (no source for "
                                f"{missing[:5]}, not in the json {extra[:5]}, or duplicate file names)")
            (tmp / split).mkdir()
            for im in coco["images"]:
                _write_image(tmp / split / im["file_name"], images[im["file_name"]], im["height"], im["width"])
            with open(tmp / f"{split}.json", "w") as f:
                json.dump(coco, f, separators=(",", ":"))
            load_coco(tmp / f"{split}.json", tmp / split)

    atomic_folder(out_dir, fill)
    return {f"{s}_{k}": out_dir / (f"{s}.json" if k == "json" else s) for s in splits for k in ("json", "images")}


def describe_dataset(out_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{split: (number of images, number of annotations)} for the ``*.json`` files of a data set folder."""
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.json"))}
    return {split: (len(d.get("images", [])), len(d.get("annotations", []))) for split, d in docs.items()}


def convert_folder(source, out_dir, *, kind: str = "labels", labels_dir=None, split_ratios=(0.6, 0.2, 0.2),
                   seed: int = 0, category_name: str = "cell", overwrite: bool = False) -> dict[str, Path]:
    """A folder of images + label images (kind "labels", see pair_label_files) or of labelme ``*.json``
    (kind "labelme") -> a data set folder split by split_items; returns write_coco_dataset's paths. labelme
    category ids 1..K go to the sorted labels of all files, so every split shares one category list."""
    if kind not in ("labels", "labelme"):
        raise ValueError(f"kind must be 'labels' or 'labelme', got {kind!r}")
    if kind == "labels":
        parts = split_items(pair_label_files(source, labels_dir), split_ratios, seed)
        splits = {s: (labels_to_coco(pairs, category_name=category_name), [image for image, _ in pairs])
                  for s, pairs in parts.items()}
    else:
        paths = sorted(Path(source).glob("*.json"))
        if not paths:
            raise DataError(f"no labelme *.json files in {source}")
        categories = {name: i for i, name in enumerate(_read_labelme(paths)[1], start=1)}
        splits = {s: labelme_to_coco(ps, categories) for s, ps in split_items(paths, split_ratios, seed).items()}
    return write_coco_dataset(out_dir, splits, overwrite=overwrite)


# --------------------------------------------------------------------------------------- DSB2018 sample
def convert_dsb2018_sample(out_dir: str | os.PathLike = "data/dsb2018", *, tile: int = 128, seed: int = 0,
                           min_pixels: int = 5, overwrite: bool = False) -> dict[str, Path]:
    """stardist's 512x512 DSB2018 fluorescence crop (125 hand-annotated nuclei, CC0) -> a COCO data set folder.

    The crop is cut into non-overlapping ``tile`` x ``tile`` tiles (file ``r{row}c{col}.png``), shuffled with
    ``seed`` and split 10 : 3 : 3 (16 tiles of 128 px: 10 train, 3 val, 3 test). Nuclei cut by a tile border
    keep their visible part; visible parts of cut nuclei under ``min_pixels`` pixels are dropped (one counted
    warning). The crop is a uint16 TIFF holding values 0..235, so tiles are saved losslessly as 8-bit PNG
    (16-bit PNG if a value exceeds 255), like the Kaggle PNGs. One category {"id": 1, "name": "nucleus"};
    segmentations as in label_image_to_annotations. A missing stardist is a DataError with the pip command.
    Returns write_coco_dataset's paths.
    """
    import tifffile
    spec = importlib.util.find_spec("stardist")  # not imported: stardist's import needs tensorflow
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" if spec else Path("/nonexistent")
    image_path, mask_path = root / "img2d.tif", root / "mask2d.tif"
    if not (image_path.is_file() and mask_path.is_file()):
        raise DataError(f"the DSB2018 sample ships with the stardist wheel, which is not installed (or lacks "
                        f"data/images/img2d.tif and mask2d.tif); run: {STARDIST_PIP}")
    image, label = tifffile.imread(image_path), tifffile.imread(mask_path).astype(np.int64)
    height, width = label.shape
    if tile < 16 or height % tile or width % tile:
        raise ValueError(f"tile must be >= 16 and divide the {height}x{width} crop (e.g. 64, 128, 256), got {tile}")
    image = image.astype(np.uint8 if image.max() <= 255 else np.uint16)
    full_area = np.bincount(label.ravel())
    tiles, dropped, cut_total = [], 0, 0
    for r in range(height // tile):
        for c in range(width // tile):
            window = np.s_[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
            lab = label[window].copy()
            ids, counts = np.unique(lab, return_counts=True)
            cut = (ids > 0) & (counts < full_area[ids])
            small = ids[cut & (counts < min_pixels)]
            lab[np.isin(lab, small)] = 0
            dropped, cut_total = dropped + len(small), cut_total + int(cut.sum())
            tiles.append((f"r{r}c{c}.png", image[window], lab))
    if dropped:
        warnings.warn(f"DSB2018 sample: {dropped} of {cut_total} nucleus parts cut by tile borders were smaller "
                      f"than {min_pixels} px and dropped", stacklevel=2)
    about = f"DSB2018 crop shipped with stardist 0.9.2 (CC0), {tile} px tiles, seed {seed}"
    return write_coco_dataset(out_dir, {
        split: (_labels_coco([(name, lab) for name, _, lab in part], {"id": 1, "name": "nucleus"}, about),
                {name: pixels for name, pixels, _ in part})
        for split, part in split_items(tiles, (10, 3, 3), seed).items()}, overwrite=overwrite)
