"""Shared test helpers: tiny COCO data sets written to a temporary folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """Import a top-level CLI (`train.py`, `evaluate.py`) as a module, to call its `main(argv)`."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def square(x0: float, y0: float, size: float) -> list[float]:
    """A square polygon, flat COCO list [x0, y0, x1, y1, ...]."""
    return [x0, y0, x0 + size, y0, x0 + size, y0 + size, x0, y0 + size]


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> list[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.round(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).ravel(), 2).tolist()


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories=None,
               name: str = "train", pixels=None) -> tuple[Path, Path]:
    """Write `root/{name}.json` and a grey PNG per image into `root/{name}/` (unless `pixels` says otherwise).

    images: dicts with id, file_name, height, width; annotations: COCO dicts (bbox optional).
    pixels: optional {file_name: array} to write instead of a random 8-bit image.
    """
    categories = categories or [{"id": 1, "name": "cell"}]
    image_dir = root / name
    rng = np.random.default_rng(0)
    for im in images:
        array = (pixels or {}).get(im["file_name"])
        if array is None:
            array = rng.integers(0, 255, (im["height"], im["width"]), dtype=np.uint8)
        if array is not False:
            write_png(image_dir / im["file_name"], array)
    json_path = root / f"{name}.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_path, image_dir


@pytest.fixture
def tiny_coco(tmp_path):
    """Two 40x48 images: image 1 has two overlapping squares and a nucleus, image 2 has none."""
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 48},
              {"id": 2, "file_name": "b.png", "height": 40, "width": 48}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [square(4, 4, 16)], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [square(14, 10, 16)], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 2, "segmentation": [square(6, 6, 5)], "iscrowd": 0},
    ]
    cats = [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}]
    return write_coco(tmp_path, images, anns, cats)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a bool/0-1 mask [H,W]: run lengths in column-major order, starting with 0s."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    counts, current, run = [], False, 0
    for pixel in flat:
        if pixel != current:
            counts.append(run)
            current, run = pixel, 0
        run += 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


@pytest.fixture
def restore_global_state():
    """train() switches on deterministic algorithms and seeds generators; undo that for other tests."""
    import torch

    from gains.rng import capture_rng_state, restore_rng_state
    det = torch.are_deterministic_algorithms_enabled()
    rng = capture_rng_state()
    yield
    torch.use_deterministic_algorithms(det)
    restore_rng_state(rng)


def bilinear_upsample_oracle(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Textbook bilinear interpolation with half-pixel centres (align_corners=False), edges clamped, by loops
    over output rows and columns: float64 [C,H,W] -> [C,out_h,out_w]. For UPsampling only (no antialias
    filter is needed there), as an oracle independent of torch's resize kernels."""
    c, h, w = image.shape
    out = np.empty((c, out_h, out_w))
    for i in range(out_h):
        y = min(max((i + 0.5) * h / out_h - 0.5, 0.0), h - 1)
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            x = min(max((j + 0.5) * w / out_w - 0.5, 0.0), w - 1)
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = image[:, y0, x0] * (1 - fx) + image[:, y0, x1] * fx
            bottom = image[:, y1, x0] * (1 - fx) + image[:, y1, x1] * fx
            out[:, i, j] = top * (1 - fy) + bottom * fy
    return out
