"""The manifest of a GA map folder: which GAMM parameters and which annotations its maps were made from.

A map folder is keyed by its name (`anomap_ws{ws}_f{GA}_ol{ol}`) only, and `gamm.map_dir` can point anywhere,
so without a record of what made them, maps of another variant, target category or annotation set would be
reused silently. Every folder this project fills holds `gamm_manifest.json`:

    {"format": "gains-ga-maps-v1", "params": {variant, window_size, ga_factor, overlap_hl,
     target_category_id}, "images": {"<image id>": "<fingerprint of the image's annotations>"}}

The fingerprint is a SHA-1 of the image size and of every annotation's id, category, segmentation and bbox
in json order: GAMM computes an image's maps from all its annotations, so any change to one of them makes all
of that image's maps stale. `prepare_map_folder` runs once in the main process (before DataLoader workers or
preprocess workers start) and:
- refuses a folder whose manifest names other parameters (DataError naming both and the fixes);
- finds the images whose annotations changed: their maps are deleted so they are computed again (or, with
  on-the-fly computation off, a DataError names them);
- warns once about maps without a manifest (e.g. written by the authors' scripts): they are used as they
  are, unverified, and no manifest is written over them;
- writes the manifest for the current records (atomically) when the folder is ours.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path

from .atomic import atomic_write
from .annotations import DataError, ImageRecord

MANIFEST = "gamm_manifest.json"
FORMAT = "gains-ga-maps-v1"


def image_fingerprint(record: ImageRecord) -> str:
    """SHA-1 (hex) of the image size and its annotations (id, category, segmentation, bbox), json order."""
    payload = [record.height, record.width,
               [[a.id, a.category_id, a.segmentation, list(a.bbox)] for a in record.annotations]]
    text = json.dumps(payload, separators=(",", ":"), default=_bytes_as_text)
    return hashlib.sha1(text.encode()).hexdigest()


def _bytes_as_text(value):
    if isinstance(value, bytes):  # compressed RLE counts may be bytes
        return value.decode("ascii", "replace")
    raise TypeError(f"cannot fingerprint {type(value).__name__}")


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("images"), dict):
            raise ValueError("not a gains GA map manifest")
        return manifest
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: unreadable GA map manifest ({e}); delete the map folder or re-run "
                        "preprocess.py with --overwrite") from None


def write_manifest(folder: Path, params, fingerprints: dict[int, str]) -> None:
    """Write the manifest atomically (temporary file + rename)."""
    body = json.dumps({"format": FORMAT, "params": asdict(params),
                       "images": {str(k): v for k, v in sorted(fingerprints.items())}}, indent=1)
    atomic_write(Path(folder) / MANIFEST, lambda tmp: Path(tmp).write_text(body))


def _describe(params: dict) -> str:
    return ", ".join(f"{k}={params[k]}" for k in sorted(params))


def prepare_map_folder(store, records: list[ImageRecord], *, overwrite: bool = False) -> list[int]:
    """Check the store's map folder (and its shared cache, when the folder is read-only) against the records
    and parameters (module docstring); returns the ids of the images whose maps were stale and have been
    removed (they will be computed again). Writes the manifest where the store writes maps."""
    writable = store.writable()  # decides the write folder (the map folder or the shared cache)
    current = {r.image_id: image_fingerprint(r) for r in records}
    stale, merged = [], {}
    for folder in dict.fromkeys([store.map_dir, store.write_dir]):
        found = _check_folder(folder, store, current, overwrite)
        if found is not None:
            stale += [i for i in found[0] if i not in stale]
            merged.update(found[1])
    if stale and not store.on_the_fly:
        raise DataError(f"the annotations of images {stale[:10]}{' ...' if len(stale) > 10 else ''} changed "
                        f"since their GA maps in {store.write_dir} were computed; re-run preprocess.py with "
                        "--overwrite or set gamm.on_the_fly=true")
    by_id = {r.image_id: r for r in records}
    for image_id in stale:
        store.remove_image_maps(by_id[image_id])
    if writable:
        merged.update(current)
        write_manifest(store.write_dir, store.params, merged)
    return stale


def _check_folder(folder: Path, store, current: dict[int, str], overwrite: bool):
    """(stale image ids, the folder's known fingerprints) or None when the folder holds nothing to check."""
    if not folder.is_dir():
        return None
    manifest = read_manifest(folder)
    wanted = asdict(store.params)
    if manifest is None:
        if not overwrite and any(p.suffix in (".npy", ".npz") for p in folder.iterdir()):
            warnings.warn(f"GA map folder {folder} has maps but no {MANIFEST} (written by the authors' scripts "
                          f"or an older version?): they are used as they are, NOT verified against "
                          f"{_describe(wanted)} and the current annotations; delete the folder (or re-run "
                          "preprocess.py with --overwrite) to rebuild them with a manifest")
        return None
    if overwrite:
        return [], {}
    if manifest.get("params") != wanted:
        raise DataError(f"GA maps in {folder} were computed with {_describe(manifest.get('params') or {})}, "
                        f"but this run asks for {_describe(wanted)}; point gamm.map_dir to another folder, or "
                        "re-run preprocess.py with these parameters and --overwrite")
    known = manifest["images"]
    stale = [i for i, fp in current.items() if str(i) in known and known[str(i)] != fp]
    return stale, {int(k): v for k, v in known.items()}
