"""Large synthetic fields: exact instance counts, evaluator-exact crop masks, really touching / overlapping
nuclei, deterministic output, and a COCO writer that `gains.annotations.load_coco` accepts."""
from __future__ import annotations

import hashlib
import json
import time
import zlib

import numpy as np
import pytest
import shapely
from pycocotools import mask as mask_utils
from scipy import ndimage

from gains.annotations import load_coco, segmentation_to_mask
from gains.imageio import read_image_array
from gains.instances import CropMasks
from gains.field_layout import rasterise, snap
from gains.synthetic_field import (
    FIELD_CATEGORIES, contact_stats, field_label_image, make_field, neighbour_pairs,
    write_field_dataset)


@pytest.fixture(scope="module")
def small():
    return make_field(256, 256, 40, seed=3)


@pytest.fixture(scope="module")
def large():
    """The one big field of the module (1024 x 1024, 800 nuclei), with its generation time."""
    start = time.perf_counter()
    field = make_field(1024, 1024, 800, seed=0)
    return field, time.perf_counter() - start


def _full_rle(polygon: np.ndarray, height: int, width: int) -> dict:
    return mask_utils.frPyObjects([polygon.ravel().tolist()], height, width)[0]


def _dense(field) -> np.ndarray:
    """bool [N, H, W] by the evaluator's own rasteriser (small fields only)."""
    h, w = field.image.shape
    return np.stack([segmentation_to_mask([p.ravel().tolist()], h, w).astype(bool) for p in field.polygons])


# ------------------------------------------------------------------------------------------ basics
def test_field_shapes_and_types(small):
    assert small.image.shape == (256, 256) and small.image.dtype == np.uint8
    assert len(small) == len(small.polygons) == len(small.masks) == 40
    assert small.masks.image_size == (256, 256) and small.category_id == 1
    for p in small.polygons:
        assert p.dtype == np.float64 and p.shape == (32, 2)
        assert np.array_equal(p, np.round(p, 2))  # the json's precision
        assert p.min() >= 1.0 and p[:, 0].max() <= 255.0 and p[:, 1].max() <= 255.0
        assert shapely.Polygon(p).is_valid
    assert small.partner.shape == small.cluster.shape == (40,)
    assert (small.partner < np.arange(40)).all()  # placed against an earlier nucleus (or -1)
    assert (small.masks.areas() > 0).all()


@pytest.mark.parametrize("n", [0, 1, 7, 40, 61])
def test_exact_instance_count(n):
    field = make_field(256, 256, n, seed=n)
    assert len(field.polygons) == len(field.masks) == n
    assert field.image.shape == (256, 256)


def test_deterministic_and_seed_dependent():
    a, b = make_field(256, 256, 40, seed=5), make_field(256, 256, 40, seed=5)
    assert a.image.tobytes() == b.image.tobytes()
    assert all(np.array_equal(p, q) for p, q in zip(a.polygons, b.polygons))
    assert np.array_equal(a.masks.boxes, b.masks.boxes)
    assert all(np.array_equal(p, q) for p, q in zip(a.masks.crops, b.masks.crops))
    assert np.array_equal(a.overlap_pairs, b.overlap_pairs) and np.array_equal(a.partner, b.partner)
    c = make_field(256, 256, 40, seed=6)
    assert a.image.tobytes() != c.image.tobytes()
    assert not np.array_equal(a.polygons[0], c.polygons[0])
    # sequence seeds (what the data set writer uses) work and differ from the int seed
    assert not np.array_equal(make_field(256, 256, 40, seed=(5, 1)).polygons[0], a.polygons[0])


def test_layout_does_not_depend_on_dtype():
    a = make_field(256, 256, 40, seed=2, dtype="uint8")
    b = make_field(256, 256, 40, seed=2, dtype="uint16")
    assert b.image.dtype == np.uint16 and b.image.max() > 255
    assert all(np.array_equal(p, q) for p, q in zip(a.polygons, b.polygons))


# ---------------------------------------------------------------------------------------- masks
def test_masks_equal_full_size_rasterisation(small):
    """Every mask equals what the evaluator (gains.annotations.segmentation_to_mask) makes of its polygon."""
    assert np.array_equal(small.masks.dense(), _dense(small))


def test_large_field_masks_equal_full_size_rasterisation(large):
    field, seconds = large
    assert len(field) == 800
    assert seconds < 5.0, f"1024x1024 with 800 nuclei took {seconds:.1f} s"
    h, w = field.image.shape
    # all 800 through the full-size RLE (cheap: runs, not pixels), compared with the crops' own RLE ...
    for rle, polygon in zip(field.masks.to_rles(), field.polygons):
        assert rle["counts"] == _full_rle(polygon, h, w)["counts"]
    # ... and a sample decoded at full size by the evaluator itself
    masks = field.masks
    for i in np.random.default_rng(0).choice(len(field), 12, replace=False).tolist():
        assert np.array_equal(masks.mask(i), segmentation_to_mask([field.polygons[i].ravel().tolist()], h, w))


def test_shifted_canvas_is_exact_only_with_snapping():
    """Why `snap` exists: pycocotools truncates 5*x + 0.5, whose last bit changes when x is shifted; with
    vertices kept off 5*x = k + 0.5 the bbox-canvas rasterisation equals the full-size one, without it
    it does not (about one polygon in five)."""
    rng = np.random.default_rng(7)
    height = width = 4096
    t = np.linspace(0.0, 2.0 * np.pi, 32, endpoint=False)
    mismatches = {True: 0, False: 0}
    for _ in range(300):
        centre = rng.uniform(30.0, 4066.0, 2)
        raw = centre + rng.uniform(5.0, 15.0) * np.stack([np.cos(t), rng.uniform(0.7, 1.0) * np.sin(t)], 1)
        for snapped in (True, False):
            polygon = snap(raw) if snapped else np.round(raw, 2)
            box, crop = rasterise(polygon, height, width)
            rle = CropMasks(np.array([box]), [crop], (height, width)).to_rles()[0]
            mismatches[snapped] += rle["counts"] != _full_rle(polygon, height, width)["counts"]
    assert mismatches[True] == 0
    assert mismatches[False] > 0


def test_snap_moves_at_most_a_hundredth():
    x = np.random.default_rng(0).uniform(0, 5000, 10000)
    snapped = snap(x)
    assert np.abs(snapped - np.round(x, 2)).max() <= 0.0100001
    # pycocotools' (int)(5x + 0.5) is then never a near-tie that the last bit of 5x could flip
    frac = (5.0 * snapped + 0.5) % 1.0
    assert np.minimum(frac, 1.0 - frac).min() > 0.049


# ------------------------------------------------------------------------------ touching / overlap
def test_most_nuclei_touch_a_neighbour(small):
    dense = _dense(small)
    n = len(dense)
    others = [dense.sum(0) - d for d in dense.astype(np.int32)]  # pixels of every other nucleus
    square = np.ones((3, 3), bool)
    within = {gap: np.mean([(ndimage.binary_dilation(dense[i], square, iterations=gap) & (others[i] > 0)).any()
                            for i in range(n)]) for gap in (1, 2)}
    assert within[1] >= 0.8 and within[2] >= 0.9, within


def test_touching_partners_are_close_but_apart(large):
    """A touching nucleus sits against its partner: outlines 0.1..2 px apart, centres about the sum of the
    radii apart."""
    field, _ = large
    pairs = set(map(tuple, field.overlap_pairs.tolist()))
    gaps, ratios = [], []
    for i, j in enumerate(field.partner.tolist()):
        if j < 0 or (j, i) in pairs:
            continue
        a, b = shapely.Polygon(field.polygons[i]), shapely.Polygon(field.polygons[j])
        gaps.append(shapely.distance(a, b))
        radii = np.sqrt(a.area / np.pi) + np.sqrt(b.area / np.pi)
        ratios.append(np.linalg.norm(np.subtract(a.centroid.coords[0], b.centroid.coords[0])) / radii)
    assert len(gaps) > 500
    assert min(gaps) > 0.1 and max(gaps) < 2.0
    assert 0.85 < np.median(ratios) < 1.15


def test_contact_stats_of_large_field(large):
    field, _ = large
    stats = contact_stats(field, max_gap=1)
    assert stats["in_contact"] >= 0.9, stats
    assert stats["overlapping"] == pytest.approx(0.1, abs=0.03)
    assert contact_stats(field, max_gap=2)["in_contact"] >= 0.95
    with pytest.raises(ValueError, match="max_gap"):
        contact_stats(field, max_gap=0)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_overlap_fraction_roughly_as_asked(fraction):
    field = make_field(512, 512, 200, seed=1, overlap_fraction=fraction)
    shared = field.masks.intersections(field.masks)
    np.fill_diagonal(shared, 0)
    overlapping = (shared > 0).any(1)
    assert overlapping.mean() == pytest.approx(fraction, abs=0.04)
    # real overlaps of area: each pair shares >= 3% of the smaller mask
    areas = field.masks.areas()
    for i, j in field.overlap_pairs.tolist():
        assert shared[i, j] >= 0.03 * min(areas[i], areas[j])


def test_only_overlap_pairs_share_pixels(small, large):
    """Touching (non-overlapping) neighbours have disjoint masks; pixels are shared by the overlap pairs only."""
    for field in (small, large[0]):
        shared = field.masks.intersections(field.masks)
        np.fill_diagonal(shared, 0)
        i, j = np.nonzero(np.triu(shared))
        assert set(zip(i.tolist(), j.tolist())) == set(map(tuple, field.overlap_pairs.tolist()))
        assert len(field.overlap_pairs) > 0
        # an overlap pair is a pair: no nucleus overlaps two others
        assert len(np.unique(field.overlap_pairs)) == 2 * len(field.overlap_pairs)
    dense = _dense(small)
    touching_neighbours = sum(1 for i, j in neighbour_pairs(small.masks, 1).tolist()
                              if not (dense[i] & dense[j]).any())
    assert touching_neighbours >= 20  # the disjointness above is about nuclei that really are adjacent


def test_neighbour_pairs_match_brute_force(small):
    boxes = small.masks.boxes
    for pad in (0, 2):
        lo, hi = boxes[:, :2] - pad, boxes[:, 2:] + pad
        meet = ((np.maximum(lo[:, None], lo[None]) < np.minimum(hi[:, None], hi[None])).all(-1))
        i, j = np.nonzero(np.triu(meet, 1))
        assert set(map(tuple, neighbour_pairs(small.masks, pad).tolist())) == set(zip(i.tolist(), j.tolist()))


# ------------------------------------------------------------------------------------------- pixels
def test_image_is_fluorescence_like(small):
    dense = _dense(small)
    cover = dense.sum(0)
    image = small.image.astype(np.float64)
    background, single, double = image[cover == 0], image[cover == 1], image[cover >= 2]
    assert single.mean() > 4 * background.mean()  # bright nuclei on a dark background
    assert double.mean() > 1.3 * single.mean()  # overlaps add up
    assert background.std() > 1.0 and single.std() > 5.0  # noise and texture, not flat fills


def test_label_image_later_instance_wins(small):
    labels = field_label_image(small)
    assert labels.dtype == np.uint16 and labels.shape == (256, 256)
    dense = _dense(small)
    covered = dense.any(0)
    assert np.array_equal(labels > 0, covered)
    # every covered pixel carries the highest index covering it
    top = len(dense) - np.argmax(dense[::-1], axis=0)
    assert np.array_equal(labels[covered], top[covered])
    for i, j in small.overlap_pairs.tolist():
        assert (labels[dense[i] & dense[j]] == j + 1).all()


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, message", [
    (dict(height=0), "height and width"),
    (dict(num_instances=-1), "num_instances"),
    (dict(radius=(5.0, 3.0)), "radius"),
    (dict(radius=(1.0, 3.0)), "radius"),
    (dict(overlap_fraction=1.5), "overlap_fraction"),
    (dict(cluster_size=(0, 3)), "cluster_size"),
    (dict(dtype="float32"), "dtype"),
    (dict(seed=-1), "seed"),
    (dict(height=30, width=30, num_instances=2), "30x30 field is too small"),
    (dict(num_instances=100), "would cover"),
])
def test_bad_arguments(kwargs, message):
    args = dict(height=256, width=256, num_instances=10) | kwargs
    with pytest.raises(ValueError, match=message):
        make_field(**args)


def test_overfull_field_names_the_sizes():
    outcomes = []
    for seed in range(4):  # near the packing limit: each seed either fits exactly or says what did not
        try:
            outcomes.append(len(make_field(256, 256, 89, seed=seed)))
        except ValueError as e:
            assert "of 89 nuclei" in str(e) and "256x256" in str(e) and "7..14" in str(e)
            outcomes.append(None)
    assert None in outcomes and set(outcomes) <= {89, None}


# ------------------------------------------------------------------------------------------ writer
def _tree_digest(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_writer_loads_with_load_coco(tmp_path):
    kwargs = dict(height=256, width=256, num_instances=40, seed=4)
    paths = write_field_dataset(tmp_path / "fields", **kwargs)
    assert sorted(paths) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("json", "images"))
    for split, count in {"train": 2, "val": 1, "test": 1}.items():
        records, categories, problems = load_coco(paths[f"{split}_json"], paths[f"{split}_images"])
        assert problems == {} and categories.names == ("nucleus",) and categories.json_ids == (1,)
        assert len(records) == count
        for index, record in enumerate(records):
            assert record.path.name == f"field_{index:04d}.tif" and (record.height, record.width) == (256, 256)
            field = make_field(seed=(4, zlib.crc32(split.encode()), index), height=256, width=256,
                               num_instances=40, dtype="uint16")
            assert np.array_equal(read_image_array(record.path), field.image)
            assert len(record.annotations) == 40
            for ann, polygon, area in zip(record.annotations, field.polygons, field.masks.areas()):
                assert np.array_equal(np.reshape(ann.segmentation[0], (-1, 2)), polygon)
                assert ann.area == area and ann.category_id == 1 and not ann.iscrowd
                assert ann.bbox == pytest.approx((*polygon.min(0), *(polygon.max(0) - polygon.min(0))), abs=0.011)
    data = json.loads(paths["train_json"].read_text())
    assert data["categories"] == FIELD_CATEGORIES
    assert [a["id"] for a in data["annotations"]] == list(range(1, 81))
    assert not list(tmp_path.glob(".fields.tmp-*"))  # the temporary folder is gone


def test_dataset_writer_is_deterministic_and_atomic(tmp_path):
    kwargs = dict(splits={"train": 1, "val": 1}, height=128, width=160, num_instances=12, seed=9,
                  image_format="png", dtype="uint8")
    a = write_field_dataset(tmp_path / "a", **kwargs)
    write_field_dataset(tmp_path / "b", **kwargs)
    digest = _tree_digest(tmp_path / "a")
    assert digest == _tree_digest(tmp_path / "b") and "train/field_0000.png" in digest
    assert read_image_array(a["val_images"] / "field_0000.png").dtype == np.uint8
    # same arguments again: returned untouched; other arguments: refused unless overwrite
    mtime = a["train_json"].stat().st_mtime_ns
    write_field_dataset(tmp_path / "a", **kwargs)
    assert a["train_json"].stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_field_dataset(tmp_path / "a", **(kwargs | {"seed": 10}))
    write_field_dataset(tmp_path / "a", **(kwargs | {"seed": 10}), overwrite=True)
    assert _tree_digest(tmp_path / "a") != digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_dataset_writer_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_format"):
        write_field_dataset(tmp_path / "x", image_format="jpg")
    with pytest.raises(ValueError, match="splits"):
        write_field_dataset(tmp_path / "x", splits={"train": -1})
    with pytest.raises(ValueError, match="would cover"):
        write_field_dataset(tmp_path / "x", height=128, width=128, num_instances=500)
    assert not (tmp_path / "x").exists()
