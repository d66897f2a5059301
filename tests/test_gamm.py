"""GAMM (gains/gamm.py): the authors' maps (fixtures), a slow literal oracle, and the degenerate cases."""
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import uncompressed_rle
from gains import gamm
from gains.gamm import VARIANTS, compute_ga_maps, gamm_masks, map_folder_name, nuclei_groups
from gamm_oracle import oracle_ga_maps, oracle_groups

FIXTURES = Path(__file__).parent / "fixtures" / "gamm"
FOLDERS = ("isbi_cells", "chrom_rods", "nuclei_clusters")
TOL = 1e-5


def load_fixture(folder):
    """(params, [(image, annotations)]) of one fixture folder."""
    root = FIXTURES / folder
    params = json.loads((root / "params.json").read_text())
    coco = json.loads((root / "annotations.json").read_text())
    images = [(im, [a for a in coco["annotations"] if a["image_id"] == im["id"]]) for im in coco["images"]]
    return params, images


def fixture_inputs(im, anns):
    masks = gamm_masks([a["segmentation"] for a in anns], im["height"], im["width"])
    return masks, [a["category_id"] for a in anns], np.array([a["bbox"] for a in anns])


def square(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def ellipse(cx, cy, a, b, angle, points=16):
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    x = cx + a * np.cos(t) * np.cos(angle) - b * np.sin(t) * np.sin(angle)
    y = cy + a * np.cos(t) * np.sin(angle) + b * np.sin(t) * np.cos(angle)
    return np.stack([x, y], 1).ravel().tolist()


def coco_box(flat):
    xy = np.asarray(flat).reshape(-1, 2)
    return [*xy.min(0), *(xy.max(0) - xy.min(0))]


# ---------------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("folder", FOLDERS)
def test_matches_original_maps(folder):
    params, images = load_fixture(folder)
    for im, anns in images:
        maps = compute_ga_maps(*fixture_inputs(im, anns), **params)
        assert maps.dtype == np.float64 and maps.shape == (len(anns), im["height"], im["width"])
        assert maps.min() >= 1 and maps.max() <= 1 + params["ga_factor"] + 1e-12
        for ann, ga in zip(anns, maps):
            expected = np.load(FIXTURES / folder / "expected" / f"{ann['id']}.npy")
            err = np.abs(ga - expected).max()
            assert err <= TOL, f"{folder} image {im['id']} annotation {ann['id']}: max |diff| {err:.2e}"


def test_blocks_of_windows_do_not_change_maps(monkeypatch):
    # Windows are processed in blocks to bound memory for large windows; each window is independent.
    params, images = load_fixture("isbi_cells")
    inputs = fixture_inputs(*images[0])
    full = compute_ga_maps(*inputs, **params)
    monkeypatch.setattr(gamm, "_BLOCK", 81 * 37)
    assert np.array_equal(compute_ga_maps(*inputs, **params), full)


def test_nuclei_groups_match_original():
    params, images = load_fixture("nuclei_clusters")
    original = json.loads((FIXTURES / "nuclei_clusters" / "original_run.json").read_text())["groups"]
    for im, anns in images:
        ids = [a["id"] for a in anns]
        boxes = [a["bbox"] for a in anns]
        groups = nuclei_groups(boxes, params["window_size"], im["height"], im["width"])
        assert [[ids[i] for i in g] for g in groups] == [original[str(i)] for i in ids]
        assert groups == oracle_groups(boxes, params["window_size"])


# The oracle loops over windows in Python; one small image per variant keeps this under two seconds.
@pytest.mark.parametrize("folder,image_id", [("isbi_cells", 2), ("chrom_rods", 1), ("nuclei_clusters", 4)])
def test_oracle_matches_original_maps(folder, image_id):
    params, images = load_fixture(folder)
    im, anns = next((im, anns) for im, anns in images if im["id"] == image_id)
    maps = oracle_ga_maps(*fixture_inputs(im, anns), **params)
    for ann, ga in zip(anns, maps):
        assert np.abs(ga - np.load(FIXTURES / folder / "expected" / f"{ann['id']}.npy")).max() <= TOL


# -------------------------------------------------------------------------- oracle, tiny images
def random_image(rng, height, width, n):
    """Random ellipses, some overlapping or cut by the border; about one in five is a non-target (0)."""
    segs, boxes, cats = [], [], []
    for _ in range(n):
        flat = ellipse(*rng.uniform(-2, [width + 1, height + 1]), *rng.uniform(2, 9, 2), rng.uniform(0, np.pi))
        segs.append([flat])
        boxes.append(coco_box(flat))
        cats.append(int(rng.random() < 0.8))
    return gamm_masks(segs, height, width), cats, np.array(boxes)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ws", [3, 4])
def test_matches_loop_oracle_on_tiny_images(variant, ws):
    rng = np.random.default_rng(100 * ws + VARIANTS.index(variant))
    for _ in range(4):
        masks, cats, boxes = random_image(rng, 20, 24, rng.integers(2, 5))
        kw = dict(variant=variant, window_size=ws, ga_factor=0.8, overlap_hl=0.3, target_category_id=1)
        np.testing.assert_allclose(compute_ga_maps(masks, cats, boxes, **kw),
                                   oracle_ga_maps(masks, cats, boxes, **kw), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- degenerate cases
ISBI = dict(variant="isbi", window_size=3, ga_factor=0.5, overlap_hl=0.1, target_category_id=0)


def test_no_instances():
    maps = compute_ga_maps(np.zeros((0, 10, 12), bool), [], np.zeros((0, 4)), **ISBI)
    assert maps.shape == (0, 10, 12) and maps.dtype == np.float64


@pytest.mark.parametrize("variant", ["isbi", "chrom"])
def test_single_target_and_non_targets_are_all_ones(variant):
    # One cell (target 0) with its nucleus (category 1): the original's intra mean is empty (NaN maps).
    segs = [[ellipse(12, 10, 8, 6, 0.3)], [ellipse(12, 10, 3, 2, 0.0)]]
    params = dict(ISBI, variant=variant)
    maps = compute_ga_maps(gamm_masks(segs, 20, 24), [0, 1], None, **params)
    assert np.array_equal(maps, np.ones((2, 20, 24)))


def test_non_target_instances_get_ones_beside_real_maps():
    segs = [[ellipse(8, 10, 6, 5, 0.0)], [ellipse(15, 10, 6, 5, 0.0)], [ellipse(11, 10, 4, 3, 0.0)]]
    maps = compute_ga_maps(gamm_masks(segs, 20, 24), [0, 0, 1], None, **ISBI)
    assert maps[0].max() > 1 and maps[1].max() > 1 and np.all(maps[:2] <= 1.5 + 1e-12)
    assert np.array_equal(maps[2], np.ones((20, 24)))


def test_isolated_nucleus_is_all_ones():
    segs = [ellipse(8, 8, 4, 3, 0.0), ellipse(15, 8, 4, 3, 0.0), ellipse(50, 50, 4, 3, 0.0)]
    masks = gamm_masks([[s] for s in segs], 64, 64)
    boxes = np.array([coco_box(s) for s in segs])
    assert nuclei_groups(boxes, 4, 64, 64) == [[0, 1], [1, 0], [2]]
    kw = dict(variant="nuclei", window_size=4, ga_factor=0.8, overlap_hl=0.1, target_category_id=1)
    maps = compute_ga_maps(masks, [1, 1, 1], boxes, **kw)
    assert np.array_equal(maps[2], np.ones((64, 64)))  # the original writes zeros here (§7.2)
    assert maps[0].max() > 1 and maps[1].max() > 1


def test_empty_mask_target_is_all_ones_and_harmless():
    segs = [[ellipse(8, 10, 6, 5, 0.0)], [[1, 1, 2, 2]], [ellipse(15, 10, 6, 5, 0.0)]]  # middle: < 3 points
    masks = gamm_masks(segs, 20, 24)
    assert not masks[1].any()
    maps = compute_ga_maps(masks, [0, 0, 0], None, **ISBI)
    assert np.array_equal(maps[1], np.ones((20, 24)))
    np.testing.assert_allclose(maps, oracle_ga_maps(masks, [0, 0, 0], None, **ISBI), rtol=0, atol=1e-6)


def test_image_smaller_than_window_is_all_ones():
    masks = gamm_masks([[square(0.5, 0.5, 2.5, 2.5)], [square(1.5, 0.5, 3.5, 2.5)]], 4, 5)
    maps = compute_ga_maps(masks, [0, 0], None, **dict(ISBI, window_size=5))
    assert np.array_equal(maps, np.ones((2, 4, 5)))


def test_rejects_bad_arguments():
    masks = np.zeros((1, 8, 8), bool)
    with pytest.raises(ValueError, match="variant"):
        compute_ga_maps(masks, [0], None, **dict(ISBI, variant="cells"))
    with pytest.raises(ValueError, match="boxes_xywh"):
        compute_ga_maps(masks, [0], None, **dict(ISBI, variant="nuclei"))
    with pytest.raises(ValueError, match="category ids"):
        compute_ga_maps(masks, [0, 1], None, **ISBI)


# ------------------------------------------------------------------------------- names, masks
@pytest.mark.parametrize("args,name", [((5, 0.5, 0.1), "anomap_ws5_f0.5_ol0.1"),
                                       ((8, 0.8, 0.1), "anomap_ws8_f0.8_ol0.1"),
                                       ((5, 1, 0.3), "anomap_ws5_f1.0_ol0.3"),
                                       ((5, 2.0, 0.5), "anomap_ws5_f2.0_ol0.5")])
def test_map_folder_name(args, name):
    assert map_folder_name(*args) == name


def test_polygon_pixel_centres_at_integer_coordinates():
    mask = gamm_masks([[square(0.5, 1.5, 3.5, 2.5)]], 5, 6)[0]
    expected = np.zeros((5, 6), bool)
    expected[2, 1:4] = True  # x in (0.5, 3.5) -> cols 1..3; y in (1.5, 2.5) -> row 2
    assert np.array_equal(mask, expected)


def test_multi_polygon_is_union():
    a, b = square(0.5, 0.5, 4.5, 4.5), square(3.5, 2.5, 8.5, 6.5)  # overlapping squares
    union = gamm_masks([[a, b]], 10, 10)[0]
    parts = gamm_masks([[a], [b]], 10, 10)
    assert np.array_equal(union, parts[0] | parts[1]) and union.sum() == 16 + 20 - 2


def test_rle_compressed_and_uncompressed():
    rng = np.random.default_rng(0)
    mask = rng.random((7, 9)) < 0.4
    compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    text = dict(compressed, counts=compressed["counts"].decode("ascii"))
    uncompressed = uncompressed_rle(mask)
    out = gamm_masks([compressed, text, uncompressed], 7, 9)
    assert all(np.array_equal(m, mask) for m in out)
