import json
import random

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from conftest import square, uncompressed_rle, write_coco, write_png
from gains.annotations import CategoryMap, DataError, load_coco, segmentation_to_mask
from gains.imageio import read_image, to_float_rgb
from gains.transforms import EvalTransform, TrainTransform, masks_to_boxes, resized_shape

IMG = {"id": 1, "file_name": "a.png", "height": 30, "width": 40}


def ann(id=1, image_id=1, category_id=1, seg=None, **extra):
    return {"id": id, "image_id": image_id, "category_id": category_id,
            "segmentation": seg if seg is not None else [square(5, 5, 10)], "iscrowd": 0, **extra}


# ---------------------------------------------------------------- records and category mapping

def test_category_map_contiguous_and_back(tmp_path):
    cats = [{"id": 7, "name": "b"}, {"id": 0, "name": "a"}]
    json_path, image_dir = write_coco(tmp_path, [IMG], [ann(category_id=7), ann(id=2, category_id=0)], cats)
    records, cmap, _ = load_coco(json_path, image_dir)
    assert cmap.json_ids == (0, 7) and cmap.names == ("a", "b")
    assert [a.label for a in records[0].annotations] == [2, 1]
    assert [cmap.to_json_id(a.label) for a in records[0].annotations] == [7, 0]
    assert CategoryMap.from_dict(cmap.to_dict()) == cmap


def test_polygons_rle_crowd_and_missing_area(tmp_path):
    m = np.zeros((30, 40), np.uint8, order="F")
    m[2:6, 3:9] = 1
    compressed = mask_utils.encode(m)
    compressed["counts"] = compressed["counts"].decode()
    uncompressed = uncompressed_rle(m)
    anns = [ann(1, seg=[square(1, 1, 4), square(20, 20, 4)]),  # two polygons: their union
            ann(2, seg=compressed, iscrowd=1),
            ann(3, seg=uncompressed)]
    json_path, image_dir = write_coco(tmp_path, [IMG], anns)
    records, _, dropped = load_coco(json_path, image_dir)
    a1, a2, a3 = records[0].annotations
    assert dropped == {}
    both = segmentation_to_mask(a1.segmentation, 30, 40)
    assert both[2, 2] and both[21, 21] and not both[10, 10]
    assert a1.area == both.sum()  # missing area -> pixel count
    assert a2.iscrowd and (segmentation_to_mask(a2.segmentation, 30, 40) == m).all()
    assert (segmentation_to_mask(a3.segmentation, 30, 40) == m).all()
    assert a3.bbox == (3.0, 2.0, 6.0, 4.0)  # missing bbox -> from the mask



@pytest.mark.parametrize("bad, message", [
    (lambda a, i: a[1].update(id=1), "duplicate annotation id 1"),
    (lambda a, i: a[0].update(id=0), "has id 0.*>= 1"),
    (lambda a, i: a[0].update(category_id=9), "annotation id 1 has category_id 9"),
    (lambda a, i: a[0].update(image_id=5), "annotation id 1 refers to image id 5"),
    (lambda a, i: i[0].update(file_name="../escape.png"), "outside the image folder"),
    (lambda a, i: i[0].update(height=31), r"image id 1 \(a.png\) is 30x40.*31x40"),
    (lambda a, i: i.append({"id": 1, "file_name": "b.png", "height": 30, "width": 40}),
     "duplicate image id 1"),
])
def test_errors_name_the_culprit(tmp_path, bad, message):
    images = [dict(IMG)]
    anns = [ann(1), ann(2)]
    write_coco(tmp_path, [dict(IMG), {"id": 9, "file_name": "b.png", "height": 30, "width": 40}], [])
    bad(anns, images)
    json_path = tmp_path / "bad.json"
    json_path.write_text(json.dumps({"images": images, "annotations": anns,
                                     "categories": [{"id": 1, "name": "c"}]}))
    with pytest.raises(DataError, match=message):
        load_coco(json_path, tmp_path / "train")


def test_missing_image_file(tmp_path):
    json_path, image_dir = write_coco(tmp_path, [IMG], [ann()], pixels={"a.png": False})
    with pytest.raises(DataError, match=r"image id 1: file .*a.png not found"):
        load_coco(json_path, image_dir)


def test_droppable_problems_are_counted_once(tmp_path):
    anns = [ann(1, seg=[[1, 1, 5, 5]]),                    # < 3 points: dropped
            ann(2, seg=[[1, 1, 5, 5], square(2, 2, 6)]),   # one bad polygon of two: kept
            ann(3, seg=[]),                                 # empty segmentation
            ann(4, bbox=[3, 3, 0, 5]),                      # degenerate box
            ann(5)]
    json_path, image_dir = write_coco(tmp_path, [IMG], anns)
    with pytest.warns(UserWarning) as caught:
        records, _, dropped = load_coco(json_path, image_dir)
    assert [a.id for a in records[0].annotations] == [2, 5]
    assert len(records[0].annotations[0].segmentation) == 1
    text = "\n".join(str(w.message) for w in caught)
    assert "annotation id 1" in text and "annotation id 3" in text and "annotation id 4" in text
    assert sorted(dropped.values()) == [1, 1, 1, 2]  # bad polygons (ids 1, 2), no polygon left (1), empty (3),
    #                                                  degenerate (4)
    assert len(caught) == len(dropped)  # one warning per kind, not per item


def test_images_without_annotations_kept_or_skipped(tiny_coco):
    json_path, image_dir = tiny_coco
    records, _, _ = load_coco(json_path, image_dir)
    assert [r.image_id for r in records] == [1, 2] and records[1].annotations == []
    with pytest.warns(UserWarning, match="1 images without annotations skipped"):
        records, _, dropped = load_coco(json_path, image_dir, skip_empty=True)
    assert [r.image_id for r in records] == [1]


# ---------------------------------------------------------------- images

FORMATS = [(np.uint8, ".png", 0), (np.uint8, ".png", 3), (np.uint16, ".png", 0), (np.uint8, ".jpg", 0),
           (np.uint8, ".jpg", 3), (np.uint16, ".tif", 0), (np.uint16, ".tif", 3), (np.float32, ".tif", 0),
           (np.float32, ".tif", 3)]  # PIL cannot write 16-bit RGB PNG; 16-bit RGB is covered by TIFF


@pytest.mark.parametrize("dtype, suffix, channels", FORMATS)
def test_read_image_formats(tmp_path, dtype, suffix, channels):
    rng = np.random.default_rng(0)
    shape = (12, 10, 3) if channels else (12, 10)
    top = 1.0 if dtype == np.float32 else np.iinfo(dtype).max
    array = (rng.random(shape) * top).astype(dtype)
    array.flat[0] = top  # make the full range present
    path = tmp_path / f"im{suffix}"
    if suffix == ".tif":
        import tifffile
        tifffile.imwrite(path, array)
    else:
        write_png(path, array)
    image = read_image(path)
    assert image.dtype == torch.float32 and image.shape == (3, 12, 10)
    assert 0.0 <= image.min() and image.max() <= 1.0
    if suffix != ".jpg":  # lossless formats: exact scaling
        expected = array.astype(np.float32) / top
        expected = np.repeat(expected[None], 3, 0) if not channels else np.moveaxis(expected, -1, 0)
        np.testing.assert_allclose(image.numpy(), expected, rtol=1e-6)


def test_percentile_normalisation_stretches_dim_16bit():
    dim = np.linspace(100, 4000, 400, dtype=np.float64).reshape(20, 20).astype(np.uint16)
    assert float(to_float_rgb(dim).max()) < 0.07  # /65535 leaves it nearly black
    stretched = to_float_rgb(dim, "percentile")
    assert float(stretched.max()) == 1.0 and float(stretched.min()) == 0.0


# ---------------------------------------------------------------- transforms

def test_resized_shape_like_detectron2():
    assert resized_shape(512, 512, 800, 1333) == (800, 800)
    assert resized_shape(200, 1000, 800, 1333) == (267, 1333)  # capped by the long side
    assert resized_shape(210, 211, 640, 1333) == (640, 643)


def test_masks_to_boxes_exclusive_corners():
    masks = torch.zeros((2, 10, 12), dtype=torch.uint8)
    masks[0, 2:5, 3:9] = 1
    assert masks_to_boxes(masks).tolist() == [[3, 2, 9, 5], [0, 0, 0, 0]]


def test_joint_resize_and_flip_keep_maps_registered():
    h, w = 20, 30
    masks = torch.zeros((1, h, w), dtype=torch.uint8)
    masks[0, 5:15, 2:12] = 1
    ga = torch.ones((1, h, w))
    ga[0, 5:15, 2:12] = torch.linspace(1, 1.5, 10)[None, :]  # a smooth ramp along x
    image = masks[0].float().expand(3, h, w).clone()
    random.seed(0)
    t = TrainTransform([40], 1000, hflip_prob=1.0)
    out_image, out_masks, out_ga = t(image, masks, ga)
    assert out_image.shape == (3, 40, 60) and out_masks.dtype == torch.uint8
    assert set(out_masks.unique().tolist()) <= {0, 1}              # nearest: still binary
    assert 16 < len(out_ga.unique()) and out_ga.max() <= 1.5 + 1e-6  # bilinear: still a smooth ramp
    # flipped: the ramp now decreases along x where the mask is
    row = out_ga[0, 20][out_masks[0, 20].bool()]
    assert row[0] > row[-1]
    # mask and image are flipped together
    assert torch.equal(out_masks[0].bool(), out_image[0] > 0.5)
    assert masks_to_boxes(out_masks).tolist() == [[60 - 24, 10, 60 - 4, 30]]


def test_test_transform_is_deterministic():
    image = torch.rand(3, 30, 40)
    masks = torch.zeros((0, 30, 40), dtype=torch.uint8)
    a = EvalTransform(60, 1000)(image, masks)
    b = EvalTransform(60, 1000)(image, masks)
    assert a[0].shape == (3, 60, 80) and torch.equal(a[0], b[0]) and a[1].shape == (0, 60, 80)
