"""gains.geojson_io: QuPath GeoJSON in and out, holes, several parts and overlaps kept pixel for pixel;
one-line errors naming the file and the feature for what is not a valid area in image pixels."""
from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from gains.annotations import DataError
from gains.geojson_io import read_geojson_instances, write_geojson
from gains.instances import CropMasks
from test_mask_polygons import centre_oracle

H, W = 30, 40


def feature(geometry: dict, **props) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": {"objectType": "annotation", **props}}


def square(x0, y0, x1, y1) -> list:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def write(path, features, **top):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features, **top}))
    return path


def overlapping_masks() -> np.ndarray:
    """bool [5, H, W]: overlapping discs, a ring (hole), two parts touching diagonally, an island in a hole."""
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    dense = np.zeros((5, H, W), bool)
    dense[0] = (xx - 12) ** 2 + (yy - 12) ** 2 < 64
    dense[1] = (xx - 20) ** 2 + (yy - 14) ** 2 < 49                       # overlaps 0
    dense[2] = ((xx - 26) ** 2 + (yy - 20) ** 2 < 49) & ((xx - 26) ** 2 + (yy - 20) ** 2 > 6)  # ring
    dense[3, 2:6, 30:34], dense[3, 6:9, 34:37] = True, True              # diagonal contact
    dense[4, 18:29, 2:13], dense[4, 20:27, 4:11], dense[4, 22:25, 6:9] = True, False, True  # island in a hole
    return dense


def test_masks_round_trip_through_geojson_exactly(tmp_path):
    """Masks -> write_geojson -> read_geojson_instances: the same masks, pixel for pixel, overlaps, holes,
    touching parts and islands included; names, classes and scores as QuPath reads them."""
    dense = overlapping_masks()
    masks = CropMasks.from_dense(dense)
    path = write_geojson(tmp_path / "x.geojson", masks, classes=["cell", "cell", None, "debris", "cell"],
                         scores=[0.9, 0.8, 0.7, 0.6, 0.5])
    got, classes = read_geojson_instances(path, H, W)
    np.testing.assert_array_equal(got.dense(), dense)
    assert classes == ["cell", "cell", None, "debris", "cell"]
    doc = json.loads(path.read_text())
    props = [f["properties"] for f in doc["features"]]
    assert [p["name"] for p in props] == ["00001", "00002", "00003", "00004", "00005"]
    assert props[0] == {"objectType": "detection", "name": "00001", "classification": {"name": "cell"},
                        "measurements": {"score": pytest.approx(0.9)}}
    kinds = [f["geometry"]["type"] for f in doc["features"]]
    assert kinds == ["Polygon", "Polygon", "Polygon", "MultiPolygon", "MultiPolygon"]
    for f, m in zip(doc["features"], dense):
        g = shape(f["geometry"])
        assert g.is_valid, shapely.is_valid_reason(g)  # JTS (QuPath) accepts it as it is
        n_rings = sum(1 + len(p.interiors) for p in getattr(g, "geoms", [g]))
        n_holes = sum(len(p.interiors) for p in getattr(g, "geoms", [g]))
        assert g.area == pytest.approx(m.sum() - 0.5 * (n_rings - n_holes) + 0.5 * n_holes)


def test_qupath_layouts_categories_and_holes(tmp_path):
    """A FeatureCollection or a plain array of Features (QuPath before 0.3); Polygon with a hole,
    MultiPolygon; classification names, object names, or one class."""
    features = [feature({"type": "Polygon", "coordinates": [square(2, 2, 12, 12), square(5, 5, 8, 8)]},
                        classification={"name": "Tumor", "color": [200, 0, 0]}, name="a"),
                feature({"type": "MultiPolygon", "coordinates": [[square(20, 2, 24, 6)], [square(26, 2, 30, 6)]]},
                        name="b"),
                feature({"type": "Polygon", "coordinates": [square(6, 6, 16, 16)]}, objectType="cell",
                        classification={"name": "Stroma"}, nucleusGeometry={"type": "Polygon", "coordinates": [
                            square(8, 8, 10, 10)]})]
    (tmp_path / "list.geojson").write_text(json.dumps(features))
    stats = Counter()
    masks, classes = read_geojson_instances(tmp_path / "list.geojson", H, W, stats=stats)
    assert classes == ["Tumor", None, "Stroma"] and stats == Counter(annotation=2, cell=1, features=3, empty=0)
    dense = masks.dense()
    ring = np.zeros((H, W), bool)
    ring[2:12, 2:12], ring[5:8, 5:8] = True, False
    np.testing.assert_array_equal(dense[0], ring)
    assert dense[1].sum() == 32 and (dense[0] & dense[2]).any()  # two 4x4 parts; overlap kept
    assert read_geojson_instances(tmp_path / "list.geojson", H, W, "name")[1] == ["a", "b", None]
    assert read_geojson_instances(tmp_path / "list.geojson", H, W, "none")[1] == [None] * 3
    write(tmp_path / "fc.geojson", features)
    np.testing.assert_array_equal(read_geojson_instances(tmp_path / "fc.geojson", H, W)[0].dense(), dense)


def test_subpixel_polygons_follow_the_centre_rule(tmp_path):
    rng = np.random.default_rng(0)
    rings = [rng.uniform(0, 40, (7, 2)) for _ in range(6)]
    features = [feature({"type": "Polygon", "coordinates": [shapely.convex_hull(shapely.MultiPoint(r))
                                                            .exterior.coords[:]]}) for r in rings]
    masks, _ = read_geojson_instances(write(tmp_path / "x.geojson", features), H, W)
    for m, f in zip(masks.dense(), features):
        np.testing.assert_array_equal(m, centre_oracle(f["geometry"]["coordinates"], H, W))


@pytest.mark.parametrize("geometry,match", [
    ({"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]},
     r"feature 1 'bow' \(class 'Tumor'\): invalid Polygon: Self-intersection\[5 5\].*redraw"),
    ({"type": "MultiPolygon", "coordinates": [[square(0, 0, 6, 6)], [square(3, 3, 9, 9)]]},
     r"feature 1 'bow' \(class 'Tumor'\): invalid MultiPolygon: Self-intersection"),
    ({"type": "Point", "coordinates": [3, 3]}, r"feature 1 'bow' \(class 'Tumor'\): a Point is not an area"),
    ({"type": "LineString", "coordinates": [[3, 3], [5, 5]]}, r"a LineString is not an area"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [4, 4]]]}, r"feature 1 .*malformed Polygon coordinates"),
])
def test_invalid_features_are_one_line_errors_naming_file_and_feature(tmp_path, geometry, match):
    good = feature({"type": "Polygon", "coordinates": [square(1, 1, 4, 4)]})
    path = write(tmp_path / "bad.geojson", [good, feature(geometry, name="bow", classification={"name": "Tumor"})])
    with pytest.raises(DataError, match=match) as err:
        read_geojson_instances(path, H, W)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_another_crs_and_non_geojson_are_refused(tmp_path):
    good = feature({"type": "Polygon", "coordinates": [square(1, 1, 4, 4)]})
    crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}}
    with pytest.raises(DataError, match=r"map\.geojson: the file declares the coordinate reference system "
                                        r"'urn:ogc:def:crs:EPSG::3857'.*pixel"):
        read_geojson_instances(write(tmp_path / "map.geojson", [good], crs=crs), H, W)
    with pytest.raises(DataError, match=r"f\.geojson: feature 0 declares the coordinate reference system"):
        read_geojson_instances(write(tmp_path / "f.geojson", [{**good, "crs": crs}]), H, W)
    (tmp_path / "x.geojson").write_text('{"type": "Polygon"}')
    with pytest.raises(DataError, match=r"x\.geojson: not a GeoJSON FeatureCollection"):
        read_geojson_instances(tmp_path / "x.geojson", H, W)
    (tmp_path / "y.geojson").write_text('{"type": ')
    with pytest.raises(DataError, match=r"y\.geojson: cannot read GeoJSON"):
        read_geojson_instances(tmp_path / "y.geojson", H, W)


def test_features_outside_the_image_are_dropped_with_a_counted_warning(tmp_path):
    features = [feature({"type": "Polygon", "coordinates": [square(1, 1, 4, 4)]}),
                feature({"type": "Polygon", "coordinates": [square(100, 1, 104, 4)]}, name="far")]
    with pytest.warns(UserWarning, match=r"1 feature\(s\) cover no pixel .*feature 1 'far'"):
        masks, _ = read_geojson_instances(write(tmp_path / "x.geojson", features), H, W)
    assert len(masks) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_geojson_instances(write(tmp_path / "y.geojson", features[:1]), H, W)


def test_writer_checks_lengths_and_warns_for_empty_masks(tmp_path):
    masks = CropMasks.from_dense(overlapping_masks()[:2])
    with pytest.raises(ValueError, match="classes has 1 entries for 2 masks"):
        write_geojson(tmp_path / "x.geojson", masks, classes=["a"])
    assert not (tmp_path / "x.geojson").exists()
    empty = CropMasks.concatenate([masks, CropMasks.from_dense(np.zeros((1, H, W), bool))])
    stats = Counter()
    with pytest.warns(UserWarning, match=r"1 empty mask\(s\) have no feature.*00003"):
        write_geojson(tmp_path / "x.geojson", empty, stats=stats, object_type="annotation")
    assert stats == Counter(features=2, empty=1)
    assert {f["properties"]["objectType"] for f in json.loads((tmp_path / "x.geojson").read_text())["features"]} \
        == {"annotation"}
