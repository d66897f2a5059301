"""Sparse training targets (gains/sparse_maps.py): the same numbers as the dense [N,H,W] path, in memory that
grows with the instances' area. Oracles: F.interpolate / roi_align on dense stacks, the dense data path."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from conftest import ellipse, write_coco
from gains.config import load_config
from gains.data import build_dataset
from gains.model import build_model
from gains.mask_head import crop_per_gt
from gains.sparse_maps import SparseMaps, linear_taps, nearest_taps
from gains.transforms import RandomCrop, TrainTransform, crop, hflip, resize, rot90, vflip


def random_stack(rng, n, h, w, fill):
    """Dense maps [n,h,w] equal to `fill` off a random box each (uint8 0/1 masks for fill 0, else float)."""
    dense = torch.full((n, h, w), float(fill))
    for i in range(n):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0, h) + 1, rng.integers(x0, w) + 1
        patch = rng.random((y1 - y0, x1 - x0))
        dense[i, y0:y1, x0:x1] = torch.from_numpy((patch < 0.7) * 1.0 if fill == 0 else 1 + patch).float()
    return dense.to(torch.uint8) if fill == 0 else dense


def test_taps_are_interpolates_own():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_in, n_out = (int(v) for v in rng.integers(1, 300, 2))
        x = torch.arange(n_in, dtype=torch.float32)[None, None]  # float32, as the dense path's masks
        assert torch.equal(nearest_taps(n_in, n_out).float(), F.interpolate(x, size=n_out, mode="nearest")[0, 0])
        eye = torch.eye(n_in)[None]  # one-hot rows: interpolating them yields the weight matrix
        weights = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T  # [n_out, n_in]
        i0, i1, w0, w1 = linear_taps(n_in, n_out)
        ours = torch.zeros(n_out, n_in)
        ours[torch.arange(n_out), i0] += w0
        ours[torch.arange(n_out), i1] += w1
        assert torch.allclose(ours, weights, atol=5e-5)  # same taps; weights to float32 rounding of the position


def test_geometry_matches_the_dense_path():
    rng = np.random.default_rng(1)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(8, 70, 2))
        masks, ga = random_stack(rng, 4, h, w, 0), random_stack(rng, 4, h, w, 1.0)
        image = torch.rand(3, h, w)
        dense = (image, masks, ga)
        sparse = (image, SparseMaps.from_dense(masks, 0), SparseMaps.from_dense(ga, 1.0))
        top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        size = (int(rng.integers(5, 120)), int(rng.integers(5, 120)))
        k = int(rng.integers(0, 4))
        steps = [lambda i, m, g: crop(i, m, g, top, left, h - top, w - left),
                 lambda i, m, g: resize(i, m, g, size), hflip, vflip, lambda i, m, g: rot90(i, m, g, k)]
        for step in steps:
            dense, sparse = step(*dense), step(*sparse)
            assert torch.equal(sparse[1].dense(), dense[1]), trial  # masks: bitwise
            assert torch.allclose(sparse[2].dense(), dense[2], atol=1e-5), trial
            assert sparse[1].shape == tuple(dense[1].shape)


def test_roi_crops_match_crop_per_gt_on_dense_maps():
    rng = np.random.default_rng(2)
    g = torch.Generator().manual_seed(2)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(10, 90, 2))
        for fill in (0, 1.0):
            dense = random_stack(rng, 5, h, w, fill)
            xy = torch.rand(12, 4, generator=g) * torch.tensor([w, h, w, h])
            boxes = torch.stack([xy[:, [0, 2]].min(1)[0], xy[:, [1, 3]].min(1)[0],
                                 xy[:, [0, 2]].max(1)[0] + 1, xy[:, [1, 3]].max(1)[0] + 1], 1)
            boxes = boxes.minimum(torch.tensor([w, h, w, h], dtype=torch.float32))
            gt = torch.randint(0, 5, (12,), generator=g)
            expected = crop_per_gt(dense, boxes, gt, 28)
            got = crop_per_gt(SparseMaps.from_dense(dense, fill), boxes, gt, 28)
            assert torch.allclose(got, expected, atol=2e-5)


def overlapping_set(root, n_images=3):
    """Images of 72x88 with 8 overlapping/touching ellipses each (category 1 = GA target)."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "height": 72, "width": 88})
        for k in range(8):
            cx, cy = rng.uniform(10, 78), rng.uniform(10, 62)
            anns.append({"id": 100 * i + k, "image_id": i, "category_id": 1 + (k % 4 == 3), "iscrowd": 0,
                         "segmentation": [ellipse(cx, cy, rng.uniform(4, 12), rng.uniform(4, 12))]})
    write_coco(root, images, anns, [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}])
    return root


TINY = ["model.backbone.depth=18", "model.backbone.fpn_channels=32", "model.roi_heads.mask_conv_dim=16",
        "model.roi_heads.fc_dim=32", "model.rpn.batch_size_per_image=64", "model.roi_heads.batch_size_per_image=64",
        "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100", "model.num_classes=2",
        "gamm.target_category_id=1", "data.min_size_train=[100,120]", "data.max_size_train=200"]


def both_formats(root, *overrides):
    cfgs = [load_config(None, [f"data.root={root}", f"data.target_format={f}", *TINY, *overrides])
            for f in ("dense", "sparse")]
    return [build_dataset(c, "train", is_train=True) for c in cfgs], cfgs


def item(dataset, index, seed):
    random.seed(seed)  # the transforms' random stream (gains.sampling seeds it per sample the same way)
    return dataset[index]


@pytest.mark.parametrize("extra", [[], ["data.crop_size=[48,56]", "data.crop_min_area=20", "data.vflip_prob=0.5",
                                        "data.rot90_prob=0.5", "data.intensity_scale=[0.8,1.2]"]])
def test_dataset_items_and_losses_equal_the_dense_path(tmp_path, extra):
    (dense_set, sparse_set), (cfg, _) = both_formats(overlapping_set(tmp_path), *extra)
    batch = {"dense": [], "sparse": []}
    for index in range(3):
        for seed in range(4):
            (di, dt), (si, st) = item(dense_set, index, seed), item(sparse_set, index, seed)
            assert torch.equal(di, si)
            assert torch.equal(dt["boxes"], st["boxes"]) and torch.equal(dt["labels"], st["labels"])
            assert torch.equal(dt["ann_ids"], st["ann_ids"]) and dt["dropped_fragments"] == st["dropped_fragments"]
            assert isinstance(st["masks"], SparseMaps) and isinstance(st["ga"], SparseMaps)
            assert torch.equal(st["masks"].dense(), dt["masks"])
            assert torch.allclose(st["ga"].dense(), dt["ga"], atol=1e-5)
        batch["dense"].append(item(dense_set, index, 7))
        batch["sparse"].append(item(sparse_set, index, 7))
    losses = {}
    for fmt, samples in batch.items():
        torch.manual_seed(0)
        model = build_model(cfg).train()
        torch.manual_seed(1)  # the RPN / RoI samplers draw from here: same draws for both formats
        losses[fmt] = model([s[0] for s in samples], [s[1] for s in samples])
    for k in losses["dense"]:
        assert torch.allclose(losses["sparse"][k], losses["dense"][k], rtol=1e-5, atol=1e-6), k


def test_random_crop_keeps_visible_parts_and_counts_small_fragments():
    masks = torch.zeros(3, 40, 40, dtype=torch.uint8)
    masks[0, 5:15, 5:15] = 1     # wholly inside the window
    masks[1, 18:30, 10:20] = 1   # cut: 2 rows x 10 cols = 20 px visible
    masks[2, 19:30, 30:40] = 1   # cut: 1 row x 10 = 10 px visible -> below min_area 16: dropped
    for m in (masks, SparseMaps.from_dense(masks, 0)):
        cropper = RandomCrop((20, 40), min_area=16)
        image = torch.rand(3, 40, 40)
        random.seed(0)
        top = random.randint(0, 20)  # the window the cropper will draw from the same stream
        random.seed(0)
        out_image, out_masks, _, boxes, keep, dropped = cropper(image, m, None)
        assert out_image.shape[-2:] == (20, 40) and boxes is None
        visible = (masks[:, top:top + 20] > 0).flatten(1).sum(1)
        expect_keep = [i for i in range(3) if visible[i] > 0 and not (visible[i] < masks[i].sum() and visible[i] < 16)]
        assert keep.tolist() == expect_keep
        assert dropped == sum(1 for i in range(3) if 0 < visible[i] < 16 and visible[i] < masks[i].sum())
        dense = out_masks.dense() if isinstance(out_masks, SparseMaps) else out_masks
        assert torch.equal(dense, masks[keep][:, top:top + 20])


@pytest.mark.parametrize("sparse", [False, True])
def test_random_crop_boxes_uncut_keep_the_annotation_box_cut_get_the_visible_part(sparse):
    """The window is rows 10..30 (all columns). Instance 0 lies inside: its annotation box (polygon extent,
    not pixel-tight) is only shifted. Instance 1, an L cut across its corner, keeps the box of its visible
    pixels, which its clipped annotation box would overstate. Instance 2 sticks out by less than a pixel
    row of the mask: not cut, its box is clipped to the window."""
    masks = torch.zeros(3, 40, 40, dtype=torch.uint8)
    masks[0, 12:20, 5:15] = 1
    masks[1, 2:12, 20:22] = 1      # vertical bar of the L, rows 2..11: rows 10, 11 visible
    masks[1, 2:4, 20:32] = 1       # horizontal bar, rows 2..3: cut away
    masks[2, 25:30, 30:36] = 1
    boxes = torch.tensor([[4.6, 11.7, 15.2, 20.1], [19.8, 1.9, 32.3, 12.2], [29.7, 24.8, 36.1, 30.4]])
    m = SparseMaps.from_dense(masks, 0) if sparse else masks
    # a seed whose window starts at row 10 (the cropper draws the top row first, from the same stream)
    seed = next(s for s in range(1000) if random.seed(s) is None and random.randint(0, 20) == 10)
    random.seed(seed)
    _, _, _, out, keep, dropped = RandomCrop((20, 40), min_area=1)(torch.rand(3, 40, 40), m, None, boxes)
    assert keep.tolist() == [0, 1, 2] and dropped == 0
    assert torch.allclose(out[0], torch.tensor([4.6, 1.7, 15.2, 10.1]))
    assert out[1].tolist() == [20.0, 0.0, 22.0, 2.0]  # visible rows 10, 11, columns 20, 21 (not 19.8..32.3)
    assert torch.allclose(out[2], torch.tensor([29.7, 14.8, 36.1, 20.0]))  # clipped at the window's bottom


def test_sparse_targets_grow_with_instance_area_not_count(tmp_path):
    """1024x1024 with 400 small nuclei: the sparse item holds a few MB where the dense one holds 2 GB."""
    rng = np.random.default_rng(3)
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [ellipse(rng.uniform(20, 1004), rng.uniform(20, 1004), 8, 6, n=16)]}
            for k in range(400)]
    write_coco(tmp_path, [{"id": 1, "file_name": "big.png", "height": 1024, "width": 1024}], anns,
               [{"id": 1, "name": "nucleus"}])
    cfg = load_config(None, [f"data.root={tmp_path}", "model.num_classes=1", "gamm.target_category_id=1",
                             "gamm.variant=nuclei", "gamm.window_size=4", "data.min_size_train=[1024]",
                             "data.max_size_train=1024", "data.hflip_prob=0"])
    _, target = build_dataset(cfg, "train", is_train=True)[0]
    held = sum(p.numel() * p.element_size() for m in (target["masks"], target["ga"]) for p in m.patches)
    assert target["masks"].shape == (400, 1024, 1024) and held < 400 * 1024 * 1024 * 5 / 200
    assert float(torch.stack([p.max() for p in target["ga"].patches if p.numel()]).max()) > 1.0


@pytest.mark.usefixtures("restore_global_state")
def test_crop_training_runs_and_logs_dropped_fragments(tmp_path):
    import json

    from gains import engine

    root = overlapping_set(tmp_path / "data")
    cfg = load_config(None, [f"data.root={root}", *TINY, f"output_dir={tmp_path / 'run'}", "device=cpu",
                             "data.num_workers=0", "data.crop_size=[40,40]", "data.crop_min_area=200",
                             "data.rot90_prob=0.5", "data.vflip_prob=0.5", "solver.max_iter=3", "solver.ims_per_batch=2",
                             "solver.log_period=3", "solver.warmup_iters=1", "solver.steps=[10]", "test.eval_at_end=false",
                             "model.backbone.norm=gn", "model.backbone.freeze_at=0"])
    result = engine.train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["iter"] == 3 and result.final_checkpoint.is_file() and "dropped_fragments" in lines[-1]
    # a 40x40 crop of 72x88 images with 8 ellipses of radius 4-12 each cuts some of them to < 200 px: drops logged
    assert lines[-1]["dropped_fragments"] > 0
    assert all(np.isfinite(lines[-1][k]) for k in ("loss_mask", "loss_ga"))


def test_large_training_images_without_crop_get_a_warning_naming_the_option(tmp_path):
    write_coco(tmp_path, [{"id": 5, "file_name": "field.png", "height": 900, "width": 1200}],
               [{"id": 1, "image_id": 5, "category_id": 1, "iscrowd": 0, "segmentation": [ellipse(50, 60, 9, 7)]}])
    base = [f"data.root={tmp_path}", "model.num_classes=1", "data.min_size_train=[300]", "data.max_size_train=400"]
    with pytest.warns(UserWarning, match=r"shrunk up to 3\.0x.*image id 5: 900x1200 -> 300x400.*data\.crop_size"):
        build_dataset(load_config(None, base), "train", is_train=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a crop: no warning
        build_dataset(load_config(None, base + ["data.crop_size=256"]), "train", is_train=True)


def test_sparse_targets_cross_dataloader_workers(tmp_path):
    """Worker processes pickle items: SparseMaps must arrive intact (the training loader uses workers)."""
    from gains.data import collate

    (_, sparse_set), _ = both_formats(overlapping_set(tmp_path))
    loader = torch.utils.data.DataLoader(sparse_set, batch_size=2, num_workers=1, collate_fn=collate)
    images, targets = next(iter(loader))
    for i, t in enumerate(targets):
        assert isinstance(t["masks"], SparseMaps) and t["masks"].shape[-2:] == images[i].shape[-2:]
        # boxes are the annotations' (polygon extent, resized), within about a pixel of the masks' own
        assert t["boxes"].shape == (len(t["masks"]), 4) and len(t["masks"]) > 0
        assert torch.allclose(t["masks"].tight_boxes(), t["boxes"], atol=2.0)


@pytest.mark.parametrize("n, dtype, fill", [(5, torch.uint8, 0.0), (3, torch.float32, 1.0), (0, torch.float32, 1.0)])
def test_sparse_maps_pickle_as_one_flat_tensor(n, dtype, fill):
    """A worker sends each tensor as its own shared-memory segment: SparseMaps pickle their patches as one
    tensor, and come back equal (same boxes, patches, size, fill, dtype), their patches independent."""
    import io
    import pickle

    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions with ForkingPickler)

    rng = np.random.default_rng(n)
    boxes, patches = [], []
    for _ in range(n):
        x0, y0 = (int(v) for v in rng.integers(0, 20, 2))
        w, h = (int(v) for v in rng.integers(1, 9, 2))
        boxes.append([x0, y0, x0 + w, y0 + h])
        patches.append(torch.from_numpy(rng.random((h, w)) * 200).to(dtype))
    maps = SparseMaps(torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4), patches, (30, 40), fill, dtype)

    reduced = maps.__reduce__()[1]
    assert sum(isinstance(a, torch.Tensor) for a in reduced) == 2  # boxes + one flat tensor, whatever n is
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(maps)  # what a DataLoader worker does
    for back in (pickle.loads(pickle.dumps(maps)), pickle.loads(buf.getvalue())):
        assert isinstance(back, SparseMaps) and back.size == (30, 40) and back.fill == fill and back.dtype == dtype
        assert torch.equal(back.boxes, maps.boxes) and len(back.patches) == n
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(back.patches, patches))
        assert torch.equal(back.dense(), maps.dense())
        if n > 1:
            back.patches[0].fill_(7)
            assert torch.equal(back.patches[1], patches[1])
