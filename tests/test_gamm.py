"""GAMM (gains/gamm.py): the authors' maps (fixtures, also on whole-pixel polygons), a slow literal oracle with
the authors' rasteriser, the degenerate cases, maps as crops on their support (and the support claim), and
the sparse paths (crops, box pairs) at scale."""
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import shapely
from pycocotools import mask as mask_utils

from conftest import uncompressed_rle
from gains import gamm, gamm_windows
from gains.gamm import (VARIANTS, compute_ga_crops, compute_ga_maps, gamm_mask_crops, gamm_masks,
                        map_folder_name, nuclei_groups)
from gains.instances import CropMasks
from gamm_oracle import oracle_ga_maps, oracle_groups, oracle_masks

FIXTURES = Path(__file__).parent / "fixtures" / "gamm"
# The same instances with whole-pixel vertices: lattice points on edges, where rasterisers disagree.
WHOLE_PIXEL = Path(__file__).parent / "fixtures" / "gamm_whole_pixel"
FIXTURE_SETS = {"gamm": FIXTURES, "gamm_whole_pixel": WHOLE_PIXEL}
FOLDERS = ("isbi_cells", "chrom_rods", "nuclei_clusters")
TOL = 1e-5


def load_fixture(folder, fixtures=FIXTURES):
    """(params, [(image, annotations)]) of one fixture folder of the set ``fixtures``."""
    root = fixtures / folder
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


def whole_pixel(flat, clockwise=True):
    """[polygon] of ``flat`` with vertices rounded to whole pixels, drawn clockwise on the image (y down) or
    counter-clockwise; repeated vertices dropped, as a labelme file would hold them."""
    xy = np.round(np.asarray(flat, dtype=np.float64).reshape(-1, 2))
    xy = xy[np.r_[True, np.any(xy[1:] != xy[:-1], axis=1)]]
    signed_area = np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1])
    if (signed_area > 0) != clockwise:  # > 0: clockwise with y pointing down
        xy = xy[::-1]
    return [xy.ravel().tolist()]


# ---------------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("fixture_set", FIXTURE_SETS)
def test_matches_original_maps(fixture_set, folder):
    fixtures = FIXTURE_SETS[fixture_set]
    params, images = load_fixture(folder, fixtures)
    for im, anns in images:
        maps = compute_ga_maps(*fixture_inputs(im, anns), **params)
        assert maps.dtype == np.float64 and maps.shape == (len(anns), im["height"], im["width"])
        assert maps.min() >= 1 and maps.max() <= 1 + params["ga_factor"] + 1e-12
        for ann, ga in zip(anns, maps):
            expected = np.load(fixtures / folder / "expected" / f"{ann['id']}.npy")
            err = np.abs(ga - expected).max()
            where = f"{fixture_set}/{folder} image {im['id']} annotation {ann['id']}"
            assert err <= TOL, f"{where}: max |diff| {err:.2e}"


def test_blocks_of_windows_do_not_change_maps(monkeypatch):
    # Windows are processed in blocks to bound memory for large windows; each window is independent.
    params, images = load_fixture("isbi_cells")
    inputs = fixture_inputs(*images[0])
    full = compute_ga_maps(*inputs, **params)
    monkeypatch.setattr(gamm_windows, "BLOCK", 81 * 37)
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


# The oracle loops over windows in Python; one small image per variant keeps this under two seconds a set.
# Its masks come from its own rasteriser (the authors' call), so this checks the oracle, not gains/gamm.py.
@pytest.mark.parametrize("folder,image_id", [("isbi_cells", 2), ("chrom_rods", 1), ("nuclei_clusters", 4)])
@pytest.mark.parametrize("fixture_set", FIXTURE_SETS)
def test_oracle_matches_original_maps(fixture_set, folder, image_id):
    fixtures = FIXTURE_SETS[fixture_set]
    params, images = load_fixture(folder, fixtures)
    im, anns = next((im, anns) for im, anns in images if im["id"] == image_id)
    masks = oracle_masks([a["segmentation"] for a in anns], im["height"], im["width"])
    maps = oracle_ga_maps(masks, [a["category_id"] for a in anns], np.array([a["bbox"] for a in anns]), **params)
    for ann, ga in zip(anns, maps):
        assert np.abs(ga - np.load(fixtures / folder / "expected" / f"{ann['id']}.npy")).max() <= TOL


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


def test_mask_crops_are_the_dense_masks():
    # Reference: the authors' rasteriser on the whole image lattice (the code tests each polygon's bbox only).
    rng = np.random.default_rng(7)
    segs = [[ellipse(*rng.uniform(-6, 46, 2), *rng.uniform(0.3, 9, 2), rng.uniform(0, np.pi))]
            for _ in range(40)]
    segs += [whole_pixel(ellipse(*rng.uniform(-6, 46, 2), *rng.uniform(1, 9, 2), rng.uniform(0, np.pi)),
                         clockwise=k % 2 == 0) for k in range(20)]
    segs += [[ellipse(5, 5, 4, 3, 0.0), ellipse(30, 20, 3, 5, 1.0)],  # two parts far apart: one crop
             [[1, 1, 2, 2]], [square(-9, -9, -2, -2)], [square(0.5, 0.5, 0.9, 0.9)], []]  # all empty
    # Vertices a rounding error off whole pixels: matplotlib counts in the point (x=0, y=7), resp. (0, 4),
    # just left of the polygon's x range (its crossing test compares rounded products).
    segs += [[[2e-16, 7.0, 10.0, 6.00000000000019, 11.0, 8.0000000000001, 1.8e-15, 2.0]],
             [[2e-16, 4.0, 2.99999999999991, 2.999999999999993, 6.00000000000004, 6e-16, 9.99999999999994,
               4.00000000000004]]]
    mask = rng.random((30, 40)) < 0.3
    mask[:, :5] = False
    segs += [mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))), uncompressed_rle(mask)]
    crops = gamm_mask_crops(segs, 30, 40)
    dense = oracle_masks(segs, 30, 40)
    assert isinstance(crops, CropMasks) and crops.image_size == (30, 40)
    assert np.array_equal(crops.dense(), dense) and np.array_equal(gamm_masks(segs, 30, 40), dense)
    assert np.array_equal(crops.boxes, CropMasks.from_dense(dense).boxes)  # tight, empty -> (0, 0, 0, 0)


# ------------------------------------------------- whole-pixel polygons: lattice points on edges
def edge_points(segmentations, height, width):
    """bool [N, H, W]: pixel centres lying exactly on an edge of one of the instance's polygons."""
    rows, cols = np.mgrid[:height, :width]
    out = np.zeros((len(segmentations), height, width), dtype=bool)
    for k, seg in enumerate(segmentations):
        for flat in seg:
            out[k] |= shapely.intersects_xy(shapely.Polygon(np.reshape(flat, (-1, 2))).boundary, cols, rows)
    return out


def test_edge_points_follow_the_winding_like_the_authors():
    # Written out by hand from matplotlib's crossing rule: drawn clockwise on the image, a whole-pixel square
    # keeps the points of its left, right and bottom edges; counter-clockwise only its bottom edge.
    cw, ccw = [1, 1, 6, 1, 6, 6, 1, 6], [1, 1, 1, 6, 6, 6, 6, 1]
    expected = np.zeros((2, 8, 8), bool)
    expected[0, 2:7, 1:7] = True
    expected[1, 2:7, 2:6] = True
    assert np.array_equal(gamm_masks([[cw], [ccw]], 8, 8), expected)
    assert np.array_equal(oracle_masks([[cw], [ccw]], 8, 8), expected)  # the oracle's rasteriser agrees


@pytest.mark.parametrize("fixture_set", FIXTURE_SETS)
def test_fixture_masks_are_the_authors_rasterisation(fixture_set):
    on_edges = np.zeros(2, int)  # edge points counted in, left out
    for folder in FOLDERS:
        for im, anns in load_fixture(folder, FIXTURE_SETS[fixture_set])[1]:
            segs = [a["segmentation"] for a in anns]
            ours = gamm_mask_crops(segs, im["height"], im["width"]).dense()
            assert np.array_equal(ours, oracle_masks(segs, im["height"], im["width"]))
            edges = edge_points(segs, im["height"], im["width"])
            on_edges += ours[edges].sum(), (~ours[edges]).sum()
    if fixture_set == "gamm":
        assert on_edges.sum() == 0  # kept away from edges by construction
    else:  # the point of these fixtures: both outcomes of the boundary rule occur, many times
        assert np.all(on_edges > 100), on_edges


def whole_pixel_image(rng, height, width, n):
    """(segmentations, category ids, COCO boxes) of n whole-pixel instances on a tiny image: rounded ellipses
    and rectangles of random winding, about one in five a non-target (0)."""
    segs, boxes, cats = [], [], []
    for k in range(n):
        clockwise = bool(rng.random() < 0.5)
        if k and rng.random() < 0.4:  # a rectangle whose left edge lies on the previous instance's rightmost
            # column: the two touch on lattice points, each decided by its own polygon's winding
            x0 = int(np.max(np.reshape(segs[-1][0], (-1, 2))[:, 0]))
            y0 = int(rng.integers(0, height - 4))
            seg = whole_pixel(square(x0, y0, x0 + rng.integers(3, 9), y0 + rng.integers(3, 9)), clockwise)
        else:
            flat = ellipse(*rng.uniform(-2, [width + 1, height + 1]), *rng.uniform(2, 9, 2), rng.uniform(0, np.pi))
            seg = whole_pixel(flat, clockwise)
        segs.append(seg)
        boxes.append(coco_box(seg[0]))
        cats.append(int(rng.random() < 0.8))
    return segs, cats, np.array(boxes)


@pytest.mark.parametrize("variant", VARIANTS)
def test_whole_pixel_polygons_match_loop_oracle_with_the_authors_masks(variant):
    """From segmentations to maps: ours from the polygons, expected from the loop oracle fed with masks of
    ``Path.contains_points`` itself; edge points decided both ways must occur for the test to mean anything."""
    rng = np.random.default_rng(200 + VARIANTS.index(variant))
    on_edges = np.zeros(2, int)
    for trial in range(5):
        segs, cats, boxes = whole_pixel_image(rng, 20, 24, int(rng.integers(2, 5)))
        kw = dict(variant=variant, window_size=3 + trial % 2, ga_factor=0.8, overlap_hl=0.3, target_category_id=1)
        masks = oracle_masks(segs, 20, 24)
        ours = compute_ga_maps(gamm_mask_crops(segs, 20, 24), cats, boxes, **kw)
        np.testing.assert_allclose(ours, oracle_ga_maps(masks, cats, boxes, **kw), rtol=0, atol=1e-6)
        edges = edge_points(segs, 20, 24)
        on_edges += masks[edges].sum(), (~masks[edges]).sum()
    assert np.all(on_edges > 10), on_edges


# ------------------------------------------------------------------------------- maps as crops
def paste(crops, height, width):
    out = np.ones((len(crops), height, width))
    for k, ((x0, y0, x1, y1), crop) in enumerate(crops):
        assert crop.dtype == np.float64 and crop.shape == (y1 - y0, x1 - x0)
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        out[k, y0:y1, x0:x1] = crop
    return out


def all_variant_cases():
    """(masks, cats, boxes, params) of every fixture image, then random images for all three variants."""
    for folder in FOLDERS:
        params, images = load_fixture(folder)
        for im, anns in images:
            yield (*fixture_inputs(im, anns), params)
    rng = np.random.default_rng(11)
    for variant in VARIANTS:
        for ws in (1, 3, 5):
            masks, cats, boxes = random_image(rng, 40, 44, 9)
            yield masks, cats, boxes, dict(variant=variant, window_size=ws, ga_factor=0.8, overlap_hl=0.3,
                                           target_category_id=1)


def test_dense_maps_are_the_crops_pasted_on_ones():
    for masks, cats, boxes, params in all_variant_cases():
        crops = compute_ga_crops(CropMasks.from_dense(masks), cats, boxes, **params)
        maps = compute_ga_maps(masks, cats, boxes, **params)
        assert np.array_equal(paste(crops, *masks.shape[1:]), maps)
        dense_in = compute_ga_crops(masks, cats, boxes, **params)  # dense bool input: the same crops
        assert all(b == c and np.array_equal(p, q) for (b, p), (c, q) in zip(crops, dense_in))


def test_all_ones_maps_are_empty_crops():
    segs = [[ellipse(8, 10, 6, 5, 0.0)], [[1, 1, 2, 2]], [ellipse(15, 10, 6, 5, 0.0)], [ellipse(11, 10, 4, 3, 0)]]
    crops = compute_ga_crops(gamm_mask_crops(segs, 20, 24), [0, 0, 0, 1], None, **ISBI)
    for box, crop in (crops[1], crops[3]):  # empty mask, non-target
        assert box == (0, 0, 0, 0) and crop.shape == (0, 0) and crop.dtype == np.float64
    assert crops[0][1].size and crops[2][1].size
    lonely = compute_ga_crops(gamm_mask_crops(segs[:1], 20, 24), [0], None, **ISBI)
    tiny = compute_ga_crops(gamm_mask_crops(segs, 20, 24), [0, 0, 0, 0], None, **dict(ISBI, window_size=21))
    assert [b for b, _ in lonely + tiny] == [(0, 0, 0, 0)] * 5


# ----------------------------------------------------------------------------- the support claim
def gets_a_map(k, masks, cats, boxes, variant, ws):
    """Whether instance k gets a real map by the rules (target, non-empty, another target in context)."""
    targets = [t for t in range(len(masks)) if cats[t] == 1]
    if k not in targets or not masks[k].any():
        return False
    if variant != "nuclei":
        return len(targets) > 1
    return any(t in targets for t in oracle_groups(boxes, ws)[k][1:])


def expected_support(k, masks, boxes, variant, ws):
    """The support box of the module docstring, from the mask bbox (and §2.5's group box for nuclei)."""
    height, width = masks.shape[1:]
    rows, cols = np.flatnonzero(masks[k].any(1)), np.flatnonzero(masks[k].any(0))
    if variant == "nuclei":
        b = np.asarray(boxes, float)[oracle_groups(boxes, ws)[k]]
        x0, y0 = int(b[:, 0].min()), int(b[:, 1].min())
        gw_, gh = int((b[:, 0] + b[:, 2]).max() - b[:, 0].min()), int((b[:, 1] + b[:, 3]).max() - b[:, 1].min())
        ranges = [(y0 - ws + 1, y0 + gh), (x0 - ws + 1, x0 + gw_)]
    else:
        ranges = [(-ws, 10 ** 9)] * 2

    def axis(first_px, last_px, size, allowed):
        first = max(0, first_px - ws + 1, allowed[0])  # first window (top-left) holding a mask pixel
        last = min(size - ws, last_px, allowed[1] - 1)  # last one
        if last < first:
            return None
        return first, (size if last == size - ws else last + 1)  # the last window also paints the strip

    r, c = axis(rows[0], rows[-1], height, ranges[0]), axis(cols[0], cols[-1], width, ranges[1])
    return (0, 0, 0, 0) if r is None or c is None else (c[0], r[0], c[1], r[1])


def support_cases(variant):
    """Random tiny images (ellipses cut by every border, one pinned to the bottom-right corner), ws 1..6."""
    rng = np.random.default_rng(VARIANTS.index(variant) + 50)
    for trial in range(12):
        ws = trial % 6 + 1
        masks, cats, boxes = random_image(rng, 18, 21, int(rng.integers(2, 6)))
        corner = ellipse(19 + rng.uniform(-2, 1), 16 + rng.uniform(-2, 1), 4, 3, rng.uniform(0, np.pi))
        masks = np.concatenate([masks, gamm_masks([[corner]], 18, 21)])
        yield masks, cats + [1], np.concatenate([boxes, [coco_box(corner)]]), ws


@pytest.mark.parametrize("variant", VARIANTS)
def test_support_box_against_the_loop_oracle(variant):
    """(a) oracle maps are exactly 1 outside the returned box; (b) the box is the formula of the module
    docstring, and every side of it is reached by a value != 1 somewhere (no side can be shrunk in
    general); (c) the weaker claim: exactly 1 outside the mask bbox and the COCO bbox grown by ws."""
    sides_reached, clamp_strips = np.zeros(4, int), 0
    for masks, cats, boxes, ws in support_cases(variant):
        height, width = masks.shape[1:]
        kw = dict(variant=variant, window_size=ws, ga_factor=0.8, overlap_hl=0.3, target_category_id=1)
        crops = compute_ga_crops(masks, cats, boxes, **kw)
        oracle = oracle_ga_maps(masks, cats, boxes, **kw)
        ours = paste(crops, height, width)
        np.testing.assert_allclose(ours, oracle, rtol=0, atol=1e-6)
        for k, ((x0, y0, x1, y1), _) in enumerate(crops):
            outside = np.ones((height, width), bool)
            outside[y0:y1, x0:x1] = False
            assert np.all(oracle[k][outside] == 1.0)  # (a)
            real = gets_a_map(k, masks, cats, boxes, variant, ws)
            assert (x0, y0, x1, y1) == (expected_support(k, masks, boxes, variant, ws) if real else (0, 0, 0, 0))
            if not masks[k].any():
                continue
            rows, cols = np.flatnonzero(masks[k].any(1)), np.flatnonzero(masks[k].any(0))  # (c)
            grown = np.ones((height, width), bool)
            grown[max(0, rows[0] - ws):rows[-1] + ws + 1, max(0, cols[0] - ws):cols[-1] + ws + 1] = False
            bx, by, bw, bh = boxes[k]
            coco = np.ones((height, width), bool)
            coco[max(0, int(np.floor(by - ws))):max(0, int(np.ceil(by + bh + ws)) + 1),
                 max(0, int(np.floor(bx - ws))):max(0, int(np.ceil(bx + bw + ws)) + 1)] = False
            assert np.all(oracle[k][grown] == 1.0) and np.all(oracle[k][coco] == 1.0)
            if y1 > y0:  # (b): which sides of the box hold a value != 1
                lines = ours[k, y0], ours[k, y1 - 1], ours[k, y0:y1, x0], ours[k, y0:y1, x1 - 1]
                sides_reached += [np.any(line[x0:x1] != 1) if i < 2 else np.any(line != 1)
                                  for i, line in enumerate(lines)]
                clamp_strips += int(rows[-1] > height - ws and np.any(ours[k, height - 1] != 1))
    assert np.all(sides_reached > 0) and clamp_strips > 0, (sides_reached, clamp_strips)


# --------------------------------------------------------------------------- sparse at scale
def touching_discs(rng, n, size, radius=(6, 10)):
    """Flat polygons and COCO boxes of n discs on a jittered grid, neighbours touching or overlapping."""
    side = int(np.ceil(np.sqrt(n)))
    step = 2 * radius[1] - 2
    segs, boxes = [], []
    for k in range(n):
        cx = 20 + (k % side) * step + rng.uniform(-1, 1)
        cy = 20 + (k // side) * step + rng.uniform(-1, 1)
        flat = ellipse(cx % (size - 20), cy % (size - 20), *rng.uniform(*radius, 2), 0.0, points=20)
        segs.append([flat])
        boxes.append(coco_box(flat))
    return segs, np.array(boxes)


@pytest.mark.parametrize("variant", ["isbi", "nuclei"])
def test_crops_work_in_proportion_to_supports_and_meeting_pairs(variant, monkeypatch):
    # 64 touching discs in a 1024 x 1024 field: dense float64 maps would be 537 MB, dense masks 67 MB.
    segs, boxes = touching_discs(np.random.default_rng(3), 64, 1024)
    masks = gamm_mask_crops(segs, 1024, 1024)
    calls = []
    pair_terms = gamm_windows.pair_terms
    monkeypatch.setattr(gamm_windows, "pair_terms", lambda *a: calls.append(1) or pair_terms(*a))
    kw = dict(variant=variant, window_size=5, ga_factor=0.8, overlap_hl=0.1, target_category_id=1)
    tracemalloc.start()
    crops = compute_ga_crops(masks, [1] * len(segs), boxes, **kw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 30e6, f"peak {peak / 1e6:.0f} MB"
    assert sum(c.size for _, c in crops) < 64 * 40 * 40
    # Only pairs whose window boxes meet are ever paired (once per sign): about 4 neighbours each, not 63.
    # Window corners of a mask on pixels [x0, x1) run from x0 - ws + 1 to x1 - 1.
    x0, y0, x1, y1 = masks.boxes.T
    x0, y0 = x0 - 4, y0 - 4
    meet = ((x0[:, None] < x1[None]) & (x0[None] < x1[:, None])
            & (y0[:, None] < y1[None]) & (y0[None] < y1[:, None]))
    assert 0 < len(calls) <= 2 * np.triu(meet, 1).sum() < 64 * 8


def test_overlapping_pairs_match_all_pairs():
    rng = np.random.default_rng(5)
    xy = rng.uniform(-50, 500, (300, 2))
    wh = np.where(rng.random((300, 2)) < 0.05, 0, rng.exponential(15, (300, 2)))  # some zero-size boxes
    wh[:3] = 700  # three huge boxes among small ones
    x0, y0 = xy.T
    x1, y1 = (xy + wh).T
    for a, b, c, d in ((x0, y0, x1, y1), tuple(np.round(v).astype(int) for v in (x0, y0, x1, y1))):
        meet = (a[:, None] < c[None]) & (a[None] < c[:, None]) & (b[:, None] < d[None]) & (b[None] < d[:, None])
        i, j = gamm_windows.overlapping_pairs(a, b, c, d)
        ei, ej = np.nonzero(np.triu(meet, 1))
        assert np.array_equal(i, ei) and np.array_equal(j, ej)


def test_nuclei_groups_of_many_instances_match_the_pairwise_oracle():
    rng = np.random.default_rng(9)
    boxes = np.c_[rng.uniform(0, 600, (400, 2)), rng.uniform(5, 30, (400, 2))]
    boxes[::37, 2:] = 200  # some large boxes contain small ones: those pairs do not interact
    assert nuclei_groups(boxes, 8, 600, 600) == oracle_groups(boxes, 8)


def test_max_magnitude_from_corner_pixels_is_the_image_maximum(monkeypatch):
    rng = np.random.default_rng(4)
    for height, width in ((2, 2), (2, 7), (3, 5), (5, 4), (6, 6), (17, 33), (64, 40)):
        for cy, cx in [(0, 0), ((height - 1) / 2, (width - 1) / 2), (height - 1, 0.5)] + [
                tuple(rng.uniform(0, [height - 1, width - 1])) for _ in range(20)]:
            m, n = np.mgrid[:height, :width].astype(np.float64)
            gy, gx = np.gradient((m - cy) ** 2 + (n - cx) ** 2)
            assert gamm_windows.max_magnitude(cy, cx, height, width) == np.sqrt(gy ** 2 + gx ** 2).max()
    centroids = rng.uniform(0, 2999, (5, 2))
    corners = [gamm_windows.max_magnitude(cy, cx, 4096, 3000) for cy, cx in centroids]
    monkeypatch.setattr(gamm_windows, "_CORNER_SIDE_LIMIT", 0)  # the two outermost rows and columns
    assert corners == [gamm_windows.max_magnitude(cy, cx, 4096, 3000) for cy, cx in centroids]
