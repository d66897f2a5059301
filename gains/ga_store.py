"""GA map folders: read the authors' layout, write a compact lossless one, fill missing maps on the fly.

Two layouts live in a map folder `anomap_ws{ws}_f{GA}_ol{ol}/` (GammParams.folder_name):
- the authors': `{annotation_id}.npy`, one dense H x W array per annotation (float64 from their scripts,
  float32/float16 from ours) — read always, written with `layout="authors"` (`preprocess.py --layout authors`);
- compact (written by default): `image_{image_id}.npz`, one file per image holding every annotation's map as
  a crop on its support box. A GA map is exactly 1.0 outside its support (gains/gamm.py proves and tests
  this), so the crop is lossless: the dense map is 1.0 everywhere, then the crop pasted on its box. Arrays:
    ann_ids  int64 [N]       annotation ids, json order
    boxes    int64 [N, 4]    (x0, y0, x1, y1) of each crop, exclusive right/bottom; (0, 0, 0, 0) = all ones
    offsets  int64 [N + 1]   crop i is values[offsets[i]:offsets[i+1]].reshape(y1 - y0, x1 - x0)
    values   float32/float16 the crops, row-major, concatenated
    image_size int64 [2]     (H, W) of the image the maps belong to
    params   str             the GAMM parameters as JSON (variant, window, factor, overlap, target)
  `np.load(path)` reads it without this project (np.savez_compressed, no pickles).
Maps are read as crops (`crops`, `sparse_maps`: memory O(support area)) or dense (`maps`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .annotations import DataError, ImageRecord
from .gamm import compute_ga_crops, gamm_mask_crops, map_folder_name
from .sparse_maps import SparseMaps

MAP_DTYPES = ("float32", "float16", "float64")
LAYOUTS = ("compact", "authors")
EMPTY_BOX = (0, 0, 0, 0)


@dataclass(frozen=True)
class GammParams:
    """Hyper-parameters of gains/METHOD.md §2; `target_category_id` is a json category id."""

    variant: str
    window_size: int
    ga_factor: float
    overlap_hl: float
    target_category_id: int

    @property
    def folder_name(self) -> str:
        return map_folder_name(self.window_size, self.ga_factor, self.overlap_hl)


Crop = tuple  # ((x0, y0, x1, y1), float array [y1 - y0, x1 - x0]); the map is 1.0 off the box


def compute_image_crops(record: ImageRecord, params: GammParams) -> dict[int, Crop]:
    """All GA maps of one image as crops {annotation id: (box, float64 crop)}, computed over every annotation
    of the image in json order (the context GAMM defines maps in). Memory O(sum of support areas)."""
    anns = record.annotations
    if not anns:
        return {}
    masks = gamm_mask_crops([a.segmentation for a in anns], record.height, record.width)
    crops = compute_ga_crops(
        masks, [a.category_id for a in anns], np.array([a.bbox for a in anns], dtype=np.float64),
        variant=params.variant, window_size=params.window_size, ga_factor=params.ga_factor,
        overlap_hl=params.overlap_hl, target_category_id=params.target_category_id)
    return {a.id: (tuple(int(v) for v in box), crop) for a, (box, crop) in zip(anns, crops)}


def crop_to_dense(crop: Crop, height: int, width: int, dtype=np.float32) -> np.ndarray:
    """(box, values) -> [H, W] map: 1.0 everywhere, the values on the box."""
    (x0, y0, x1, y1), values = crop
    out = np.ones((height, width), dtype=dtype)
    out[y0:y1, x0:x1] = values
    return out


def dense_to_crop(dense: np.ndarray) -> Crop:
    """[H, W] map -> (tight box of the values != 1.0, values there): lossless."""
    off = dense != 1.0
    rows, cols = np.flatnonzero(off.any(1)), np.flatnonzero(off.any(0))
    if rows.size == 0:
        return EMPTY_BOX, dense[:0, :0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return (int(x0), int(y0), int(x1), int(y1)), dense[y0:y1, x0:x1]


def _atomic(path: Path, write) -> None:
    """`write(file object)` through `gains.atomic.atomic_write`: readers never see half a file."""
    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
    atomic_write(path, to_file)


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    """np.save, atomically."""
    _atomic(path, lambda f: np.save(f, array))


def save_compact_atomic(path: Path, crops: dict[int, Crop], image_size: tuple[int, int], params: GammParams,
                        dtype=np.float32) -> None:
    """Write one image's maps in the compact layout (module docstring), atomically."""
    ids = list(crops)
    boxes = np.array([crops[a][0] for a in ids], dtype=np.int64).reshape(-1, 4)
    sizes = [np.asarray(crops[a][1]).size for a in ids]
    values = (np.concatenate([np.asarray(crops[a][1], dtype=dtype).ravel() for a in ids]) if ids
              else np.zeros(0, dtype))
    arrays = dict(ann_ids=np.array(ids, dtype=np.int64), boxes=boxes,
                  offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), values=values,
                  image_size=np.array(image_size, dtype=np.int64), params=np.array(json.dumps(asdict(params))))
    _atomic(path, lambda f: np.savez_compressed(f, **arrays))


def load_compact(path: Path) -> tuple[dict[int, Crop], tuple[int, int]]:
    """Read a compact file: ({annotation id: (box, float32 crop)}, (H, W))."""
    with np.load(path, allow_pickle=False) as z:
        ids, boxes, offsets = z["ann_ids"], z["boxes"], z["offsets"]
        values, size = z["values"].astype(np.float32, copy=False), tuple(int(v) for v in z["image_size"])
    crops = {}
    for i, a in enumerate(ids.tolist()):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        crops[a] = ((x0, y0, x1, y1), values[offsets[i]:offsets[i + 1]].reshape(y1 - y0, x1 - x0))
    return crops, size


def _writable_folder(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


def _unreadable(path: Path, what: str, e: BaseException) -> DataError:
    """The error for a map file that cannot be read (corrupt, truncated, not written by us)."""
    return DataError(f"{path}: unreadable {what} ({type(e).__name__}: {e}); delete it or re-run preprocess.py "
                     "with --overwrite")


def _check_size(path: Path, what: str, found: tuple, record: ImageRecord) -> None:
    """DataError unless a map file's (H, W) is the record's: such maps belong to other data or parameters."""
    if tuple(found) != (record.height, record.width):
        raise DataError(f"{path}: {what}, but image {record.image_id} is {(record.height, record.width)} in the "
                        "json; the maps belong to other data or parameters — re-run preprocess.py with --overwrite")


class GAMapStore:
    """Serves per-annotation GA maps for records; computes and caches missing ones when `on_the_fly`.

    Reads both layouts (a compact image file first, then `{id}.npy`); writes `layout` ("compact" or
    "authors") in `dtype`. When `map_dir` is not writable, computed maps are kept in memory (one warning).
    """

    def __init__(self, map_dir: str | os.PathLike, params: GammParams, on_the_fly: bool = True,
                 dtype: str = "float32", layout: str = "compact"):
        if dtype not in MAP_DTYPES:
            raise ValueError(f"gamm.dtype must be one of {MAP_DTYPES}, got {dtype!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"gamm.layout must be one of {LAYOUTS}, got {layout!r}")
        self.map_dir = Path(map_dir)
        self.params = params
        self.on_the_fly = on_the_fly
        self.dtype = np.dtype(dtype)
        self.layout = layout
        self._memory: dict[int, Crop] = {}
        self._writable: bool | None = None
        self._cache: Path | None = None

    def _folders(self) -> list[Path]:
        return [self.map_dir] + ([self._cache] if self._cache is not None else [])

    def _locate(self, name: str) -> Path:
        """The existing file `name` in the map folder or the shared cache, else where it would be written."""
        for folder in self._folders():
            if (folder / name).is_file():
                return folder / name
        return self.write_dir / name

    @property
    def write_dir(self) -> Path:
        """Where maps computed here are written: the map folder, or the shared cache when it is read-only."""
        return self._cache if self._cache is not None else self.map_dir

    def path(self, annotation_id: int) -> Path:
        """The authors' layout file of an annotation."""
        return self._locate(f"{annotation_id}.npy")

    def image_path(self, image_id: int) -> Path:
        """The compact layout file of an image."""
        return self._locate(f"image_{image_id}.npz")

    def cache_folder(self) -> Path:
        """The shared cache used when the map folder is read-only: one folder per (map folder, parameters)
        under the system's temporary directory, so every DataLoader worker (and the next run) reads the maps
        another computed instead of keeping its own copy."""
        key = hashlib.sha1(f"{self.map_dir.resolve()}|{sorted(asdict(self.params).items())}".encode()).hexdigest()
        return Path(tempfile.gettempdir()) / "gains_ga_cache" / f"{self.map_dir.name}_{key[:12]}"

    def writable(self) -> bool:
        """Whether computed maps can go to disk (the map folder, else the shared cache); memory otherwise."""
        return self._can_write()

    def _can_write(self) -> bool:
        if self._writable is None:
            self._writable = _writable_folder(self.map_dir)
            if not self._writable:
                cache = self.cache_folder()
                if _writable_folder(cache):
                    self._cache, self._writable = cache, True
                    warnings.warn(f"GA map folder {self.map_dir} is not writable; maps computed on the fly are "
                                  f"cached in {cache} (shared by DataLoader workers and later runs). Set "
                                  "gamm.map_dir to a writable folder to keep them elsewhere.")
                else:
                    warnings.warn(f"GA map folder {self.map_dir} is not writable; maps computed on the fly "
                                  "are kept in memory only. Set gamm.map_dir to a writable folder to cache them.")
        return self._writable

    def remove_image_maps(self, record: ImageRecord) -> None:
        """Delete the stored maps of an image (its compact file and its annotations' `{id}.npy`) from the
        writable folder, so they are computed again; files in a read-only map folder are left alone."""
        if not self._can_write():
            return
        names = [f"image_{record.image_id}.npz"] + [f"{a.id}.npy" for a in record.annotations]
        for name in names:
            (self.write_dir / name).unlink(missing_ok=True)
        for a in record.annotations:
            self._memory.pop(a.id, None)

    def _read_compact(self, record: ImageRecord) -> dict[int, Crop]:
        path = self.image_path(record.image_id)
        if not path.is_file():
            return {}
        try:
            crops, size = load_compact(path)
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise _unreadable(path, f"GA map file of image {record.image_id}", e) from None
        _check_size(path, f"GA maps of image {record.image_id} are for a {size} image", size, record)
        return crops

    def _read_npy(self, annotation_id: int, record: ImageRecord) -> Crop | None:
        path = self.path(annotation_id)
        if not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise _unreadable(path, f"GA map for annotation {annotation_id}", e) from None
        _check_size(path, f"GA map of annotation {annotation_id} is {array.shape}", array.shape, record)
        return dense_to_crop(array.astype(np.float32, copy=False))

    def crops(self, record: ImageRecord, annotation_ids: list[int]) -> dict[int, Crop]:
        """{annotation id: (box, float32 crop)} for annotations of `record` (computed when missing)."""
        found = {a: self._memory[a] for a in annotation_ids if a in self._memory}
        if len(found) < len(annotation_ids):
            compact = self._read_compact(record)
            found.update({a: compact[a] for a in annotation_ids if a in compact and a not in found})
        for a in annotation_ids:
            if a not in found and (crop := self._read_npy(a, record)) is not None:
                found[a] = crop
        missing = [a for a in annotation_ids if a not in found]
        if missing:
            if not self.on_the_fly:
                where = self.image_path(record.image_id) if self.layout == "compact" else self.path(missing[0])
                raise DataError(f"GA map {where} (image {record.image_id}, annotation {missing[0]}) is missing "
                                "and gamm.on_the_fly is false; run `python preprocess.py` with the same "
                                "parameters or set gamm.on_the_fly=true")
            computed = self.write_image_maps(record, overwrite=False)
            found.update({a: computed[a] for a in missing})
        return {a: (found[a][0], np.asarray(found[a][1], dtype=np.float32)) for a in annotation_ids}

    def sparse_maps(self, record: ImageRecord, annotation_ids: list[int]) -> SparseMaps:
        """The maps as SparseMaps (fill 1.0, float32 patches) at the image's original size."""
        crops = self.crops(record, annotation_ids)
        return SparseMaps(torch.tensor([crops[a][0] for a in annotation_ids], dtype=torch.int64).reshape(-1, 4),
                          [torch.from_numpy(np.ascontiguousarray(crops[a][1])) for a in annotation_ids],
                          (record.height, record.width), fill=1.0, dtype=torch.float32)

    def maps(self, record: ImageRecord, annotation_ids: list[int]) -> np.ndarray:
        """float32 [len(annotation_ids), H, W] for annotations of `record` (dense)."""
        crops = self.crops(record, annotation_ids)
        out = np.ones((len(annotation_ids), record.height, record.width), dtype=np.float32)
        for i, a in enumerate(annotation_ids):
            (x0, y0, x1, y1), values = crops[a]
            out[i, y0:y1, x0:x1] = values
        return out

    def missing(self, record: ImageRecord) -> list[int]:
        """Annotation ids of `record` with no map on disk (in either layout).

        Existing files are checked from their headers (no map is read): a compact `image_{id}.npz` whose
        image_size differs from the record, or an authors' `{id}.npy` whose shape is not (H, W), raises
        DataError naming the file (as reading it would) and saying to re-run with --overwrite; so does an
        unreadable file. (With --overwrite, preprocess.py recomputes every map and never calls this.)"""
        ids = [a.id for a in record.annotations]
        path = self.image_path(record.image_id)
        have = set()
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    have = set(z["ann_ids"].tolist())
                    size = tuple(int(v) for v in z["image_size"])
            except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
                raise _unreadable(path, f"GA map file of image {record.image_id}", e) from None
            _check_size(path, f"GA maps of image {record.image_id} are for a {size} image", size, record)
        out = []
        for a in ids:
            if a in have:
                continue
            npy = self.path(a)
            if not npy.is_file():
                out.append(a)
                continue
            try:
                shape = np.load(npy, mmap_mode="r", allow_pickle=False).shape  # header only
            except (ValueError, OSError, EOFError) as e:
                raise _unreadable(npy, f"GA map for annotation {a}", e) from None
            _check_size(npy, f"GA map of annotation {a} is {shape}", shape, record)
        return out

    def write_image_maps(self, record: ImageRecord, overwrite: bool = False) -> dict[int, Crop]:
        """Compute the maps of one image and store them: compact = one file for the image (rewritten when
        it lacks an annotation or with `overwrite`); authors = the `{id}.npy` not present (all with
        `overwrite`). Returns {annotation id: (box, crop in the storage dtype)}."""
        crops = {a: (box, np.asarray(c).astype(self.dtype)) for a, (box, c) in
                 compute_image_crops(record, self.params).items()}
        if not self._can_write():
            self._memory.update(crops)
        elif self.layout == "compact":
            if overwrite or self.missing(record) or not self.image_path(record.image_id).is_file():
                save_compact_atomic(self.write_dir / f"image_{record.image_id}.npz", crops,
                                    (record.height, record.width), self.params, self.dtype)
        else:
            for a, c in crops.items():
                if overwrite or not self.path(a).is_file():
                    save_array_atomic(self.write_dir / f"{a}.npy",
                                      crop_to_dense(c, record.height, record.width, self.dtype))
        return crops


def _fill_one(store: GAMapStore, record: ImageRecord, overwrite: bool) -> tuple[int, int, str | None]:
    """Worker: (image id, maps written, error message or None)."""
    todo = [a.id for a in record.annotations] if overwrite else store.missing(record)
    if not todo:
        return record.image_id, 0, None
    try:
        store.write_image_maps(record, overwrite=overwrite)
    except Exception as e:  # reported per image in the summary; the other images still get their maps
        return record.image_id, 0, f"{type(e).__name__}: {e}"
    return record.image_id, len(todo), None


def fill_map_folder(records: list[ImageRecord], store: GAMapStore, *, workers: int = 1,
                    overwrite: bool = False, progress: bool = True) -> dict:
    """Write the GA maps of every annotation of `records` into `store.map_dir` (skipping existing files
    unless `overwrite`). Returns a summary: images, maps written, skipped images, failures [(image id, why)]."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    store.map_dir.mkdir(parents=True, exist_ok=True)
    results = []
    bar = tqdm(total=len(records), desc=f"GAMM {store.params.variant} -> {store.map_dir.name}",
               unit="img", disable=not progress)
    if workers <= 1:
        for record in records:
            results.append(_fill_one(store, record, overwrite))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_fill_one, store, r, overwrite) for r in records]
            for future in futures:
                results.append(future.result())
                bar.update()
    bar.close()
    failures = [(image_id, why) for image_id, _, why in results if why is not None]
    return {
        "images": len(records),
        "maps_written": sum(n for _, n, _ in results),
        "images_skipped": sum(1 for _, n, why in results if n == 0 and why is None),
        "failures": failures,
    }
