"""gains.exports against independent oracles: tifffile / roifile / np.load read-back, pixel-centre
rasterisation of the ROI polygons (matplotlib), pycocotools.mask.encode of the dense masks."""
from __future__ import annotations

import json
import warnings
import zipfile
from collections import Counter

import numpy as np
import pytest
import roifile
import tifffile
from matplotlib.path import Path as MplPath
from pycocotools import mask as mask_utils
from scipy import ndimage

from gains import exports
from gains.exports import (coco_results, read_instances_npz, write_imagej_rois, write_instances_npz,
                           write_label_image)
from gains.instances import CropMasks

EIGHT = np.ones((3, 3), bool)


def random_masks(rng, n: int, size=(48, 64), max_side: int = 20, density: float = 0.6) -> CropMasks:
    """n random-noise masks on random boxes (holes, diagonal contacts and several parts galore); crops are
    not tightened, so boxes are larger than the pixels and some masks are empty."""
    h, w = size
    boxes, crops = [], []
    for _ in range(n):
        bw, bh = rng.integers(1, max_side, 2)
        x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
        boxes.append((x0, y0, x0 + bw, y0 + bh))
        crops.append(rng.random((bh, bw)) < density)
    return CropMasks(boxes, crops, size)


def shapes() -> CropMasks:
    """Hand-made cases on a 24x32 image: one per kind of outline."""
    h, w = 24, 32
    dense = np.zeros((9, h, w), bool)
    dense[0, 2:6, 3:10] = True                                           # rectangle
    dense[1, 8:16, 2:6], dense[1, 13:16, 2:12] = True, True              # L (concave corner)
    dense[2, 1, 12], dense[2, 2, 13], dense[2, 3, 12] = True, True, True  # diagonal chain: one 8-connected part
    dense[3, 2:4, 20:23], dense[3, 10:12, 25:30] = True, True            # two parts
    dense[4, 15:22, 15:22], dense[4, 17:19, 17:19] = True, False         # square with a hole
    dense[6, 23, 31] = True                                              # one pixel in the image corner
    dense[7] = True                                                      # the whole image
    dense[8, 5:9, 26:30] = [[1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]]  # X: pinch points
    return CropMasks.from_dense(dense)                                   # mask 5 is empty


def rasterise(points: np.ndarray, size) -> np.ndarray:
    """bool [H, W]: pixels whose centre (x + 0.5, y + 0.5) is inside the closed polygon (x, y) [P, 2]."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    return MplPath(np.asarray(points, np.float64), closed=False).contains_points(centres).reshape(h, w)


def score_oracle(dense: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Label image by brute force: each pixel takes 1 + the covering mask of highest score (ties: lower index)."""
    key = np.where(dense, scores[:, None, None], -np.inf)
    best = np.argmax(key, axis=0)  # first maximum = lowest index among ties
    return np.where(dense.any(0), best + 1, 0)


# ------------------------------------------------------------------------------------ label image
def test_label_image_is_a_compressed_imagej_tiff_with_the_highest_score_on_top(tmp_path):
    masks = random_masks(np.random.default_rng(0), 30)
    scores = np.random.default_rng(1).random(30).round(1)  # rounding makes ties
    path = write_label_image(tmp_path / "labels.tif", masks, scores)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert tif.is_imagej and page.dtype == np.uint16 and not page.is_tiled
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        back = page.asarray()
    np.testing.assert_array_equal(back, score_oracle(masks.dense(), scores))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]  # no temp file left behind


def test_label_image_uint32_is_a_plain_tiff_and_big_images_are_small(tmp_path):
    masks = random_masks(np.random.default_rng(2), 10)
    path = write_label_image(tmp_path / "l32.tif", masks, dtype=np.uint32)
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_imagej and tif.pages[0].dtype == np.uint32
        np.testing.assert_array_equal(tif.asarray(), score_oracle(masks.dense(), np.zeros(10)))
    disc = np.hypot(*np.mgrid[-10:11, -10:11]) <= 10
    big = CropMasks([(100 * k, 100 * k, 100 * k + 21, 100 * k + 21) for k in range(20)], [disc] * 20,
                    (2048, 2048))
    assert write_label_image(tmp_path / "big.tif", big).stat().st_size < 50_000  # 8 MB raw
    with tifffile.TiffFile(write_label_image(tmp_path / "raw.tif", big, compression=None)) as tif:
        assert tif.is_imagej and tif.pages[0].compression == tifffile.COMPRESSION.NONE
        np.testing.assert_array_equal(tif.asarray(), big.label_image())
    with pytest.raises(ValueError, match="uint8, uint16 or uint32"):
        write_label_image(tmp_path / "f.tif", masks, dtype=np.float32)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    masks = random_masks(np.random.default_rng(3), 5)
    path = write_label_image(tmp_path / "labels.tif", masks)
    before = path.read_bytes()

    def half_write(tmp, *args, **kwargs):
        with open(tmp, "wb") as f:
            f.write(b"II*\0 half")
        raise OSError("disk full")
    monkeypatch.setattr(exports.tifffile, "imwrite", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_label_image(path, masks.select([0]))
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------------------------- ImageJ ROIs
def read_rois(path) -> list:
    rois = roifile.roiread(path)
    return rois if isinstance(rois, list) else [rois]


def check_rois_rasterise_to_masks(masks: CropMasks, rois: list) -> None:
    """Every ROI: integer vertices, axis-parallel edges; per mask, the ROIs are its 8-connected parts with
    holes filled, each rasterising (pixel centres) exactly to its part."""
    by_mask = {}
    for roi in rois:
        by_mask.setdefault(int(roi.name.split("-")[0]) - 1, []).append(roi)
    for i in range(len(masks)):
        filled = ndimage.binary_fill_holes(masks.mask(i))
        parts, n_parts = ndimage.label(filled, EIGHT)
        got = by_mask.get(i, [])
        assert len(got) == n_parts, (i, len(got), n_parts)
        if n_parts > 1:
            assert [r.name for r in got] == [f"{i + 1:05d}-{k}" for k in range(1, n_parts + 1)]
        for k, roi in enumerate(got, start=1):  # parts are numbered in raster order by both
            assert roi.roitype == roifile.ROI_TYPE.POLYGON and roi.subpixel_coordinates is None
            assert roi.position == 0  # no stack position: the ROI applies to the (single) image
            xy = roi.coordinates()
            assert np.all(np.abs(np.diff(np.vstack([xy, xy[:1]]), axis=0)).min(1) == 0)  # no diagonal edges
            np.testing.assert_array_equal(rasterise(xy, masks.image_size), parts == k)


def test_rois_outline_each_part_exactly(tmp_path):
    masks = shapes()
    stats = Counter()
    with pytest.warns(UserWarning, match=r"1 empty mask.*00006.*1 mask\(s\) with holes"):
        path = write_imagej_rois(tmp_path / "rois.zip", masks, stats=stats)
    rois = read_rois(path)
    check_rois_rasterise_to_masks(masks, rois)
    names = ["00001", "00002", "00003", "00004-1", "00004-2", "00005", "00007", "00008", "00009"]
    assert [r.name for r in rois] == names
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == [f"{name}.roi" for name in names]  # the ROI Manager's order
    assert stats == Counter(rois=9, empty=1, multi_part=1, holes_filled=1)
    assert len(rois[0].coordinates()) == 4 and len(rois[1].coordinates()) == 6  # no collinear vertices
    assert len(rois[6].coordinates()) == 4 and rois[6].coordinates().max(0).tolist() == [32, 24]


@pytest.mark.parametrize("density", [0.3, 0.55, 0.8])
def test_rois_of_random_noise_masks_rasterise_back(tmp_path, density):
    masks = random_masks(np.random.default_rng(4), 40, density=density)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # holes and empty masks are expected here
        path = write_imagej_rois(tmp_path / "rois.zip", masks)
    check_rois_rasterise_to_masks(masks, read_rois(path))


def test_roi_names_and_no_warning_for_clean_masks(tmp_path):
    masks = shapes().select([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rois = read_rois(write_imagej_rois(tmp_path / "r.zip", masks, names=["a", "b", "c"]))
    assert [r.name for r in rois] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="unique"):
        write_imagej_rois(tmp_path / "r.zip", masks, names=["a", "a", "c"])
    with pytest.raises(ValueError, match="2 entries for 3 masks"):
        write_imagej_rois(tmp_path / "r.zip", masks, names=["a", "b"])
    assert read_rois(tmp_path / "r.zip")[0].name == "a"  # the earlier file is untouched


# ------------------------------------------------------------------------------------------- npz
def test_npz_round_trip_keeps_crops_overlaps_and_dtypes(tmp_path):
    masks = random_masks(np.random.default_rng(5), 25)  # overlapping, untight, some empty
    masks = CropMasks.concatenate([masks, CropMasks([(0, 0, 0, 0)], [np.zeros((0, 0), bool)], masks.image_size)])
    n = len(masks)
    scores, labels = np.linspace(0.1, 0.9, n), np.arange(n) % 3 + 1
    boxes = masks.boxes.astype(np.float64) + 0.25
    path = write_instances_npz(tmp_path / "inst.npz", masks, scores, labels, boxes)
    back = read_instances_npz(path)
    assert back["masks"].image_size == masks.image_size
    np.testing.assert_array_equal(back["masks"].boxes, masks.boxes)
    for a, b in zip(back["masks"].crops, masks.crops):
        assert a.dtype == bool and a.shape == b.shape and np.array_equal(a, b)
    assert back["scores"].dtype == np.float32 and back["labels"].dtype == np.int64
    assert back["boxes"].dtype == np.float32 and back["boxes"].shape == (n, 4)
    np.testing.assert_array_equal(back["scores"], scores.astype(np.float32))
    np.testing.assert_array_equal(back["labels"], labels)
    np.testing.assert_array_equal(back["boxes"], boxes.astype(np.float32))


def test_npz_layout_is_readable_with_numpy_alone(tmp_path):
    """The recipe of the write_instances_npz docstring, with plain numpy."""
    masks = random_masks(np.random.default_rng(6), 12)
    path = write_instances_npz(tmp_path / "x.npz", masks, np.ones(12), np.ones(12), np.zeros((12, 4)))
    f = np.load(path, allow_pickle=False)
    assert str(f["format"]) == "gains-instances-v1"
    h, w = f["image_size"]
    o, bits = f["crop_offsets"], f["crop_bits"]
    for i, (x0, y0, x1, y1) in enumerate(f["crop_boxes"]):
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = np.unpackbits(bits[o[i]:o[i + 1]], count=(y1 - y0) * (x1 - x0)).reshape(
            y1 - y0, x1 - x0).astype(bool)
        np.testing.assert_array_equal(m, masks.mask(i))


def test_npz_empty_and_wrong_files(tmp_path):
    path = write_instances_npz(tmp_path / "e.npz", CropMasks.empty((5, 7)), [], [], np.zeros((0, 4)))
    back = read_instances_npz(path)
    assert len(back["masks"]) == 0 and back["masks"].image_size == (5, 7) and back["boxes"].shape == (0, 4)
    np.savez(tmp_path / "other.npz", masks=np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="not a gains-instances-v1 file"):
        read_instances_npz(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="scores has 2 entries for 1 masks"):
        write_instances_npz(tmp_path / "bad.npz", shapes().select([0]), [1, 2], [1], np.zeros((1, 4)))
    assert not (tmp_path / "bad.npz").exists()


# ------------------------------------------------------------------------------------- COCO results
def test_coco_results_equal_pycocotools_on_dense_masks():
    masks = random_masks(np.random.default_rng(7), 20)
    dense = masks.dense()
    boxes = np.random.default_rng(8).random((20, 4)).astype(np.float32) * 30
    boxes[:, 2:] += boxes[:, :2]
    scores = np.random.default_rng(9).random(20)  # float64: every digit must survive
    labels = np.arange(20) % 2 + 1
    out = coco_results(masks, boxes, scores, labels, image_id=7, to_json_category=lambda k: 10 * k)
    oracle = mask_utils.encode(np.asfortranarray(dense.transpose(1, 2, 0).astype(np.uint8)))
    assert len(out) == 20
    for entry, rle, box, score, label in zip(out, oracle, boxes.tolist(), scores, labels):
        assert entry["segmentation"] == {"size": [48, 64], "counts": rle["counts"].decode("ascii")}
        assert entry["image_id"] == 7 and entry["category_id"] == 10 * label and entry["score"] == score
        assert entry["bbox"] == [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    json.loads(json.dumps(out))  # plain json types only
    assert coco_results(CropMasks.empty((4, 4)), np.zeros((0, 4)), [], [], 1) == []
