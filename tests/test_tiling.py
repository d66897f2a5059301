"""Tiled prediction (gains.tiling via gains.predictor.Predictor): the tile grid, the seam and duplicate
rules, the caps, the error and warning for bad settings, and memory on a 4096 x 4096 field.

Most tests use `FakeSegmenter`, a stand-in model that "detects" bright regions of its input exactly, so the
expected instances are known: rectangles of value > 0.5 on a black image. With tile_scale = 1 the tiles are
not resized and an all-ones 28 x 28 mask pastes back to exactly its rectangle. `ScaleSensitiveSegmenter`
only sees objects of the size it was "trained" on, so it fails when tiles are seen at another scale.
"""
from __future__ import annotations

import tracemalloc
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from gains.config import load_config
from gains.instances import CropMasks
from gains.predictor import Predictor
from gains.tiling import SEAM_MARGIN, merge_duplicates, seam_keep, tile_grid, tile_starts


class FakeSegmenter(torch.nn.Module):
    """Eval-mode stand-in for GAInS: one detection per connected region of channel 0 above 0.5 (or, with
    `by_value`, per region of one exact value, so touching objects stay apart). Box = the region's tight
    box, score = its maximum value, label 1, mask = the region resampled to 28 x 28 (area average). Honours
    `roi_heads.max_dets` and records (batch size, input size, max_dets) of every call."""

    def __init__(self, by_value: bool = False, max_dets: int = 100, fail: bool = False):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # Predictor takes the device from the parameters
        self.roi_heads = SimpleNamespace(max_dets=max_dets)
        self.by_value, self.fail, self.calls = by_value, fail, []

    def forward(self, images):
        self.calls.append((len(images), tuple(images[0].shape[-2:]), self.roi_heads.max_dets))
        if self.fail:
            raise RuntimeError("model failure")
        return [self._detect(im[0].detach().cpu().numpy()) for im in images]

    def _regions(self, g: np.ndarray):
        groups = [(g == v, None) for v in np.unique(g[g > 0.5])] if self.by_value else [(g > 0.5, None)]
        for fg, _ in groups:
            lab, _ = ndimage.label(fg)
            for k, sl in enumerate(ndimage.find_objects(lab), 1):
                comp = lab[sl] == k
                yield float(g[sl][comp].max()), sl, comp

    def _detect(self, g: np.ndarray) -> dict:
        regions = sorted(self._regions(g), key=lambda r: -r[0])[:self.roi_heads.max_dets]
        boxes = torch.tensor([[sl[1].start, sl[0].start, sl[1].stop, sl[0].stop] for _, sl, _ in regions],
                             dtype=torch.float32).reshape(-1, 4)
        masks = [F.adaptive_avg_pool2d(torch.from_numpy(c).float()[None], (28, 28)) for _, _, c in regions]
        return {"boxes": boxes, "scores": torch.tensor([r[0] for r in regions], dtype=torch.float32),
                "labels": torch.ones(len(regions), dtype=torch.int64),
                "masks": torch.stack(masks) if masks else torch.zeros(0, 1, 28, 28)}


class ScaleSensitiveSegmenter(FakeSegmenter):
    """FakeSegmenter that, like a trained detector, finds only objects of the size it was trained on: regions
    whose longer box side in ITS INPUT pixels lies in `sides` (inclusive). Shown at another scale, the same
    objects are missed, so only tiles seen at the training scale reproduce the whole-image result."""

    def __init__(self, sides=(6, 14), **kw):
        super().__init__(**kw)
        self.sides = sides

    def _regions(self, g: np.ndarray):
        for score, sl, comp in super()._regions(g):
            if self.sides[0] <= max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) <= self.sides[1]:
                yield score, sl, comp


def draw(h: int, w: int, rects) -> np.ndarray:
    """float32 [H, W] image: rectangles (x0, y0, x1, y1, value) on black, later ones on top."""
    image = np.zeros((h, w), np.float32)
    for x0, y0, x1, y1, v in rects:
        image[y0:y1, x0:x1] = v
    return image


def rect_mask(h, w, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def predictor(model, **kw) -> Predictor:
    """64-px tiles overlapping by 16, not resized (tile_scale 1): tiles of a 112-px side start at 0 and 48,
    so their overlap is the band [48, 64)."""
    kw = {"min_size_test": 64, "max_size_test": 100000, "tiling": "always", "tile_size": 64,
          "tile_overlap": 16, "tile_scale": 1.0, "progress": False, **kw}
    return Predictor(model, device="cpu", **kw)


def test_tile_grid_covers_the_image_with_the_overlap():
    for h, w, size, overlap in [(112, 64, 64, 16), (1000, 777, 256, 64), (64, 64, 64, 0), (30, 500, 64, 10),
                                (513, 513, 512, 128), (4096, 3000, 512, 128)]:
        tiles = tile_grid(h, w, size, overlap)
        covered = np.zeros((h, w), np.int32)
        for x0, y0, x1, y1 in tiles.tolist():
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert (y1 - y0, x1 - x0) == (min(size, h), min(size, w))  # one size per image: one batch shape
            covered[y0:y1, x0:x1] += 1
        assert covered.min() >= 1
        for length in (h, w):
            starts = tile_starts(length, size, overlap)
            assert starts[0] == 0 and starts[-1] + min(size, length) == length  # last tile flush with the border
            gaps = np.diff(starts)
            assert (gaps > 0).all() and (gaps <= size - overlap).all()  # neighbours overlap >= overlap
    assert tile_starts(112, 64, 16) == [0, 48] and tile_starts(64, 64, 16) == [0] and tile_starts(10, 64, 0) == [0]


def test_object_in_the_overlap_detected_twice_is_one_instance():
    model = FakeSegmenter()
    out = predictor(model)(draw(64, 112, [(52, 20, 60, 30, 0.9)]))[0]
    assert [c[0] for c in model.calls] == [2]  # both tiles in one batch, each saw the whole object
    assert len(out["scores"]) == 1 and isinstance(out["masks"], CropMasks)
    assert np.array_equal(out["masks"].mask(0), rect_mask(64, 112, 52, 20, 60, 30))
    assert out["boxes"][0].tolist() == [52, 20, 60, 30] and out["masks"].image_size == (64, 112)


def test_object_cut_by_a_seam_keeps_the_whole_detection():
    # tile 0 sees x in [58, 64) only (cut by its right edge); tile 1 sees all of [58, 70). Their scores tie
    # and tile 0 comes first, so only the seam rule (not the duplicate rule) can keep the whole one.
    out = predictor(FakeSegmenter())(draw(64, 112, [(58, 10, 70, 22, 0.8)]))[0]
    assert len(out["scores"]) == 1
    assert np.array_equal(out["masks"].mask(0), rect_mask(64, 112, 58, 10, 70, 22))
    # the same on a vertical seam and at a 4-tile corner
    out = predictor(FakeSegmenter())(draw(112, 112, [(58, 58, 70, 68, 0.8)]))[0]
    assert len(out["scores"]) == 1 and np.array_equal(out["masks"].mask(0), rect_mask(112, 112, 58, 58, 70, 68))


def test_touching_objects_stay_two():
    rects = [(52, 20, 56, 30, 0.8), (56, 20, 60, 30, 0.9), (50, 40, 56, 50, 0.7), (56, 40, 62, 50, 0.6)]
    out = predictor(FakeSegmenter(by_value=True))(draw(64, 112, rects))[0]
    assert len(out["scores"]) == 4 and out["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    dense = out["masks"].dense()
    for k, (x0, y0, x1, y1, _) in enumerate([rects[1], rects[0], rects[2], rects[3]]):
        assert np.array_equal(dense[k], rect_mask(64, 112, x0, y0, x1, y1))


def test_merge_duplicates_rules():
    """Same label + IoU >= merge_iou or containment >= merge_containment, only across tiles, greedy."""
    tiles = np.array([[0, 0, 64, 64], [48, 0, 112, 64]])
    big, small = rect_mask(64, 112, 50, 10, 62, 30), rect_mask(64, 112, 52, 12, 58, 20)  # small inside big
    shifted = rect_mask(64, 112, 56, 10, 68, 30)  # half of big: IoU 1/3, containment 1/2
    masks = CropMasks.from_dense(np.stack([big, big, small, shifted]))
    scores = np.array([0.9, 0.8, 0.7, 0.6])

    def kept(labels, tile_ids, **kw):
        return merge_duplicates(masks, np.array(labels), scores, np.array(tile_ids), tiles, **kw).tolist()

    assert kept([1, 1, 1, 1], [0, 1, 1, 1]) == [0, 3]  # 1: IoU 1, 2: contained; 3 overlaps too little
    assert kept([1, 1, 1, 1], [0, 0, 0, 0]) == [0, 1, 2, 3]  # one tile: the model's NMS already ran
    assert kept([1, 2, 1, 1], [0, 1, 1, 1]) == [0, 1, 3]  # another label is another object
    assert kept([1, 1, 1, 1], [0, 1, 1, 1], merge_iou=0.3) == [0]  # IoU 1/3 >= 0.3
    assert kept([1, 1, 1, 1], [0, 1, 1, 1], merge_containment=0.5) == [0]  # containment 1/2 >= 0.5
    # greedy like NMS: 1 (tile 1) is removed by 0, so it removes nothing; 2 (tile 0) is a duplicate only of 1
    assert kept([1, 1, 1, 1], [0, 1, 0, 0], merge_containment=1.0) == [0, 2, 3]


def test_seam_rule_keeps_objects_no_tile_holds_whole():
    tiles = tile_grid(64, 112, 64, 16)
    boxes = np.array([[40.0, 5, 64, 20],    # tile 0, cut at x = 64, but inside tile 1? no: starts before 48
                      [48.0, 5, 90, 20],    # tile 1, cut at x = 48 (its inner left edge), inside tile 0? no
                      [58.0, 5, 64, 20],    # tile 0, cut, lies in tile 1's interior -> dropped
                      [60.0, 5, 63.5, 20],  # tile 0, within SEAM_MARGIN of x = 64: touching -> dropped
                      [0.0, 0, 20, 64]])    # tile 0, on the image border: nothing cut
    assert seam_keep(boxes, np.array([0, 1, 0, 0, 0]), tiles, (64, 112)).tolist() == [True, True, False, False,
                                                                                     True]
    assert SEAM_MARGIN >= 1


def test_per_tile_cap_and_total_cap():
    left = [(4 + 4 * k, 4, 6 + 4 * k, 6, 0.60 + 0.02 * k) for k in range(10)]  # only in tile 0 (x < 48)
    right = [(70 + 4 * k, 40, 72 + 4 * k, 42, 0.61 + 0.02 * k) for k in range(10)]  # only in tile 1 (x >= 64)
    image = draw(64, 112, left + right)
    model = FakeSegmenter(max_dets=100)
    out = predictor(model, detections_per_tile=4)(image)[0]
    assert [c[2] for c in model.calls] == [4] and model.roi_heads.max_dets == 100  # set, then restored
    expected = sorted([r[4] for r in left[-4:] + right[-4:]], reverse=True)
    assert out["scores"].tolist() == pytest.approx(expected)
    out = predictor(model, max_detections=3)(image)[0]
    assert out["scores"].tolist() == pytest.approx(sorted([r[4] for r in left + right], reverse=True)[:3])
    assert len(out["masks"]) == 3 and len(out["boxes"]) == 3
    unlimited = predictor(model, max_detections=0)(image)[0]
    assert len(unlimited["scores"]) == 20  # no global cap of 100 (or any)
    failing = FakeSegmenter(max_dets=7, fail=True)
    with pytest.raises(RuntimeError):
        predictor(failing)(image)
    assert failing.roi_heads.max_dets == 7  # restored on errors too


def test_image_smaller_than_a_tile_tiled_equals_whole_image():
    from test_model import tiny_model

    model = tiny_model("gains", 18, "model.roi_heads.score_thresh_test=0.0")
    image = (np.random.default_rng(5).random((50, 60)) * 255).astype(np.uint8)
    kw = {"min_size_test": 64, "max_size_test": 128, "tile_size": 64, "tile_overlap": 16, "device": "cpu"}
    whole = Predictor(model, tiling="never", **kw)(image)[0]
    tiled = Predictor(model, tiling="always", **kw)(image)[0]
    assert len(whole["scores"]) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(whole[key], tiled[key]), key
    assert np.array_equal(whole["masks"].dense(), tiled["masks"].dense())


def test_tiled_and_whole_image_agree_on_a_small_image():
    """Recall: separate objects smaller than the overlap, 16 tiles vs the whole image, both unresized (the
    whole image's test resize is 1x, so its tiles are not resized either)."""
    rng = np.random.default_rng(0)
    rects, taken = [], np.zeros((150, 150), bool)
    while len(rects) < 14:
        w, h = rng.integers(6, 13, 2)
        x, y = rng.integers(0, 150 - w), rng.integers(0, 150 - h)
        if not taken[max(y - 4, 0):y + h + 4, max(x - 4, 0):x + w + 4].any():
            taken[y:y + h, x:x + w] = True
            rects.append((x, y, x + w, y + h, 0.6 + 0.025 * len(rects)))
    image = draw(150, 150, rects)
    kw = {"min_size_test": 150, "tile_size": 64, "tile_overlap": 24, "progress": False}
    whole = Predictor(FakeSegmenter(), tiling="never", **kw)(image)[0]
    model = FakeSegmenter()
    tiled = Predictor(model, tiling="auto", **kw)(image)[0]
    assert model.calls[0][1] == (64, 64) and len(model.calls) == 4  # 16 tiles of 64 px, batches of 4
    assert len(whole["scores"]) == len(tiled["scores"]) == len(rects)
    assert tiled["scores"].tolist() == pytest.approx(whole["scores"].tolist())
    inter = whole["masks"].intersections(tiled["masks"])
    union = whole["masks"].areas()[:, None] + tiled["masks"].areas()[None] - inter
    assert (np.diag(inter / union) > 0.8).all()  # same order (scores), same objects


def _separate_rects(rng, size: int, n: int, sides=(16, 25), gap=6):
    rects, taken = [], np.zeros((size, size), bool)
    while len(rects) < n:
        w, h = rng.integers(*sides, 2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        if not taken[max(y - gap, 0):y + h + gap, max(x - gap, 0):x + w + gap].any():
            taken[y:y + h, x:x + w] = True
            rects.append((x, y, x + w, y + h, 0.6 + 0.01 * len(rects)))
    return rects


def test_tiles_are_seen_at_the_whole_image_scale_and_agree_with_it():
    """A 300-px image whose test resize halves it (min_size_test 150): its 128-px tiles are halved too (not
    resized to 150 px, 1.17x, as 'a test image of tile_size' would be), so the scale-sensitive model finds
    the same objects in the tiles as in the whole image: same count, scores and masks."""
    rects = _separate_rects(np.random.default_rng(1), 300, 20)  # 16-24 px: 8-12 px at the model's scale
    image = draw(300, 300, rects)
    kw = {"min_size_test": 150, "max_size_test": 1000, "tile_size": 128, "tile_overlap": 48, "progress": False}
    whole_model, tiled_model = ScaleSensitiveSegmenter(), ScaleSensitiveSegmenter()
    whole = Predictor(whole_model, tiling="never", **kw)(image)[0]
    tiled_predictor = Predictor(tiled_model, tiling="auto", **kw)
    tiled = tiled_predictor(image)[0]
    assert whole_model.calls[0][1] == (150, 150) and tiled_predictor.scale_of(300, 300) == (0.5, 0.5)
    assert {c[1] for c in tiled_model.calls} == {(64, 64)}  # every 128-px tile halved like the whole image
    assert len(whole["scores"]) == len(rects)  # the whole image at its scale finds every object
    assert tiled["scores"].tolist() == pytest.approx(whole["scores"].tolist())  # same objects, same order
    inter = whole["masks"].intersections(tiled["masks"])
    union = whole["masks"].areas()[:, None] + tiled["masks"].areas()[None] - inter
    assert (np.diag(inter / union) > 0.9).all()
    assert torch.allclose(whole["boxes"], tiled["boxes"], atol=1.0)


def test_tile_scale_follows_the_training_crop_and_the_config():
    from gains.errors import ConfigError
    from gains.predictor import tile_scale_from_config

    assert tile_scale_from_config(load_config(None)) is None  # whole-image training: each image's own factor
    crop = load_config(None, ["data.crop_size=[512,512]"])
    assert tile_scale_from_config(crop) == 800 / 512  # the test resize of a training crop
    assert tile_scale_from_config(load_config(None, ["data.crop_size=256", "data.min_size_test=512"])) == 2.0
    assert tile_scale_from_config(load_config(None, ["data.crop_size=[200,1000]"])) == 1333 / 1000  # max_size
    assert tile_scale_from_config(load_config(None, ["data.crop_size=[512,512]", "test.tile_scale=1"])) == 1.0
    for bad in ("big", -1, 0):
        with pytest.raises(ConfigError, match=r"test\.tile_scale must be 'auto' or a positive number"):
            tile_scale_from_config(load_config(None, [f"test.tile_scale={bad}"]))
    # a 1040-px frame of a model trained on 512-px crops: tiles of any size are seen at the crop's 800/512,
    # not at min_size_test / tile_size (a 256-px tile would be blown up 3.1x) nor at the whole frame's 0.77x
    model = FakeSegmenter()
    cfg = load_config(None, ["data.crop_size=[512,512]", "test.tile_size=256", "test.tile_overlap=64"])
    p = Predictor.from_config(model, cfg, progress=False, device="cpu")
    assert p.tile_scale == 1.5625 and p.scale_of(1040, 1040) == (1.5625, 1.5625)
    p(np.zeros((1040, 1040), np.uint8))
    assert {c[1] for c in model.calls} == {(400, 400)}


def test_tiles_shrunk_by_the_whole_image_factor_warn():
    model = FakeSegmenter()
    with pytest.warns(UserWarning, match=r"image of 2048x2048 px: its tiles are shrunk 2\.6x.*set "
                                         r"test\.tile_scale to their factor"):
        Predictor(model, tile_size=512, tile_overlap=64, progress=False, device="cpu")(np.zeros((2048, 2048), np.uint8))
    assert {c[1] for c in model.calls} == {(200, 200)}  # 512 x 800 / 2048
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit scale is the user's choice: silent
        Predictor(FakeSegmenter(), tile_size=512, tile_overlap=64, tile_scale=0.25, progress=False,
                  device="cpu")(np.zeros((2048, 2048), np.uint8))


def test_never_on_a_huge_image_raises_and_auto_tiles_it():
    model = FakeSegmenter()
    huge = np.zeros((4096, 4096), np.uint8)
    with pytest.raises(ValueError, match=r"4096x4096 px would be shrunk 5\.1x.*tiling='auto' \(config: "
                                         r"test\.tiling=auto\)"):
        Predictor(model, tiling="never", device="cpu")(huge)
    assert model.calls == []  # refused before running the model
    ok = Predictor(model, 64, 128, tiling="never", max_downscale=0, device="cpu")(np.zeros((300, 300), np.uint8))
    assert len(ok[0]["scores"]) == 0 and ok[0]["masks"].image_size == (300, 300)


def test_large_objects_warn_about_the_overlap(capsys):
    image = draw(64, 112, [(20, 10, 50, 30, 0.9)])  # 30 px wide, overlap 16
    with pytest.warns(UserWarning, match=r"objects up to 30 px but tile_overlap is 16 px: objects cut by seams "
                                         r"may be split; set test\.tile_overlap >= 30 / tile_size larger"):
        out = predictor(FakeSegmenter(), progress=True)(image)[0]
    assert len(out["scores"]) == 1  # its sliver in tile 1 touched that tile's inner edge: dropped
    assert "tiles of 64x112" in capsys.readouterr().err  # the progress bar
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor(FakeSegmenter())(draw(64, 112, [(20, 10, 30, 20, 0.9)]))  # small objects: silent


def test_4096_field_stays_sparse():
    """400 nuclei on a 4096 x 4096 field, 25 tiles of 1024: dense masks would be 400 x 16.8 MB = 6.7 GB."""
    rects = [(100 + 200 * i + (j % 3), 100 + 200 * j, 110 + 200 * i + (j % 3), 110 + 200 * j, 0.6 + 0.001 * i)
             for i in range(20) for j in range(20)]
    image = (draw(4096, 4096, rects) * 255).round().astype(np.uint8)
    predict = Predictor(FakeSegmenter(), 1024, 100000, device="cpu", tile_size=1024, tile_overlap=128,
                        tile_scale=1.0, progress=False)
    tracemalloc.start()
    try:
        out = predict(image)[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(out["masks"], CropMasks) and len(out["masks"]) == 400
    assert (out["masks"].areas() == 100).all() and peak < 600e6  # the float RGB image is 200 MB


def test_options_are_validated_and_read_from_the_config():
    model = FakeSegmenter()
    for kw, message in [({"tiling": "sometimes"}, "tiling .*auto, always, never"),
                        ({"tile_size": 0}, "tile_size .*positive"),
                        ({"tile_overlap": 512}, "tile_overlap .*smaller than tile_size=512"),
                        ({"tile_overlap": -1}, "tile_overlap"), ({"merge_iou": 0}, "merge_iou"),
                        ({"detections_per_tile": 0}, "detections_per_tile"), ({"batch_size": 0}, "batch_size"),
                        ({"tile_scale": 0}, r"tile_scale \(test\.tile_scale\)")]:
        with pytest.raises(ValueError, match=message):
            Predictor(model, device="cpu", **kw)
    cfg = load_config(None, ["test.tiling=never", "test.tile_size=256", "test.tile_overlap=32",
                             "test.max_detections=50", "test.detections_per_tile=null", "data.min_size_test=600"])
    p = Predictor.from_config(model, cfg, progress=False)
    assert (p.tiling, p.tile_size, p.tile_overlap, p.max_detections, p.detections_per_tile, p.min_size,
            p.progress) == ("never", 256, 32, 50, None, 600, False)
    assert Predictor.from_config(model, load_config(None)).max_detections is None  # 0 = unlimited
