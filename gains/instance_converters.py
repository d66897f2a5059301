"""Folders of per-instance annotations -> COCO data set folders, overlapping instances kept.

The formats biologists annotate overlapping cells, chromosomes or filaments in, one annotation file per
image: Fiji / ImageJ ROI sets (gains.imagej_rois), QuPath GeoJSON (gains.geojson_io), multi-page instance
TIFF stacks and the DSB2018 layout (gains.instance_stacks). Each instance becomes one COCO annotation whose
segmentation rasterises (pycocotools) to exactly the instance's pixels (gains.mask_polygons: polygons, or RLE
for masks with holes); overlapping instances stay separate annotations. The data set folder, its splits and
its atomic write are those of gains.dataset_converters (``out/{split}.json`` + ``out/{split}/``).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

from .annotations import DataError
from .dataset_converters import IMAGE_SUFFIXES, pair_label_files, split_items, write_coco_dataset
from .geojson_io import GEOJSON_CANDIDATES, read_geojson_instances
from .imagej_rois import ROI_CANDIDATES, read_imagej_instances
from .imageio import read_image_size
from .instance_stacks import dsb2018_items, read_instance_stack, read_mask_pngs
from .mask_polygons import masks_to_annotations

KINDS = ("imagej", "geojson", "stacks", "dsb2018")
# kind -> category sources it accepts; the first is the default
CATEGORY_SOURCES = {"imagej": ("none", "name", "group"), "geojson": ("class", "name", "none"),
                    "stacks": ("none",), "dsb2018": ("none",)}
WHAT = {"imagej": "ROI set", "geojson": "GeoJSON file"}


def _annotation_like(kind: str, path: Path) -> bool:
    """Whether a file or folder in the annotation folder looks like an annotation of `kind` (to report the
    ones that match no image)."""
    if kind == "geojson":
        return path.is_file() and path.suffix.lower() == ".geojson"
    return (path.is_file() and path.suffix.lower() in (".zip", ".roi")) or (path.is_dir()
                                                                          and any(path.glob("*.roi")))


def pair_annotation_files(images_dir: str | os.PathLike, annotations_dir: str | os.PathLike | None,
                          kind: str) -> list[tuple[Path, Path]]:
    """[(image, its annotation file or folder)] sorted by image name, for kind "imagej" (ROI_CANDIDATES) or
    "geojson" (GEOJSON_CANDIDATES), looked up in ``annotations_dir`` (default: ``images_dir``). Raises one
    DataError listing images without or with several annotations and annotations matching no image."""
    images_dir = Path(images_dir)
    folder = Path(annotations_dir) if annotations_dir else images_dir
    for f in (images_dir, folder):
        if not f.is_dir():
            raise DataError(f"folder {f} not found")
    images = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith("."))
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {images_dir}")
    patterns = ROI_CANDIDATES if kind == "imagej" else GEOJSON_CANDIDATES
    found, claimed = [], Counter()
    for image in images:
        hits = list(dict.fromkeys(folder / p.format(stem=image.stem, name=image.name) for p in patterns))
        hits = [h for h in hits if h.is_file() or (kind == "imagej" and h.is_dir() and any(h.glob("*.roi")))]
        found.append((image, hits))
        claimed.update(hits)
    what = WHAT[kind]
    problems = {f"images without a {what}": [i.name for i, hs in found if not hs],
                f"images with several {what}s": [f"{i.name} ({', '.join(h.name for h in hs)})"
                                                 for i, hs in found if len(hs) > 1],
                f"{what}s claimed by several images": [h.name for h, n in claimed.items() if n > 1],
                f"{what}s matching no image": sorted(p.name for p in folder.iterdir()
                                                     if _annotation_like(kind, p) and p not in claimed)}
    problems = [f"{k} ({len(v)}): {', '.join(v[:10])}{' ...' if len(v) > 10 else ''}" for k, v in problems.items()
                if v]
    if problems:
        names = " / ".join(p.format(stem="X", name="X.<ext>") + ("/" if p == "{stem}" else "") for p in patterns)
        raise DataError(f"pairing the images of {images_dir} with the {what}s in {folder}: " + "; ".join(problems)
                        + f". Name the {what} of image X.<ext> {names}")
    return [(image, hits[0]) for image, hits in found]


def _category_table(keys: list, category_name: str) -> tuple[list[dict], dict]:
    """All category keys of a data set (None, str names or int ROI groups) -> (COCO categories, key -> id).
    Names get ids 1..K in sorted order, None (no category) the id of ``category_name``; ROI groups keep
    their number as id (gains.imagej_rois gives every ROI a group when groups are asked for)."""
    named = sorted({k for k in keys if k is not None}, key=str)
    if named and isinstance(named[0], int):
        return [{"id": g, "name": f"group {g}"} for g in named], {g: g for g in named}
    if None in keys or not named:
        named = sorted(set(named) | {category_name})
    ids = {n: i for i, n in enumerate(named, start=1)}
    return [{"id": i, "name": n} for n, i in ids.items()], {**ids, None: ids.get(category_name)}


def convert_instance_folder(source, out_dir, *, kind: str, annotations_dir=None, split_ratios=(0.6, 0.2, 0.2),
                            seed: int = 0, category_from: str | None = None, category_name: str = "cell",
                            overwrite: bool = False, segmentation: str = "polygon") -> dict[str, Path]:
    """Images + one annotation per image -> a data set folder (gains.dataset_converters.write_coco_dataset);
    returns its paths.

    kind "imagej": ``source`` holds the images, ``annotations_dir`` (default: the same) the ROI sets
    (imagej_rois.ROI_CANDIDATES); "geojson": likewise with QuPath GeoJSON files; "stacks": image X.<ext> with
    the instance stack X_masks.tif (or X.tif / X_masks.tif in ``annotations_dir``); "dsb2018": ``source``
    holds ID/images/ID.png + ID/masks/*.png.
    category_from: where an instance's category comes from, per kind (CATEGORY_SOURCES; None: the kind's
    default: one class for ImageJ and stacks, the classification for GeoJSON). Instances without one (and
    every instance under "none") get ``category_name``. Categories are collected over all files before the
    split, so every split shares one list: names get ids 1..K in sorted order, ROI groups keep their number.
    Images are split with split_items(split_ratios, seed); image ids 1..N and annotation ids 1..M per split,
    in image order then instance order. ``info["source"]`` counts what was read (ROI kinds, QuPath object
    types, empty objects dropped) over all files, ``info["conversion"]`` the split's annotations
    ("instances", "multi_part", "rle_holes", ...). Every segmentation decodes (pycocotools) to exactly the
    instance's pixels: a polygon that would not is stored as RLE (min_iou=1, counted as "rle_fallback").
    Raises DataError naming the file and the object for malformed input.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    category_from = category_from or CATEGORY_SOURCES[kind][0]
    if category_from not in CATEGORY_SOURCES[kind]:
        raise DataError(f"categories of {kind} annotations come from one of {', '.join(CATEGORY_SOURCES[kind])}, "
                        f"not {category_from!r}")
    if kind == "dsb2018":
        items = dsb2018_items(source)
    elif kind == "stacks":
        items = pair_label_files(source, annotations_dir, what="instance stack")
    else:
        items = pair_annotation_files(source, annotations_dir, kind)
    stats, names = Counter(), [image.name for image, _ in items]
    shared = sorted({n for n in names if names.count(n) > 1})
    if shared:  # DSB2018 sample ids are unique; a copied folder may break that
        raise DataError(f"{source}: images share a file name ({', '.join(shared[:5])}); the data set folder "
                        "keeps one image per name: rename them")
    read, dropped = [], []
    for image, annotation in items:
        height, width = read_image_size(image)
        with warnings.catch_warnings(record=True) as caught:  # one summary below instead of one per file
            warnings.simplefilter("always")
            if kind == "imagej":
                masks, keys = read_imagej_instances(annotation, height, width, category_from, stats)
            elif kind == "geojson":
                masks, keys = read_geojson_instances(annotation, height, width, category_from, stats)
            elif kind == "stacks":
                masks, keys = read_instance_stack(annotation, height, width, stats), None
            else:
                masks, keys = read_mask_pngs(annotation, height, width, stats), None
        for w in caught:
            if "dropped" in str(w.message):  # the readers' counted drops
                dropped.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        read.append((image, masks, [None] * len(masks) if keys is None else keys))
    cats, to_id = _category_table([k for _, _, keys in read for k in keys], category_name)
    if dropped:
        warnings.warn(f"{len(dropped)} of {len(read)} annotation files had instances covering no pixel, "
                      "dropped: " + " | ".join(dropped[:3]) + (" ..." if len(dropped) > 3 else ""), stacklevel=2)
    splits = {}
    for split, part in split_items(read, split_ratios, seed).items():
        images, annotations, counts = [], [], Counter()
        for image_id, (image, masks, keys) in enumerate(part, start=1):
            h, w = masks.image_size
            images.append({"id": image_id, "file_name": image.name, "height": h, "width": w})
            ids = [to_id[k] for k in keys]
            anns, _ = masks_to_annotations(masks, ids, image_id=image_id, first_id=len(annotations) + 1,
                                           stats=counts, segmentation=segmentation, min_iou=1.0)
            annotations += anns
        coco = {"info": {"description": f"converted from {kind} annotations by gains.instance_converters",
                         "source": dict(stats), "conversion": dict(counts)},
                "images": images, "annotations": annotations, "categories": cats}
        splits[split] = (coco, [image for image, *_ in part])
    return write_coco_dataset(out_dir, splits, overwrite=overwrite)

