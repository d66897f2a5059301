"""Instance stacks -> instance masks: one binary image per instance, so instances may overlap.

Two layouts:

* a multi-page TIFF, one page per instance (non-zero = the instance), beside its image as ``X_masks.tif``
  (or in a mask folder, as for label images): the way overlapping cells are often stored (ImageJ stacks,
  tifffile.imwrite of an [N, H, W] array);
* the Kaggle Data Science Bowl 2018 layout: ``ID/images/ID.png`` + ``ID/masks/*.png``, one PNG per instance
  (masks in sorted file-name order).

Every page / PNG must be 2-D, the image's size, and binary (0 and one other value): a page holding several
non-zero values is probably a label image (--from-labels) and is a DataError, as are pages of different
sizes, each naming the file and the page. Empty pages are dropped with one counted warning per file.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import tifffile
from PIL import Image

from .annotations import DataError
from .instances import CropMasks

STACK_SUFFIX = "_masks"  # X.tif <-> X_masks.tif, as for label images


def _binary_page(page: np.ndarray, where: str, height: int, width: int) -> np.ndarray:
    """One page / PNG -> bool [H, W] (non-zero = the instance); DataError naming `where` otherwise."""
    if page.ndim == 3 and page.shape[-1] in (1, 3, 4):  # grey saved as RGB(A): all channels must agree
        if page.shape[-1] > 1 and not (page[..., :3] == page[..., :1]).all():
            raise DataError(f"{where}: a colour image ({page.shape[-1]} channels that differ); save each "
                            "instance as a greyscale binary mask")
        page = page[..., 0]
    if page.ndim != 2:
        raise DataError(f"{where}: shape {page.shape}; expected one 2-D binary mask per page")
    if page.shape != (height, width):
        raise DataError(f"{where}: {page.shape[0]}x{page.shape[1]} (HxW) but the image is {height}x{width}; "
                        "every page must be the image's size")
    values = np.unique(page[page != 0])
    if values.size > 1:
        raise DataError(f"{where}: {values.size} different non-zero values (e.g. {values[:4].tolist()}); an "
                        "instance stack holds one binary mask (0 = background) per page; for a label image "
                        "(one id per instance) use --from-labels")
    return page != 0


def _crop(mask: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return (0, 0, 0, 0), np.zeros((0, 0), bool)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return (x0, y0, x1, y1), mask[y0:y1, x0:x1].copy()


def _masks_from_pages(pages: Iterable[tuple[str, np.ndarray]], path: Path, height: int, width: int,
                      stats: Counter | None) -> CropMasks:
    boxes, crops, empty = [], [], []
    for where, page in pages:
        box, crop = _crop(_binary_page(page, where, height, width))  # one page in memory at a time
        if crop.size == 0:
            empty.append(where.rsplit(": ", 1)[-1])
            continue
        boxes.append(box)
        crops.append(crop)
    if stats is not None:
        stats.update(pages=len(crops) + len(empty), empty=len(empty))
    if empty:
        warnings.warn(f"{path}: {len(empty)} empty page(s) dropped ({', '.join(empty[:5])}"
                      f"{' ...' if len(empty) > 5 else ''})", stacklevel=3)
    return CropMasks(np.array(boxes, np.int64).reshape(-1, 4), crops, (height, width))


def read_instance_stack(path: str | os.PathLike, height: int, width: int, stats: Counter | None = None
                        ) -> CropMasks:
    """Multi-page TIFF, page k = instance k (any integer or bool dtype, non-zero = inside) -> CropMasks [N]
    of the height x width image, in page order; empty pages dropped (counted warning). A page of several
    samples (tifffile stores a 3- or 4-instance stack as one RGB(A) page unless told photometric=
    "minisblack") gives one instance per sample. ``stats`` gets
    "pages" and "empty". Raises DataError naming the file and the page (1-based) for a page of another
    size, shape or with several non-zero values, and for a file tifffile cannot read."""
    path = Path(path)

    def pages():
        try:
            with tifffile.TiffFile(path) as tif:
                if not len(tif.pages):  # tifffile only logs a bad offset to the first page
                    raise ValueError("no readable page")
                for k, page in enumerate(tif.pages, start=1):
                    array = page.asarray()
                    if getattr(page, "samplesperpixel", 1) > 1 and array.ndim == 3:
                        # tifffile.imwrite saves a [3, H, W] or [4, H, W] stack as ONE RGB(A) page unless told
                        # photometric="minisblack": its samples are the instances
                        planes = array if array.shape[0] == page.samplesperpixel else np.moveaxis(array, -1, 0)
                        for j, plane in enumerate(planes, start=1):
                            yield f"{path}: page {k} sample {j}", plane
                    else:
                        yield f"{path}: page {k}", array
        except (OSError, ValueError, tifffile.TiffFileError) as e:
            raise DataError(f"{path}: cannot read the TIFF stack ({type(e).__name__}: {e})") from None
    return _masks_from_pages(pages(), path, height, width, stats)


def read_mask_pngs(paths: list[Path], height: int, width: int, stats: Counter | None = None) -> CropMasks:
    """One PNG (or any PIL image) per instance -> CropMasks [N], in the order given; as read_instance_stack."""
    def pages():
        for p in paths:
            try:
                with Image.open(p) as im:
                    yield f"{p.parent}: {p.name}", np.array(im.convert("L") if im.mode == "P" else im)
            except OSError as e:
                raise DataError(f"{p}: cannot read the mask ({e})") from None
    return _masks_from_pages(pages(), Path(paths[0]).parent if paths else Path("."), height, width, stats)


def dsb2018_items(folder: str | os.PathLike) -> list[tuple[Path, list[Path]]]:
    """The DSB2018 layout -> [(image ``ID/images/ID.png``, sorted ``ID/masks/*.png``)] sorted by ID. Every
    sub-folder of ``folder`` that has an ``images`` folder is a sample; one without exactly one image, or
    without a ``masks`` folder, is a DataError naming it (a sample with an empty masks folder has no
    instances and is kept)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder {folder} not found")
    items = []
    for sample in sorted(p for p in folder.iterdir() if (p / "images").is_dir()):
        images = sorted(p for p in (sample / "images").iterdir() if p.is_file() and not p.name.startswith("."))
        if len(images) != 1:
            raise DataError(f"{sample / 'images'}: {len(images)} files; the DSB2018 layout has exactly one "
                            f"image per sample ({sample.name}/images/{sample.name}.png)")
        if not (sample / "masks").is_dir():
            raise DataError(f"{sample}: no masks/ folder; put one PNG per instance in {sample / 'masks'}")
        masks = sorted(p for p in (sample / "masks").iterdir() if p.is_file() and not p.name.startswith("."))
        items.append((images[0], masks))
    if not items:
        raise DataError(f"{folder}: no DSB2018 samples (sub-folders ID/ with images/ID.png and masks/*.png)")
    return items
