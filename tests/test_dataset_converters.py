"""Converters to COCO: label images (round trip against pycocotools), labelme json, atomic data set folders,
the DSB2018 sample from the stardist wheel, and the preprocess.py converter flags."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import write_png
from gains.annotations import DataError, load_coco
from gains.dataset_converters import (convert_dsb2018_sample, label_image_to_annotations, labelme_to_coco, labels_to_coco,
                           pair_label_files, split_items, write_coco_dataset)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import preprocess  # noqa: E402

HAS_STARDIST = importlib.util.find_spec("stardist") is not None


def decode(seg, height, width) -> np.ndarray:
    """Independent oracle: pycocotools' own rasteriser, bool [H, W]."""
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width)) if isinstance(seg, list) else seg
    return mask_utils.decode(rle).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def label_scene(dtype=np.uint16) -> np.ndarray:
    """64x80 label image: two touching discs (ids 3 and 17), a 2-part instance (id 300 or 200), a concave L,
    a 1-px and a 2-px instance (ids 5, 6). Ids are non-contiguous."""
    yy, xx = np.mgrid[:64, :80]
    label = np.zeros((64, 80), np.int64)
    label[(yy - 20) ** 2 + (xx - 18) ** 2 < 100] = 3
    label[((yy - 20) ** 2 + (xx - 35) ** 2 < 90) & (label == 0)] = 17   # shares a border with id 3
    big = 300 if np.iinfo(dtype).max >= 300 else 200
    label[45:52, 5:15] = big
    label[45:55, 60:70] = big                                           # second part of the same instance
    label[30:60, 30:36] = 9
    label[54:60, 30:50] = 9                                             # an L shape
    label[2, 2] = 5
    label[2, 70:72] = 6
    return label.astype(dtype)


# --------------------------------------------------------------------------------------------- label images
@pytest.mark.parametrize("dtype, suffix", [(np.uint8, ".png"), (np.uint16, ".png"), (np.uint16, ".tif"),
                                           (np.uint32, ".tif")])
def test_label_image_round_trip(tmp_path, dtype, suffix):
    label = label_scene(dtype)
    write_png(tmp_path / "a.png", np.zeros(label.shape, np.uint8))
    if suffix == ".tif":
        tifffile.imwrite(tmp_path / f"a_masks{suffix}", label)
    else:
        Image.fromarray(label).save(tmp_path / f"a_masks{suffix}")
    coco = labels_to_coco(pair_label_files(tmp_path), category_name="nucleus")
    ids = [i for i in np.unique(label) if i]
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(ids) + 1))
    assert coco["images"] == [{"id": 1, "file_name": "a.png", "height": 64, "width": 80}]
    assert coco["categories"] == [{"id": 1, "name": "nucleus"}]
    for ann, k in zip(coco["annotations"], ids):
        truth = label == k
        mask = decode(ann["segmentation"], 64, 80)
        assert iou(mask, truth) >= 0.9 if truth.sum() >= 30 else (mask == truth).all()
        assert (mask == truth).all()  # the rings are pixel-exact, not just close
        ys, xs = np.nonzero(truth)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["area"] == truth.sum() and ann["iscrowd"] == 0 and ann["image_id"] == 1
    by_size = {int((label == k).sum()): a for a, k in zip(coco["annotations"], ids)}
    assert isinstance(by_size[1]["segmentation"], dict) and isinstance(by_size[2]["segmentation"], dict)
    assert coco["info"]["conversion"] == {"instances": 6, "multi_part": 1, "rle_tiny": 2}


def test_two_part_instance_is_one_annotation_with_two_polygons():
    label = np.zeros((20, 30), np.uint8)
    label[2:8, 2:8] = 4
    label[10:18, 20:28] = 4
    (ann,) = label_image_to_annotations(label, image_id=7, first_id=11)
    assert ann["id"] == 11 and ann["image_id"] == 7 and len(ann["segmentation"]) == 2
    assert all(len(p) >= 8 and len(p) % 2 == 0 for p in ann["segmentation"])
    assert (decode(ann["segmentation"], 20, 30) == (label == 4)).all()
    assert ann["bbox"] == [2.0, 2.0, 26.0, 16.0] and ann["area"] == 36 + 64


def test_tiny_holes_rle_option_and_no_background():
    label = np.zeros((24, 24), np.uint16)
    label[3:20, 3:20] = 1
    label[9:12, 9:12] = 0            # a hole
    label[22, 22] = 2                # 1 px
    stats = Counter()
    ring, tiny = label_image_to_annotations(label, image_id=1, stats=stats)
    assert isinstance(ring["segmentation"], dict) and isinstance(tiny["segmentation"], dict)
    assert (decode(ring["segmentation"], 24, 24) == (label == 1)).all()  # hole kept exactly
    assert (decode(tiny["segmentation"], 24, 24) == (label == 2)).all()
    assert stats == Counter(instances=2, rle_holes=1, rle_tiny=1)
    filled = label_image_to_annotations(label, image_id=1, holes="fill")[0]
    assert isinstance(filled["segmentation"], list)
    assert decode(filled["segmentation"], 24, 24).sum() == (label == 1).sum() + 9 and filled["area"] == 280
    rles = label_image_to_annotations(label, image_id=1, segmentation="rle")
    assert all(isinstance(a["segmentation"]["counts"], str) for a in rles)
    full = np.full((10, 12), 70000, np.uint32)   # every pixel labelled, a 32-bit id
    full[:, 6:] = 4
    anns = label_image_to_annotations(full, image_id=1)
    assert [a["area"] for a in anns] == [60.0, 60.0]
    assert (decode(anns[1]["segmentation"], 10, 12) == (full == 70000)).all()


def test_bad_label_images_and_pairing_errors(tmp_path):
    with pytest.raises(DataError, match="2-D"):
        label_image_to_annotations(np.zeros((4, 4, 3), np.uint8), image_id=1)
    with pytest.raises(DataError, match="dtype float"):
        label_image_to_annotations(np.zeros((4, 4), np.float32), image_id=1)
    for name in ("a.png", "a_masks.png", "b.png", "c_masks.tif", "notes.txt"):
        write_png(tmp_path / name, np.zeros((8, 8), np.uint8)) if name.endswith("png") else \
            (tmp_path / name).write_text("x")
    with pytest.raises(DataError) as err:
        pair_label_files(tmp_path)
    assert "images without a label image (1): b.png" in str(err.value)
    assert "label images without an image (1): c_masks.tif" in str(err.value)
    images, labels = tmp_path / "img", tmp_path / "lab"
    write_png(images / "x.png", np.zeros((8, 8), np.uint8))
    write_png(labels / "x.png", np.zeros((9, 8), np.uint8))
    assert pair_label_files(images, labels) == [(images / "x.png", labels / "x.png")]
    with pytest.raises(DataError, match="is 8x8 .* is 9x8"):
        labels_to_coco(pair_label_files(images, labels))
    write_png(labels / "x_masks.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="several label images"):
        pair_label_files(images, labels)


# ------------------------------------------------------------------------------------------------- labelme
def labelme_doc(image_path="img.png", shapes=(), height=40, width=50, image_data=None) -> dict:
    return {"version": "5.2.1", "flags": {}, "shapes": list(shapes), "imagePath": image_path,
            "imageData": image_data, "imageHeight": height, "imageWidth": width}


def shape(label, points, kind="polygon", group_id=None) -> dict:
    return {"label": label, "points": points, "group_id": group_id, "shape_type": kind, "flags": {}}


def test_labelme_shapes_groups_and_embedded_image(tmp_path):
    write_png(tmp_path / "img.png", np.full((40, 50), 9, np.uint8))
    (tmp_path / "a.json").write_text(json.dumps(labelme_doc(shapes=[
        shape("cell", [[2, 2], [12, 2], [12, 10], [2, 10]]),
        shape("nucleus", [[30, 20], [20, 30]], "rectangle"),
        shape("cell", [[40, 10], [45, 10]], "circle"),
        shape("cell", [[2, 30], [6, 30], [6, 36]], group_id=1),
        shape("cell", [[10, 30], [16, 30], [16, 36], [10, 36]], group_id=1),
        shape("cell", [[1, 1]], "point")])))
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(buf, format="PNG")
    (tmp_path / "b.json").write_text(json.dumps(labelme_doc(
        "missing.jpg", [shape("cell", [[1, 1], [9, 1], [9, 9]])], 20, 30, base64.b64encode(buf.getvalue()).decode())))
    with pytest.warns(UserWarning, match="1 labelme shapes that are not regions"):
        coco, sources = labelme_to_coco([tmp_path / "a.json", tmp_path / "b.json"])
    assert coco["categories"] == [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}]
    assert [im["file_name"] for im in coco["images"]] == ["img.png", "missing.png"]
    assert sources["img.png"] == tmp_path / "img.png" and sources["missing.png"].shape == (20, 30, 3)
    anns = coco["annotations"]
    assert [a["category_id"] for a in anns] == [1, 2, 1, 1, 1] and [a["image_id"] for a in anns] == [1] * 4 + [2]
    assert anns[1]["bbox"] == [20.0, 20.0, 10.0, 10.0] and anns[1]["area"] == 100
    assert len(anns[2]["segmentation"][0]) >= 32 and abs(anns[2]["area"] - np.pi * 25) < 8   # circle r = 5
    assert len(anns[3]["segmentation"]) == 2          # group_id 1 merged two shapes
    assert decode(anns[3]["segmentation"], 40, 50)[30:36, 10:16].all()
    paths = write_coco_dataset(tmp_path / "out", {"train": (coco, sources)})
    records, _, dropped = load_coco(paths["train_json"], paths["train_images"])
    assert [len(r.annotations) for r in records] == [4, 1] and not dropped
    assert Image.open(paths["train_images"] / "missing.png").size == (30, 20)


def test_labelme_errors(tmp_path):
    write_png(tmp_path / "img.png", np.zeros((40, 50), np.uint8))
    (tmp_path / "a.json").write_text(json.dumps(labelme_doc(shapes=[shape("cell", [[2, 2], [9, 2], [9, 9]]),
                                                                    shape("dust", [[5, 5], [8, 8]], "rectangle")])))
    with pytest.raises(DataError, match=r"labels \['dust'\] are not among the categories \['cell'\]"):
        labelme_to_coco([tmp_path / "a.json"], {"cell": 1})
    (tmp_path / "b.json").write_text(json.dumps(labelme_doc(height=41)))
    with pytest.raises(DataError, match="is 40x50 .* imageHeight=41"):
        labelme_to_coco([tmp_path / "b.json"])
    (tmp_path / "c.json").write_text(json.dumps(labelme_doc("gone.png")))
    with pytest.raises(DataError, match="not found and no embedded imageData"):
        labelme_to_coco([tmp_path / "c.json"])


# ------------------------------------------------------------------------------------------ data set folders
def test_split_items_is_deterministic_and_complete():
    parts = split_items(list(range(16)), (10, 3, 3), seed=0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [10, 3, 3]
    assert sorted(sum(parts.values(), [])) == list(range(16)) and parts == split_items(list(range(16)),
                                                                                        (10, 3, 3), seed=0)
    assert [len(v) for v in split_items(list(range(3)), (0.6, 0.2, 0.2)).values()] == [1, 1, 1]
    assert list(split_items(list(range(5)), (1, 0, 0))) == ["train"]
    with pytest.raises(ValueError, match="3 non-negative"):
        split_items([1], (1, -1, 0))


def test_write_is_atomic(tmp_path):
    label = label_scene()
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 80}],
            "annotations": label_image_to_annotations(label, image_id=1), "categories": [{"id": 1, "name": "c"}]}
    good = (coco, {"a.png": np.zeros((64, 80), np.uint8)})
    bad = (coco, {"a.png": np.zeros((64, 80), np.float32)})   # fails only when the second split is written
    with pytest.raises(DataError, match="must be uint8/uint16"):
        write_coco_dataset(tmp_path / "out", {"train": good, "val": bad})
    assert list(tmp_path.iterdir()) == []                        # neither out/ nor a temporary folder
    paths = write_coco_dataset(tmp_path / "out", {"train": good})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train", "train.json"]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_coco_dataset(tmp_path / "out", {"train": good})
    write_coco_dataset(tmp_path / "out", {"val": good}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not paths["train_json"].exists()


# ------------------------------------------------------------------------------------------ DSB2018 sample
@pytest.mark.skipif(not HAS_STARDIST, reason="stardist wheel not installed (pip install --no-deps stardist==0.9.2)")
def test_dsb2018_sample(tmp_path):
    with pytest.warns(UserWarning, match="nucleus parts cut by tile borders"):
        paths = convert_dsb2018_sample(tmp_path / "dsb")
    truth = tifffile.imread(Path(importlib.util.find_spec("stardist").submodule_search_locations[0])
                            / "data" / "images" / "mask2d.tif")
    counts, pixels = {}, 0
    for split in ("train", "val", "test"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)     # load_coco must accept it without a dropped item
            records, categories, dropped = load_coco(paths[f"{split}_json"], paths[f"{split}_images"])
        assert categories.names == ("nucleus",) and not dropped
        conversion = json.loads(paths[f"{split}_json"].read_text())["info"]["conversion"]
        assert "rle_fallback" not in conversion and "rle_holes" not in conversion   # pixel-exact polygons
        counts[split] = (len(records), sum(len(r.annotations) for r in records))
        for r in records:
            assert (r.height, r.width) == (128, 128) and np.asarray(Image.open(r.path)).dtype == np.uint8
            row, col = int(r.path.stem[1]), int(r.path.stem[3])
            tile = truth[row * 128:(row + 1) * 128, col * 128:(col + 1) * 128]
            for a in r.annotations:   # every instance is exactly one nucleus' visible pixels
                mask = decode(a.segmentation, 128, 128)
                assert len(np.unique(tile[mask])) == 1 and tile[mask][0] > 0
                assert mask.sum() == (tile == tile[mask][0]).sum()
                pixels += int(mask.sum())
    assert [counts[s][0] for s in ("train", "val", "test")] == [10, 3, 3]
    assert counts == {"train": (10, 105), "val": (3, 27), "test": (3, 24)}
    assert (truth > 0).sum() - 4 * 4 <= pixels <= (truth > 0).sum()   # only 4 fragments < 5 px dropped


def test_dsb2018_without_stardist_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match="pip install --no-deps stardist==0.9.2"):
        convert_dsb2018_sample(tmp_path / "dsb")
    assert not (tmp_path / "dsb").exists()


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_from_labels_and_labelme(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(5):
        write_png(src / f"im{i}.png", np.zeros((64, 80), np.uint8))
        tifffile.imwrite(src / f"im{i}_masks.tif", label_scene())
    assert preprocess.main(["--from-labels", str(src), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "train: 3 images, 18 instances" in out and "val: 1 images, 6 instances" in out
    records, _, _ = load_coco(tmp_path / "out" / "test.json", tmp_path / "out" / "test")
    assert len(records) == 1 and len(records[0].annotations) == 6
    assert preprocess.main(["--from-labels", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    lm = tmp_path / "lm"
    write_png(lm / "img.png", np.zeros((40, 50), np.uint8))
    (lm / "a.json").write_text(json.dumps(labelme_doc(shapes=[shape("cell", [[2, 2], [9, 2], [9, 9]])])))
    assert preprocess.main(["--from-labelme", str(lm), "--out", str(tmp_path / "lm_out"),
                            "--split-ratios", "1", "0", "0"]) == 0
    assert "train: 1 images, 1 instances" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        preprocess.main(["--from-labels", str(src)])                       # no --out


@pytest.mark.skipif(not HAS_STARDIST, reason="stardist wheel not installed (pip install --no-deps stardist==0.9.2)")
def test_cli_dsb2018_sample(tmp_path, capsys):
    with pytest.warns(UserWarning, match="cut by tile borders"):
        assert preprocess.main(["--dataset", "dsb2018-sample", "--out", str(tmp_path / "dsb")]) == 0
    out = capsys.readouterr().out
    assert "train: 10 images, 105 instances" in out and "test: 3 images, 24 instances" in out
