"""Synthetic data set: valid COCO, deterministic, atomic, and really full of crossing/touching/overlapping."""
from __future__ import annotations

import hashlib
import itertools
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage
from shapely.geometry import Polygon

from gains import synthetic
from gains.synthetic import SYNTHETIC_CATEGORIES, make_synthetic_dataset, synthetic_scene

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    """The default data set, generated once for the module; also records how long that took."""
    start = time.perf_counter()
    paths = make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "data")
    return paths, time.perf_counter() - start


def _load(json_path) -> COCO:
    coco = COCO(str(json_path))  # pycocotools is the oracle for "valid COCO"
    coco.createIndex()
    return coco


def _masks(coco: COCO, image_id: int) -> list[tuple[dict, np.ndarray]]:
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    return [(a, coco.annToMask(a).astype(bool)) for a in anns]


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_set_is_valid_coco_and_fast(default_set):
    paths, seconds = default_set
    assert seconds < 10.0, f"default set took {seconds:.1f} s"
    assert set(paths) == {f"{s}_{k}" for s in SPLITS for k in ("json", "images")}
    for split, n in zip(SPLITS, (64, 16, 24)):
        coco = _load(paths[f"{split}_json"])
        assert coco.dataset["categories"] == SYNTHETIC_CATEGORIES
        images = coco.dataset["images"]
        assert len(images) == n and len({im["id"] for im in images}) == n and min(im["id"] for im in images) >= 1
        anns = coco.dataset["annotations"]
        assert len({a["id"] for a in anns}) == len(anns) and min(a["id"] for a in anns) >= 1
        per_image = {im["id"]: len(coco.getAnnIds(imgIds=[im["id"]])) for im in images}
        empty = sum(v == 0 for v in per_image.values())
        assert empty == (0 if split == "test" else 1)
        assert all(3 <= v <= 10 for v in per_image.values() if v)
        for im in images:
            with Image.open(paths[f"{split}_images"] / im["file_name"]) as pil:
                assert pil.mode == "L" and pil.size == (im["width"], im["height"]) == (128, 128)
        for a in anns:
            assert a["iscrowd"] == 0 and a["category_id"] in (1, 2)
            (seg,) = a["segmentation"]
            poly = np.asarray(seg).reshape(-1, 2)
            assert len(poly) >= 12 and Polygon(poly).is_valid
            assert poly.min() >= 0 and poly[:, 0].max() <= 128 and poly[:, 1].max() <= 128
            assert all(round(v, 2) == v for v in seg)
            rle = mask_utils.merge(mask_utils.frPyObjects([seg], 128, 128))
            assert a["area"] == float(mask_utils.area(rle)) > 0
            x, y, w, h = a["bbox"]
            assert np.allclose([x, y, x + w, y + h], [*poly.min(0), *poly.max(0)], atol=0.011)


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path):
    kwargs = dict(num_train=6, num_val=4, num_test=3)
    a = make_synthetic_dataset(tmp_path / "a", seed=7, **kwargs)
    b = make_synthetic_dataset(tmp_path / "b", seed=7, **kwargs)
    c = make_synthetic_dataset(tmp_path / "c", seed=8, **kwargs)
    da, db, dc = (_digest(p["train_json"].parent) for p in (a, b, c))
    assert da == db and len(da) == 3 + 6 + 4 + 3
    assert da["train.json"] != dc["train.json"] and da["test/00001.png"] != dc["test/00001.png"]


def test_contains_overlapping_touching_and_crossing_pairs(default_set):
    coco = _load(default_set[0]["train_json"])
    overlapping = touching = crossing = 0
    for image_id in coco.getImgIds():
        anns = _masks(coco, image_id)
        for (a, ma), (b, mb) in itertools.combinations(anns, 2):
            if a["category_id"] != 1 or b["category_id"] != 1:
                continue
            inter = (ma & mb).sum() / min(ma.sum(), mb.sum())
            pa = Polygon(np.reshape(a["segmentation"][0], (-1, 2)))
            pb = Polygon(np.reshape(b["segmentation"][0], (-1, 2)))
            if inter > 0.05:
                overlapping += 1
                # crossing: each rod cuts the other in two
                crossing += (pa.difference(pb).geom_type == "MultiPolygon"
                             and pb.difference(pa).geom_type == "MultiPolygon")
            elif inter < 0.02 and (ndimage.binary_dilation(ma) & ndimage.binary_dilation(mb)).any():
                touching += 1
    assert overlapping >= 20 and touching >= 20 and crossing >= 10, (overlapping, touching, crossing)


def test_nuclei_lie_inside_cells(default_set):
    coco = _load(default_set[0]["train_json"])
    nuclei = 0
    for image_id in coco.getImgIds():
        anns = _masks(coco, image_id)
        cells = [m for a, m in anns if a["category_id"] == 1]
        for a, m in anns:
            if a["category_id"] == 2:
                nuclei += 1
                assert max((m & c).sum() for c in cells) >= 0.95 * m.sum(), a["id"]
    assert nuclei >= 20


def test_pixels_follow_the_polygons():
    rng = np.random.default_rng(1)
    image, instances = synthetic_scene(rng, (128, 128), kind="cells")
    assert image.dtype == np.uint8 and image.shape == (128, 128)
    masks = {k: np.zeros((128, 128), bool) for k in ("cell", "nucleus", "rod", "blob")}  # + isolated extras
    count = np.zeros((128, 128), int)
    for inst in instances:
        assert inst["polygon"].dtype == np.float64 and inst["polygon"].shape[1] == 2
        m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
            [inst["polygon"].ravel().tolist()], 128, 128))).astype(bool)
        masks[inst["kind"]] |= m
        count += inst["kind"] == "cell" and m
    # erode so the blur at borders does not blur the comparison
    inner = lambda m: ndimage.binary_erosion(m, iterations=2)
    anything = np.logical_or.reduce(list(masks.values()))
    assert count.max() >= 2 and masks["nucleus"].any()
    background = image[~ndimage.binary_dilation(anything, iterations=3)].mean()
    single = image[inner((count == 1) & ~masks["nucleus"] & ~masks["rod"] & ~masks["blob"])].mean()
    double = image[inner((count == 2) & ~masks["nucleus"] & ~masks["rod"] & ~masks["blob"])].mean()
    nucleus = image[inner(masks["nucleus"])].mean()
    assert background > single > double and single > nucleus


@pytest.mark.parametrize("kind", ["cells", "rods", "blobs", "empty"])
def test_scene_kinds_and_non_square_images(kind):
    image, instances = synthetic_scene(np.random.default_rng(5), (96, 160), kind=kind)
    assert image.shape == (96, 160)
    assert (len(instances) == 0) if kind == "empty" else (3 <= len(instances) <= 10)
    for inst in instances:
        poly = inst["polygon"]
        assert poly.min() >= 1 and poly[:, 0].max() <= 159 and poly[:, 1].max() <= 95
        assert inst["category_id"] == (2 if inst["kind"] == "nucleus" else 1)


def test_no_overwrite_returns_existing_set(tmp_path, monkeypatch):
    out = tmp_path / "data"
    first = make_synthetic_dataset(out, num_train=3, num_val=1, num_test=1)
    before = _digest(out)
    monkeypatch.setattr(synthetic, "synthetic_scene", lambda *a, **k: pytest.fail("regenerated"))
    assert make_synthetic_dataset(out, num_train=3, num_val=1, num_test=1, seed=9) == first
    monkeypatch.undo()
    assert _digest(out) == before
    make_synthetic_dataset(out, num_train=3, num_val=1, num_test=1, seed=9, overwrite=True)
    assert _digest(out)["train.json"] != before["train.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp or old folder left behind


def test_incomplete_folder_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_dataset(tmp_path / "data", num_train=1, num_val=1, num_test=1)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    real, calls = synthetic.synthetic_scene, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # fail in the middle of the val split
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "synthetic_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_dataset(tmp_path / "data", num_train=3, num_val=3, num_test=3)
    assert list(tmp_path.iterdir()) == []
