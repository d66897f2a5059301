"""COCO json loading (gains/annotations.py): records, the contiguous category map, segmentation decoding and
the errors and warnings that name the culprit.

Oracles: tiny COCO files written by conftest.write_coco with hand-placed squares, and pycocotools' RLE
encoding of a known mask (compressed, uncompressed and crowd annotations must decode back to it).
"""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import square, uncompressed_rle, write_coco
from gains.annotations import CategoryMap, DataError, load_coco, segmentation_to_mask

IMG = {"id": 1, "file_name": "a.png", "height": 30, "width": 40}


def ann(id=1, image_id=1, category_id=1, seg=None, **extra):
    return {"id": id, "image_id": image_id, "category_id": category_id,
            "segmentation": seg if seg is not None else [square(5, 5, 10)], "iscrowd": 0, **extra}


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
