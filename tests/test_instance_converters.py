"""Annotation folders -> COCO data sets through `preprocess.py --from-imagej-rois / --from-geojson /
--from-instance-stacks / --from-dsb2018`: round trips with overlapping instances (COCO -> the tool's format
-> import -> the same masks, decoded by pycocotools), categories, pairing errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import roifile
import tifffile

from conftest import ellipse, write_png
from gains.annotations import DataError, load_coco, segmentation_to_mask
from gains.exports import write_imagej_rois
from gains.geojson_io import write_geojson
from gains.instance_converters import convert_instance_folder, pair_annotation_files
from gains.instances import CropMasks
from test_instance_stacks import overlapping_pages, write_dsb_sample

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import preprocess  # noqa: E402

H, W = 48, 64


def coco_masks(seed: int) -> np.ndarray:
    """bool [N, H, W] of a COCO image with overlapping instances: polygons rasterised by pycocotools."""
    rng = np.random.default_rng(seed)
    polys = [ellipse(*rng.uniform((14, 12, 5, 5), (50, 36, 14, 12))) for _ in range(6)]
    dense = np.stack([segmentation_to_mask([p], H, W) > 0 for p in polys])
    assert (dense.sum(0) > 1).any()
    return dense


def dataset_masks(out: Path, split: str = "train") -> dict[str, np.ndarray]:
    """{file name: bool [N, H, W] in annotation order} of a written split, via load_coco + pycocotools."""
    records, categories, dropped = load_coco(out / f"{split}.json", out / split)
    assert not dropped
    return {r.path.name: np.stack([segmentation_to_mask(a.segmentation, r.height, r.width) > 0
                                   for a in r.annotations]) for r in records}


def test_coco_to_roi_zips_and_back_gives_the_same_masks(tmp_path, capsys):
    src = tmp_path / "src"
    truth = {}
    for i in range(3):
        write_png(src / f"field_{i:02d}.png", np.zeros((H, W), np.uint8))
        truth[f"field_{i:02d}.png"] = coco_masks(i)
        write_imagej_rois(src / f"field_{i:02d}_rois.zip", CropMasks.from_dense(truth[f"field_{i:02d}.png"]))
    out = tmp_path / "out"
    assert preprocess.main(["--from-imagej-rois", str(src), "--out", str(out), "--split-ratios", "1", "0", "0"]) == 0
    assert "train: 3 images, 18 instances" in capsys.readouterr().out
    got = dataset_masks(out)
    assert sorted(got) == sorted(truth)
    for name in truth:
        np.testing.assert_array_equal(got[name], truth[name])
    doc = json.loads((out / "train.json").read_text())
    assert doc["categories"] == [{"id": 1, "name": "cell"}]
    assert all(isinstance(a["segmentation"], list) for a in doc["annotations"])  # pixel-exact polygons


def test_coco_to_geojson_and_back_gives_the_same_masks_with_holes(tmp_path, capsys):
    """Overlapping instances, one with a hole (RLE in COCO) -> GeoJSON -> import: the same masks; the
    classification names become the categories, shared by every split."""
    src = tmp_path / "src"
    truth = {}
    for i in range(4):
        dense = coco_masks(10 + i)
        dense[0] &= ~(segmentation_to_mask([ellipse(*np.argwhere(dense[0]).mean(0)[::-1], 2.5, 2.5)], H, W) > 0)
        truth[f"im{i}.tif"] = dense
        src.mkdir(exist_ok=True)
        tifffile.imwrite(src / f"im{i}.tif", np.zeros((H, W), np.uint16))
        classes = ["nucleus" if k % 2 else "cell" for k in range(len(dense))]
        write_geojson(src / f"im{i}.tif.geojson", CropMasks.from_dense(dense), classes=classes)
    out = tmp_path / "out"
    assert preprocess.main(["--from-geojson", str(src), "--out", str(out), "--split-ratios", "2", "1", "1"]) == 0
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        got = dataset_masks(out, split)
        assert len(got) == n
        for name, masks in got.items():
            np.testing.assert_array_equal(masks, truth[name])
        doc = json.loads((out / f"{split}.json").read_text())
        assert doc["categories"] == [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}]
        assert [a["category_id"] for a in doc["annotations"]] == [1, 2, 1, 2, 1, 2] * n
        assert doc["info"]["conversion"]["rle_holes"] == n  # the hole survives as RLE
    assert preprocess.main(["--from-geojson", str(src), "--out", str(tmp_path / "one"), "--category-from", "none",
                            "--category-name", "blob", "--split-ratios", "1", "0", "0"]) == 0
    assert json.loads((tmp_path / "one" / "train.json").read_text())["categories"] == [{"id": 1, "name": "blob"}]


def test_roi_groups_and_names_as_categories(tmp_path):
    src = tmp_path / "src"
    write_png(src / "a.png", np.zeros((H, W), np.uint8))
    rois = [roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=2 * i, top=i, right=2 * i + 9, bottom=i + 9,
                              name=name, group=group)
            for i, (name, group) in enumerate([("nucleus", 4), ("cell", 2), ("cell-1", 2)])]
    roifile.roiwrite(src / "a.zip", rois, mode="w")
    kwargs = dict(kind="imagej", split_ratios=(1, 0, 0))
    convert_instance_folder(src, tmp_path / "groups", category_from="group", **kwargs)
    doc = json.loads((tmp_path / "groups" / "train.json").read_text())
    assert doc["categories"] == [{"id": 2, "name": "group 2"}, {"id": 4, "name": "group 4"}]
    assert [a["category_id"] for a in doc["annotations"]] == [4, 2, 2]
    convert_instance_folder(src, tmp_path / "names", category_from="name", **kwargs)
    doc = json.loads((tmp_path / "names" / "train.json").read_text())
    assert doc["categories"] == [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}]
    assert [a["category_id"] for a in doc["annotations"]] == [2, 1, 1]
    with pytest.raises(DataError, match="come from one of none, name, group, not 'class'"):
        convert_instance_folder(src, tmp_path / "x", category_from="class", **kwargs)


def test_instance_stacks_and_dsb2018_through_the_cli(tmp_path, capsys):
    src = tmp_path / "stacks"
    for i in range(2):
        write_png(src / f"s{i}.png", np.zeros((20, 30), np.uint8))
        tifffile.imwrite(src / f"s{i}_masks.tif", overlapping_pages())
    assert preprocess.main(["--from-instance-stacks", str(src), "--out", str(tmp_path / "o1"),
                            "--split-ratios", "1", "0", "0"]) == 0
    assert "train: 2 images, 6 instances" in capsys.readouterr().out
    for masks in dataset_masks(tmp_path / "o1").values():
        np.testing.assert_array_equal(masks, overlapping_pages() > 0)
    dsb = tmp_path / "dsb"
    for sample in ("0a1b", "9f3c", "77de"):
        write_dsb_sample(dsb, sample, overlapping_pages())
    assert preprocess.main(["--from-dsb2018", str(dsb), "--out", str(tmp_path / "o2"), "--category-name",
                            "nucleus"]) == 0
    out = capsys.readouterr().out
    assert all(f"{s}: 1 images, 3 instances" in out for s in ("train", "val", "test"))
    for split in ("train", "val", "test"):
        for masks in dataset_masks(tmp_path / "o2", split).values():
            np.testing.assert_array_equal(masks, overlapping_pages() > 0)
    tifffile.imwrite(src / "s1_masks.tif", overlapping_pages(20, 31))
    assert preprocess.main(["--from-instance-stacks", str(src), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preprocess.py: error: ") and "s1_masks.tif: page 1 sample 1: 20x31 (HxW)" in err
    assert "\n" not in err and not (tmp_path / "o3").exists()


def test_pairing_names_every_unmatched_file(tmp_path):
    src = tmp_path / "src"
    for name in ("a.png", "b.tif", "c.png"):
        write_png(src / name, np.zeros((8, 8), np.uint8))
    (src / "a.zip").write_bytes(b"")
    (src / "b_rois.zip").write_bytes(b"")
    (src / "b").mkdir()
    (src / "b" / "x.roi").write_bytes(b"")
    (src / "orphan.roi").write_bytes(b"")
    with pytest.raises(DataError) as err:
        pair_annotation_files(src, None, "imagej")
    msg = str(err.value)
    assert "images without a ROI set (1): c.png" in msg
    assert "images with several ROI sets (1): b.tif (b_rois.zip, b)" in msg
    assert "ROI sets matching no image (1): orphan.roi" in msg and "X.zip / X_rois.zip / X.roi / X/" in msg
    geo = tmp_path / "geo"
    geo.mkdir()
    (geo / "a.geojson").write_text("[]")
    (geo / "c.png.geojson").write_text("[]")
    (src / "b.tif").unlink()
    assert [(i.name, a.name) for i, a in pair_annotation_files(src, geo, "geojson")] == [
        ("a.png", "a.geojson"), ("c.png", "c.png.geojson")]


def test_cli_refuses_option_mixes(tmp_path):
    with pytest.raises(SystemExit):
        preprocess.main(["--from-geojson", str(tmp_path)])  # no --out
    with pytest.raises(SystemExit):
        preprocess.main(["--from-geojson", str(tmp_path), "--from-imagej-rois", str(tmp_path), "--out", "x"])
    with pytest.raises(SystemExit):
        preprocess.main(["--from-labels", str(tmp_path), "--category-from", "name", "--out", "x"])
