"""GA map folders: the authors' layout `anomap_ws{ws}_f{GA}_ol{ol}/{annotation_id}.npy`, read, written
atomically, and filled on the fly.

Maps written by the authors' scripts (float64) and by this project (float32 or float16) are interchangeable:
one H×W array per annotation at the image's original resolution.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .coco import DataError, ImageRecord
from .gamm import compute_ga_maps, gamm_masks, map_folder_name

MAP_DTYPES = ("float32", "float16", "float64")


@dataclass(frozen=True)
class GammParams:
    """Hyper-parameters of GAINS_METHOD.md §2.6; `target_category_id` is a json category id."""

    variant: str
    window_size: int
    ga_factor: float
    overlap_hl: float
    target_category_id: int

    @property
    def folder_name(self) -> str:
        return map_folder_name(self.window_size, self.ga_factor, self.overlap_hl)


def compute_image_maps(record: ImageRecord, params: GammParams) -> dict[int, np.ndarray]:
    """All GA maps of one image: {annotation id: float64 [H,W]}, computed over every annotation of the image
    in json order (the context GAMM defines maps in)."""
    anns = record.annotations
    if not anns:
        return {}
    masks = gamm_masks([a.segmentation for a in anns], record.height, record.width)
    maps = compute_ga_maps(
        masks, [a.category_id for a in anns], np.array([a.bbox for a in anns], dtype=np.float64),
        variant=params.variant, window_size=params.window_size, ga_factor=params.ga_factor,
        overlap_hl=params.overlap_hl, target_category_id=params.target_category_id)
    return {a.id: maps[i] for i, a in enumerate(anns)}


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class GAMapStore:
    """Serves per-annotation GA maps for records; computes and caches missing ones when `on_the_fly`.

    When `map_dir` is not writable, computed maps are kept in memory instead (one warning).
    """

    def __init__(self, map_dir: str | os.PathLike, params: GammParams, on_the_fly: bool = True,
                 dtype: str = "float32"):
        if dtype not in MAP_DTYPES:
            raise ValueError(f"gamm.dtype must be one of {MAP_DTYPES}, got {dtype!r}")
        self.map_dir = Path(map_dir)
        self.params = params
        self.on_the_fly = on_the_fly
        self.dtype = np.dtype(dtype)
        self._memory: dict[int, np.ndarray] = {}
        self._writable: bool | None = None

    def path(self, annotation_id: int) -> Path:
        return self.map_dir / f"{annotation_id}.npy"

    def _can_write(self) -> bool:
        if self._writable is None:
            try:
                self.map_dir.mkdir(parents=True, exist_ok=True)
                self._writable = os.access(self.map_dir, os.W_OK)
            except OSError:
                self._writable = False
            if not self._writable:
                warnings.warn(f"GA map folder {self.map_dir} is not writable; maps computed on the fly are "
                              "kept in memory only. Set gamm.map_dir to a writable folder to cache them.")
        return self._writable

    def _read(self, annotation_id: int, record: ImageRecord) -> np.ndarray | None:
        if annotation_id in self._memory:
            return self._memory[annotation_id]
        path = self.path(annotation_id)
        if not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: unreadable GA map for annotation {annotation_id} ({e}); delete it or "
                            "re-run preprocess.py with --overwrite") from None
        if array.shape != (record.height, record.width):
            raise DataError(f"{path}: GA map of annotation {annotation_id} is {array.shape}, but image "
                            f"{record.image_id} is {(record.height, record.width)}; the maps belong to other "
                            "data or parameters — re-run preprocess.py with --overwrite")
        return array

    def maps(self, record: ImageRecord, annotation_ids: list[int]) -> np.ndarray:
        """float32 [len(annotation_ids), H, W] for annotations of `record`."""
        found = {a: self._read(a, record) for a in annotation_ids}
        missing = [a for a, m in found.items() if m is None]
        if missing:
            if not self.on_the_fly:
                raise DataError(f"GA map {self.path(missing[0])} (image {record.image_id}) is missing and "
                                "gamm.on_the_fly is false; run `python preprocess.py` with the same "
                                "parameters or set gamm.on_the_fly=true")
            computed = self.write_image_maps(record, overwrite=False)
            found.update({a: computed[a] for a in missing})
        out = np.empty((len(annotation_ids), record.height, record.width), dtype=np.float32)
        for i, a in enumerate(annotation_ids):
            out[i] = found[a]
        return out

    def write_image_maps(self, record: ImageRecord, overwrite: bool = False) -> dict[int, np.ndarray]:
        """Compute the maps of one image and store the ones not present (all with `overwrite`)."""
        maps = compute_image_maps(record, self.params)
        cast = {a: m.astype(self.dtype) for a, m in maps.items()}
        if self._can_write():
            for a, m in cast.items():
                if overwrite or not self.path(a).is_file():
                    save_array_atomic(self.path(a), m)
        else:
            self._memory.update(cast)
        return cast


def _fill_one(store: GAMapStore, record: ImageRecord, overwrite: bool) -> tuple[int, int, str | None]:
    """Worker: (image id, maps written, error message or None)."""
    todo = [a.id for a in record.annotations if overwrite or not store.path(a.id).is_file()]
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
