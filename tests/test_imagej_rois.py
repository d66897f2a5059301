"""gains.imagej_rois: every area ROI kind against a pixel-centre oracle, overlaps kept, categories from names
or groups, and one-line errors naming the file and the ROI for what is not an area."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import roifile

from gains.annotations import DataError
from gains.exports import write_imagej_rois
from gains.imagej_rois import read_imagej_instances, read_roi_set
from gains.instances import CropMasks
from test_mask_polygons import centre_oracle

T = roifile.ROI_TYPE
H, W = 24, 32


def polygon(points, name, roitype=T.POLYGON, **kwargs) -> roifile.ImagejRoi:
    roi = roifile.ImagejRoi.frompoints(np.asarray(points), name=name, **kwargs)
    roi.roitype = roitype
    return roi


def composite(rings, name) -> roifile.ImagejRoi:
    """A shape ROI (as ImageJ's ShapeRoi saves it): MOVETO / LINETO / CLOSE sub-paths."""
    path = []
    for ring in rings:
        path += [0, *ring[0]] + [v for p in ring[1:] for v in (1, *p)] + [4]
    xy = np.concatenate([np.asarray(r) for r in rings])
    (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
    return roifile.ImagejRoi(roitype=T.RECT, multi_coordinates=np.array(path, np.float32), shape_roi_size=len(path),
                             left=int(x0), top=int(y0), right=int(x1), bottom=int(y1), name=name)


def write(path, rois):
    roifile.roiwrite(path, rois, mode="w")
    return path


def box_mask(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_every_area_kind_is_filled_by_pixel_centres(tmp_path):
    """Polygon (integer), freehand (sub-pixel), traced, rectangle, oval and a composite with a hole, the
    first ones overlapping: each mask equals the even-odd centre rule of the ROI's outline."""
    tri = [[2, 2], [14, 3], [5, 15]]
    free = [[6.3, 4.2], [20.7, 5.1], [18.2, 17.6], [9.4, 14.9]]
    traced = [[10, 10], [16, 10], [16, 12], [13, 12], [13, 16], [10, 16]]
    outer, hole = [[20, 2], [30, 2], [30, 12], [20, 12]], [[23, 5], [23, 9], [27, 9], [27, 5]]
    rois = [polygon(tri, "tri"), polygon(free, "free", T.FREEHAND), polygon(traced, "traced", T.TRACED),
            roifile.ImagejRoi(roitype=T.RECT, left=1, top=18, right=9, bottom=23, name="rect"),
            roifile.ImagejRoi(roitype=T.OVAL, left=11, top=15, right=22, bottom=22, name="oval"),
            composite([outer, hole], "ring")]
    path = write(tmp_path / "a.zip", rois)
    stats = Counter()
    masks, categories = read_imagej_instances(path, H, W, stats=stats)
    assert categories == [None] * 6
    dense = masks.dense()
    for got, rings in zip(dense, [[tri], [free], [traced]]):
        np.testing.assert_array_equal(got, centre_oracle(rings, H, W))
    np.testing.assert_array_equal(dense[3], box_mask(1, 18, 9, 23))
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    np.testing.assert_array_equal(dense[4], ((xx - 16.5) / 5.5) ** 2 + ((yy - 18.5) / 3.5) ** 2 < 1)
    np.testing.assert_array_equal(dense[5], box_mask(20, 2, 30, 12) & ~box_mask(23, 5, 27, 9))
    assert (dense[0] & dense[1]).any() and (dense[1] & dense[2]).any()  # overlaps are kept
    assert stats == Counter(rois=6, empty=0, polygon=1, freehand=1, traced=1, rect=1, oval=1, composite=1)


def test_coco_masks_round_trip_through_the_exported_roi_zip(tmp_path):
    """Overlapping masks -> gains.exports.write_imagej_rois -> read back: the same masks, pixel for pixel
    (single-part masks without holes; the exporter splits parts and fills holes, by design)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:60, 0:80] + 0.5
    dense = np.stack([((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1 for cx, cy, rx, ry in
                      zip(rng.uniform(15, 65, 12), rng.uniform(12, 48, 12), rng.uniform(4, 14, 12),
                          rng.uniform(4, 14, 12))])
    assert (dense.sum(0) > 1).any()  # overlapping instances
    path = write_imagej_rois(tmp_path / "x_rois.zip", CropMasks.from_dense(dense))
    masks, _ = read_imagej_instances(path, 60, 80)
    np.testing.assert_array_equal(masks.dense(), dense)


def test_folder_of_roi_files_and_single_roi(tmp_path):
    folder = tmp_path / "X"
    folder.mkdir()
    for name, box in (("b", (1, 1, 5, 5)), ("a", (3, 3, 9, 9))):
        roi = roifile.ImagejRoi(roitype=T.RECT, left=box[0], top=box[1], right=box[2], bottom=box[3], name=name)
        roi.tofile(folder / f"{name}.roi")
    masks, _ = read_imagej_instances(folder, H, W)  # sorted file names: a, then b
    np.testing.assert_array_equal(masks.dense(), np.stack([box_mask(3, 3, 9, 9), box_mask(1, 1, 5, 5)]))
    masks, _ = read_imagej_instances(folder / "b.roi", H, W)
    assert len(masks) == 1


def test_categories_from_names_and_groups(tmp_path):
    rois = [roifile.ImagejRoi(roitype=T.RECT, left=i, top=i, right=i + 4, bottom=i + 4, name=name, group=group)
            for i, (name, group) in enumerate([("cell", 2), ("cell-1", 2), ("nucleus", 5), ("cell-12", 2)])]
    path = write(tmp_path / "a.zip", rois)
    assert read_imagej_instances(path, H, W, "name")[1] == ["cell", "cell", "nucleus", "cell"]
    assert read_imagej_instances(path, H, W, "group")[1] == [2, 2, 5, 2]
    rois[2].group = 0
    write(path, rois)
    with pytest.raises(DataError, match=r"a\.zip: ROI 3 'nucleus': the ROI has no group .*Properties"):
        read_imagej_instances(path, H, W, "group")


@pytest.mark.parametrize("roi,match", [
    (roifile.ImagejRoi(roitype=T.LINE, x1=1, y1=1, x2=9, y2=9, name="l"), "ROI 2 'l': a straight line ROI is "
     "not an area; .*Line to Area"),
    (polygon([[1, 1], [4, 4]], "pt", T.POINT), "ROI 2 'pt': a point ROI is not an area"),
    (polygon([[1, 1], [4, 4], [6, 1]], "pl", T.POLYLINE), "ROI 2 'pl': a segmented line ROI"),
    (roifile.ImagejRoi(roitype=T.RECT, left=1, top=1, right=5, bottom=5, rounded_rect_arc_size=3, name="rr"),
     "ROI 2 'rr': rounded rectangle .*Interpolate"),
    (roifile.ImagejRoi(roitype=T.RECT, left=1, top=1, right=5, bottom=5, subtype=roifile.ROI_SUBTYPE.TEXT,
                       name="t"), "ROI 2 't': a text ROI is not an area"),
])
def test_rois_that_are_not_areas_are_one_line_errors_naming_file_and_roi(tmp_path, roi, match):
    ok = roifile.ImagejRoi(roitype=T.RECT, left=1, top=1, right=5, bottom=5, name="ok")
    path = write(tmp_path / "set.zip", [ok, roi])
    with pytest.raises(DataError, match=match) as err:
        read_imagej_instances(path, H, W)
    assert "set.zip" in str(err.value) and "\n" not in str(err.value)


def test_malformed_sets_and_stack_positions(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"bad\.zip: cannot read the ROI set"):
        read_roi_set(tmp_path / "bad.zip")
    import zipfile
    with zipfile.ZipFile(tmp_path / "junk.zip", "w") as zf:
        zf.writestr("a.roi", roifile.ImagejRoi(roitype=T.RECT, right=3, bottom=3, name="a").tobytes())
        zf.writestr("b.roi", b"Iout garbage")
    with pytest.raises(DataError, match=r"junk\.zip: ROI 2 \('b\.roi'\) is not an ImageJ ROI"):
        read_roi_set(tmp_path / "junk.zip")
    rois = [roifile.ImagejRoi(roitype=T.RECT, left=1, top=1, right=5, bottom=5, name=n, position=p)
            for n, p in (("a", 1), ("b", 2))]
    with pytest.raises(DataError, match=r"2 different stack positions"):
        read_imagej_instances(write(tmp_path / "pos.zip", rois), H, W)


def test_rois_outside_the_image_are_dropped_with_a_counted_warning(tmp_path):
    rois = [roifile.ImagejRoi(roitype=T.RECT, left=1, top=1, right=5, bottom=5, name="in"),
            roifile.ImagejRoi(roitype=T.RECT, left=40, top=1, right=45, bottom=5, name="out"),
            roifile.ImagejRoi(roitype=T.RECT, left=30, top=20, right=40, bottom=30, name="cut")]
    stats = Counter()
    with pytest.warns(UserWarning, match=r"1 ROI\(s\) cover no pixel of the 24x32 image .*ROI 2 'out'"):
        masks, _ = read_imagej_instances(write(tmp_path / "a.zip", rois), H, W, stats=stats)
    assert len(masks) == 2 and stats["empty"] == 1
    np.testing.assert_array_equal(masks.dense()[1], box_mask(30, 20, 32, 24))  # cut at the image border
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_imagej_instances(write(tmp_path / "b.zip", rois[:1]), H, W)  # nothing dropped: no warning
