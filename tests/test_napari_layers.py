"""gains.napari_layers: the data napari would be given (napari itself is not a dependency). Shapes,
dtypes, (row, col) order and napari's pixel-centre offset: the outlines, shifted back to gains' corner
convention and filled by pixel centres, give exactly each mask, overlaps kept."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from conftest import ellipse, write_coco, write_png
from gains.annotations import segmentation_to_mask
from gains.exports import write_instances_npz, write_label_image
from gains.instances import CropMasks
from gains.mask_polygons import fill_rings
from gains.napari_layers import dataset_layers, outline_polygons, prediction_layers


def fill_napari_polygons(polygons, owner, n: int, height: int, width: int) -> np.ndarray:
    """bool [n, H, W]: napari (row, col) polygons back to (x, y) corner coordinates, filled by centres."""
    out = np.zeros((n, height, width), bool)
    for poly, i in zip(polygons, owner):
        (x0, y0, x1, y1), crop = fill_rings([poly[:, ::-1] + 0.5], height, width)
        out[i, y0:y1, x0:x1] |= crop
    return out


def test_outlines_are_row_col_and_shifted_by_half_a_pixel():
    dense = np.zeros((3, 10, 12), bool)
    dense[0, 2:5, 3:7] = True                          # a 3x4 box: rows 2..4, cols 3..6
    dense[1, 4:9, 5:11], dense[1, 6, 8] = True, False  # overlaps mask 0; one hole
    dense[2, 0, 0], dense[2, 9, 11] = True, True       # two parts
    polygons, owner = outline_polygons(CropMasks.from_dense(dense))
    assert owner == [0, 1, 2, 2] and all(p.dtype == np.float64 and p.shape[1] == 2 for p in polygons)
    rows, cols = polygons[0][:, 0], polygons[0][:, 1]
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (1.5, 4.5, 2.5, 6.5)  # pixel centres 2..4, 3..6
    filled = fill_napari_polygons(polygons, owner, 3, 10, 12)
    np.testing.assert_array_equal(filled[[0, 2]], dense[[0, 2]])
    np.testing.assert_array_equal(filled[1], ndimage.binary_fill_holes(dense[1]))  # napari polygons: no holes


def test_prediction_layers_of_an_evaluate_images_output(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    write_png(tmp_path / "imgs" / "field_01.png", image)
    yy, xx = np.mgrid[0:30, 0:40] + 0.5
    dense = np.stack([(xx - 14) ** 2 + (yy - 14) ** 2 < 80, (xx - 24) ** 2 + (yy - 16) ** 2 < 60])
    masks, scores = CropMasks.from_dense(dense), np.array([0.6, 0.9], np.float32)
    out = tmp_path / "pred"
    write_instances_npz(out / "masks" / "field_01.npz", masks, scores, [1, 2], np.zeros((2, 4)))
    write_label_image(out / "labels" / "field_01_labels.tif", masks, scores)
    (out / "images.json").write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "cell"},
                                                                             {"id": 2, "name": "nucleus"}]}))
    (img, img_kw, k1), (labels, lab_kw, k2), (polys, shp_kw, k3) = prediction_layers(
        tmp_path / "imgs" / "field_01.png", out)
    assert (k1, k2, k3) == ("image", "labels", "shapes")
    np.testing.assert_array_equal(img, image)
    assert img_kw == {"name": "field_01", "rgb": True}
    assert labels.dtype == np.uint16 and labels.shape == (30, 40)
    np.testing.assert_array_equal(labels, tifffile.imread(out / "labels" / "field_01_labels.tif"))
    assert shp_kw["shape_type"] == "polygon" and shp_kw["name"] == "field_01 outlines"
    features = shp_kw["features"]
    assert features == {"instance": [1, 2], "score": [pytest.approx(0.6), pytest.approx(0.9)],
                        "category": ["cell", "nucleus"]}
    filled = fill_napari_polygons(polys, [i - 1 for i in features["instance"]], 2, 30, 40)
    np.testing.assert_array_equal(filled, dense)  # both overlapping instances, whole
    with pytest.raises(FileNotFoundError, match=r"masks/other\.npz not found; predict the folder"):
        prediction_layers(tmp_path / "imgs" / "other.png", out)


def test_dataset_layers_of_a_training_image(tmp_path):
    polys = [ellipse(20, 16, 10, 8), ellipse(28, 20, 9, 7), ellipse(10, 30, 5, 5)]
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 48}]
    anns = [{"id": 7 + i, "image_id": 1, "category_id": 1 + (i == 2), "segmentation": [p], "iscrowd": 0}
            for i, p in enumerate(polys)]
    write_coco(tmp_path, images, anns, [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}], name="train")
    (img, _, _), (labels, _, _), (shapes, kw, _) = dataset_layers(tmp_path, "train", "a.png")
    dense = np.stack([segmentation_to_mask([p], 40, 48) > 0 for p in polys])
    assert img.shape == (40, 48) and labels.shape == (40, 48) and labels.max() == 3
    np.testing.assert_array_equal(labels > 0, dense.any(0))
    assert kw["features"] == {"annotation_id": [7, 8, 9], "category": ["cell", "cell", "nucleus"]}
    np.testing.assert_array_equal(fill_napari_polygons(shapes, [0, 1, 2], 3, 40, 48), dense)
    with pytest.raises(KeyError, match="'b.png' is not an image of"):
        dataset_layers(tmp_path, "train", "b.png")
