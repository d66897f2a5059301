"""Inference on raw images of any size: normalise, resize like detectron2 (whole image or tile by tile), run,
and return instance masks at the original size as `CropMasks` (memory O(sum of instance areas)).

`paste_masks` uses aligned coordinates, the convention of the training targets (roi_align aligned=True):
pixel (row i, col j) has its centre at (j + 0.5, i + 0.5) and mask cell c of an M-cell box [x0, x1] covers
[x0 + c * w / M, x0 + (c + 1) * w / M]. torchvision's paste_masks_in_image rounds boxes to integers and adds
a pixel (the old unaligned convention), so it is not used. `paste_masks_to_crops` computes the same pixels
but keeps only each mask's tight crop. Tiled prediction (large microscopy fields) lives in gains.tiling.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .imageio import to_float_rgb
from .instances import CropMasks
from .tiling import predict_tiled
from .transforms import resize_image, resized_shape  # the data layer's resize, so train and test agree

__all__ = ["Predictor", "boxes_to_original", "paste_masks", "paste_masks_to_crops", "resize_factor", "resized_shape",
           "tile_scale_from_config", "to_model_image"]

TILING_MODES = ("auto", "always", "never")


def _interp_matrix(lo: float, hi: float, start: int, stop: int, m: int, device, dtype) -> Tensor:
    """Bilinear weights [stop - start, m] sampling an m-cell 1-D mask spread over [lo, hi] at the pixel
    centres start + 0.5 ... stop - 0.5, with zero padding outside (grid_sample, align_corners=False)."""
    centres = torch.arange(start, stop, device=device, dtype=dtype) + 0.5
    u = (centres - lo) / max(hi - lo, 1e-6) * m - 0.5
    i0 = torch.floor(u)
    frac = u - i0
    i0 = i0.to(torch.int64)
    weights = torch.zeros((stop - start, m + 2), device=device, dtype=dtype)  # cells -1 and m absorb padding
    rows = torch.arange(stop - start, device=device)
    weights[rows, (i0 + 1).clamp(0, m + 1)] += 1 - frac
    weights[rows, (i0 + 2).clamp(0, m + 1)] += frac
    return weights[:, 1:m + 1]


def _paste_windows(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float):
    """Yield (i, (c0, r0, c1, r1), block) for every mask whose box neighbourhood meets the image: block is
    bool [r1 - r0, c1 - c0] on the masks' device, the thresholded paste on that window (exclusive ends).

    Bilinear sampling on an axis-aligned grid is separable, so each window is two small matrix products.
    """
    if masks.dim() == 4:
        masks = masks[:, 0]
    h, w = int(image_size[0]), int(image_size[1])
    if len(masks) == 0:
        return
    m = masks.shape[-1]
    work = masks.float()
    for i, (x0, y0, x1, y1) in enumerate(boxes.detach().double().cpu().tolist()):
        # A mask cell reaches half a cell beyond the box edge (zero padding fades it); one pixel more for safety.
        mx, my = math.ceil(0.5 * (x1 - x0) / m) + 1, math.ceil(0.5 * (y1 - y0) / m) + 1
        c0, c1 = max(int(math.floor(x0)) - mx, 0), min(int(math.ceil(x1)) + mx, w)
        r0, r1 = max(int(math.floor(y0)) - my, 0), min(int(math.ceil(y1)) + my, h)
        if c1 <= c0 or r1 <= r0:
            continue
        wy = _interp_matrix(y0, y1, r0, r1, m, work.device, work.dtype)
        wx = _interp_matrix(x0, x1, c0, c1, m, work.device, work.dtype)
        yield i, (c0, r0, c1, r1), (wy @ work[i] @ wx.T) >= threshold


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Paste per-box mask probabilities into the image and threshold them.

    masks float [N,1,M,M] (or [N,M,M]) probabilities; boxes float [N,4] xyxy in the image's pixels;
    image_size (H, W). Returns bool [N,H,W], `True` where the bilinearly resampled probability >= threshold.
    Equal to a full-image `grid_sample(align_corners=False)` of each mask over its box, computed only on the
    box's neighbourhood. Dense N x H x W: for whole fields of view use `paste_masks_to_crops`.
    """
    h, w = int(image_size[0]), int(image_size[1])
    out = torch.zeros((len(masks), h, w), dtype=torch.bool, device=masks.device)
    for i, (c0, r0, c1, r1), block in _paste_windows(masks, boxes, image_size, threshold):
        out[i, r0:r1, c0:c1] = block
    return out


def paste_masks_to_crops(masks: Tensor, boxes: Tensor, image_size: tuple[int, int],
                         threshold: float = 0.5) -> CropMasks:
    """`paste_masks` kept sparse: the same pixels, each mask stored as its tight crop.

    masks float [N,1,M,M] or [N,M,M]; boxes float [N,4] xyxy image pixels (any values: clipped like
    `paste_masks`); image_size (H, W). Returns CropMasks of N masks (mask i empty, box (0, 0, 0, 0), when no
    pixel reaches `threshold`); `.dense()` equals `paste_masks(...)`. Memory O(sum of box areas).
    """
    size = (int(image_size[0]), int(image_size[1]))
    n = len(masks)
    windows = np.zeros((n, 4), np.int64)
    crops = [np.zeros((0, 0), bool) for _ in range(n)]
    found = list(_paste_windows(masks, boxes, size, threshold))
    if found:
        # one device -> host copy for all windows, not one synchronising copy per mask
        flat = torch.cat([block.reshape(-1) for _, _, block in found]).cpu().numpy()
        offset = 0
        for i, window, block in found:
            windows[i] = window
            crops[i] = flat[offset:offset + block.numel()].reshape(block.shape)
            offset += block.numel()
    tight = CropMasks(windows, crops, size).tight()
    # own copies: a view would keep the whole batch of windows (dropped detections' too) alive
    return CropMasks(tight.boxes, [c.copy() for c in tight.crops], size)


def boxes_to_original(boxes: Tensor, resized_size: tuple[int, int], orig_size: tuple[int, int]) -> Tensor:
    """Boxes float [N,4] xyxy in the pixels of an image resized to `resized_size` (h, w) -> float32 xyxy in
    the pixels of its original `orig_size` (H0, W0), clamped to [0, W0] x [0, H0]; on the boxes' device."""
    (h, w), (h0, w0) = (int(s) for s in resized_size), (int(s) for s in orig_size)
    boxes = boxes.float() * torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], dtype=torch.float32, device=boxes.device)
    return torch.stack([boxes[:, 0].clamp(0, w0), boxes[:, 1].clamp(0, h0),
                        boxes[:, 2].clamp(0, w0), boxes[:, 3].clamp(0, h0)], dim=1)


def to_model_image(image, normalize: str = "dtype") -> Tensor:
    """numpy/tensor image -> float32 [3,H,W] in [0,1] RGB.

    Accepts H x W (grey), H x W x C (C = 1, 3, 4) of uint8 / uint16 / float / bool, or a tensor [3,H,W] /
    [1,H,W] / [H,W] / [H,W,C]. Integers are divided by their dtype's maximum (16-bit / 65535) with
    normalize="dtype", the training data's convention; "percentile" stretches the 1st-99.8th percentile,
    better for dim 16-bit fluorescence. Must match what the model was trained with (gains.imageio).
    """
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return to_float_rgb(array, normalize)


def resize_factor(height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor (model px per original px) of `resized_shape` before its rounding: shortest edge ->
    min_size unless the longest edge would exceed max_size (detectron2's ResizeShortestEdge)."""
    scale = min_size / min(height, width)
    return max_size / max(height, width) if max(height, width) * scale > max_size else scale


def tile_scale_from_config(cfg) -> float | None:
    """The Predictor's `tile_scale` from `test.tile_scale` (configs/base.yaml): the scale tiles are seen at.

    A number is used as it is. 'auto' is the scale the model was trained at, as the config tells it: with
    `data.crop_size` [h, w] (or S) the factor the test resize (`data.min_size_test` / `max_size_test`, the
    size training resized its crops to) gives an h x w image, so every tile looks like a training crop;
    without crops None: each image's own whole-image factor, the scale training saw whole images of this
    data set at, so tiled and whole-image predictions of an image see the same pixels. ConfigError (a
    ValueError) for anything else, naming the key.
    """
    data, value = cfg["data"], cfg["test"].get("tile_scale", "auto")
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"test.tile_scale must be 'auto' or a positive number (model px per original px), "
                              f"got {value!r}")
        crop = data.get("crop_size")
        if not crop:
            return None
        ch, cw = (int(crop), int(crop)) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
        return resize_factor(ch, cw, int(data["min_size_test"]), int(data["max_size_test"]))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"test.tile_scale must be 'auto' or a positive number (model px per original px), "
                          f"got {value!r}")
    return float(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _validate(tiling, tile_size, tile_overlap, detections_per_tile, max_detections, merge_iou, merge_containment,
              max_downscale, batch_size, min_size_test, max_size_test, tile_scale) -> None:
    """ValueError naming the option (and its config key) for a bad Predictor setting."""
    _check(tiling in TILING_MODES, f"tiling (test.tiling) must be one of {', '.join(TILING_MODES)}, "
                                   f"got {tiling!r}")
    _check(int(tile_size) > 0, f"tile_size (test.tile_size) must be a positive number of pixels, "
                               f"got {tile_size}")
    _check(0 <= int(tile_overlap) < int(tile_size),
           f"tile_overlap (test.tile_overlap) must be >= 0 and smaller than tile_size={tile_size}, "
           f"got {tile_overlap}")
    _check(detections_per_tile is None or int(detections_per_tile) > 0,
           f"detections_per_tile (test.detections_per_tile) must be positive or null, got {detections_per_tile}")
    _check(max_detections is None or int(max_detections) >= 0,
           f"max_detections (test.max_detections) must be >= 0 (0 = unlimited), got {max_detections}")
    for name, value in (("merge_iou", merge_iou), ("merge_containment", merge_containment)):
        _check(0.0 < float(value) <= 1.0, f"{name} (test.{name}) must lie in (0, 1], got {value}")
    _check(float(max_downscale) == 0 or float(max_downscale) >= 1.0,
           f"max_downscale (test.max_downscale) must be 0 (no limit) or >= 1, got {max_downscale}")
    _check(int(batch_size) > 0, f"batch_size (test.tile_batch_size) must be positive, got {batch_size}")
    _check(tile_scale is None or (math.isfinite(float(tile_scale)) and float(tile_scale) > 0),
           f"tile_scale (test.tile_scale) must be None ('auto') or a positive factor, got {tile_scale}")
    _check(int(min_size_test) > 0 and int(max_size_test) > 0,
           f"min_size_test / max_size_test must be positive, got {min_size_test} / {max_size_test}")


class Predictor:
    """`Predictor(model, min_size_test, max_size_test)(images)` -> one dict per image, on the CPU, in the
    ORIGINAL image's pixels (H0, W0): `boxes` float32 [N,4] xyxy, `labels` int64 [N] in 1..K, `scores`
    float32 [N] (descending) and `masks` a `CropMasks` of N masks of size (H0, W0).

    images: a list of numpy arrays or tensors of any size (see `to_model_image`), or one of them. The
    whole-image path resizes an image like the evaluation data (gains.transforms: shortest edge to
    `min_size_test`, longest capped at `max_size_test`, bilinear with antialiasing like PIL's resize in
    detectron2), runs the model in eval mode and scales the boxes back. The tiled path (gains.tiling) cuts
    the ORIGINAL image into tiles and resizes every tile by one factor, the scale the model was trained at
    (`tile_scale`; `scale_of`): None (default) = the factor the whole-image path gives this image, so where
    both fit the tiled and whole-image predictions see the same pixels and agree; a number = that factor
    (e.g. `tile_scale_from_config`: a training crop's factor). A tile is never resized "like a test image of
    tile_size px": that would see a 512-px tile of a 1040-px image at 800/512 = 1.56x when training saw
    the image at 0.77x. Intensities are normalised over the whole image before tiling, so all tiles share
    one intensity scale.

    tiling: "auto" tiles images larger than `tile_size` in either side, "always" tiles every image (an
    image no larger than a tile is one tile: the whole-image result, at the default tile_scale), "never"
    runs the whole image and raises ValueError when the resize would shrink it by more than `max_downscale`,
    i.e. when
    max(H0 / h, W0 / w) > max_downscale for (h, w) = resized_shape(H0, W0, ...) (0 = no limit).
    tile_size / tile_overlap: tile side and overlap in ORIGINAL pixels. detections_per_tile: the model's
    cap per forward image (each tile, or the whole image), set on `model.roi_heads.max_dets` during the
    call; None keeps the model's own cap. max_detections: cap per image after merging (None/0 = none).
    merge_iou / merge_containment: duplicate rules across tiles (gains.tiling). batch_size: tiles per
    forward pass. progress: a tqdm bar per tiled image. tile_scale: see above; with None a warning names
    an image whose tiles the whole-image factor shrinks by more than `max_downscale`.
    """

    def __init__(self, model: torch.nn.Module, min_size_test: int = 800, max_size_test: int = 1333,
                 device: str | torch.device | None = None, normalize: str = "dtype", mask_threshold: float = 0.5,
                 tiling: str = "auto", tile_size: int = 512, tile_overlap: int = 128,
                 detections_per_tile: int | None = 300, max_detections: int | None = None,
                 merge_iou: float = 0.5, merge_containment: float = 0.8, max_downscale: float = 2.0,
                 batch_size: int = 4, progress: bool = True, tile_scale: float | None = None):
        _validate(tiling=tiling, tile_size=tile_size, tile_overlap=tile_overlap,
                  detections_per_tile=detections_per_tile, max_detections=max_detections, merge_iou=merge_iou,
                  merge_containment=merge_containment, max_downscale=max_downscale, batch_size=batch_size,
                  min_size_test=min_size_test, max_size_test=max_size_test, tile_scale=tile_scale)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.min_size, self.max_size = int(min_size_test), int(max_size_test)
        self.normalize, self.mask_threshold = normalize, mask_threshold
        self.tiling, self.tile_size, self.tile_overlap = tiling, int(tile_size), int(tile_overlap)
        self.detections_per_tile = None if detections_per_tile is None else int(detections_per_tile)
        self.max_detections = int(max_detections) if max_detections else None
        self.merge_iou, self.merge_containment = float(merge_iou), float(merge_containment)
        self.max_downscale, self.batch_size, self.progress = float(max_downscale), int(batch_size), progress
        self.tile_scale = None if tile_scale is None else float(tile_scale)

    @classmethod
    def from_config(cls, model: torch.nn.Module, cfg, **overrides) -> "Predictor":
        """A Predictor with `cfg.data.min_size_test / max_size_test / normalize` and the `cfg.test` tiling
        keys (configs/base.yaml; `test.tile_scale` through `tile_scale_from_config`); keyword `overrides`
        (e.g. progress=False, device="cpu") win."""
        data, test = cfg["data"], cfg["test"]
        per_tile = test.get("detections_per_tile", 300)
        kwargs = dict(min_size_test=int(data["min_size_test"]), max_size_test=int(data["max_size_test"]),
                      normalize=str(data.get("normalize", "dtype")), tiling=str(test.get("tiling", "auto")),
                      tile_size=int(test.get("tile_size", 512)), tile_overlap=int(test.get("tile_overlap", 128)),
                      detections_per_tile=None if per_tile is None else int(per_tile),
                      max_detections=int(test.get("max_detections") or 0) or None,
                      merge_iou=float(test.get("merge_iou", 0.5)),
                      merge_containment=float(test.get("merge_containment", 0.8)),
                      max_downscale=float(test.get("max_downscale", 2.0)),
                      batch_size=int(test.get("tile_batch_size", 4)), tile_scale=tile_scale_from_config(cfg))
        kwargs.update(overrides)
        return cls(model, **kwargs)

    @torch.no_grad()
    def __call__(self, images) -> list[dict]:
        if isinstance(images, (np.ndarray, Tensor)) and images.ndim <= 3:
            images = [images]  # one image; a 4-D array/tensor is iterated as a batch
        results = []
        with self._detection_cap():
            for image in images:
                x = to_model_image(image, self.normalize)
                h0, w0 = x.shape[-2:]
                if self._tiles(h0, w0):
                    scale = self.scale_of(h0, w0)
                    self._warn_shrunk_tiles(h0, w0, scale)
                    pred = predict_tiled(x, functools.partial(self._detect, scale=scale), self.tile_size,
                                         self.tile_overlap, self.batch_size, self.merge_iou,
                                         self.merge_containment, self.max_detections, self.progress)
                else:
                    self._check_whole_image(h0, w0)
                    pred = _top(self._detect([x])[0], self.max_detections)
                results.append(pred)
        return results

    def _tiles(self, h: int, w: int) -> bool:
        if self.tiling == "auto":
            return max(h, w) > self.tile_size
        return self.tiling == "always"

    def scale_of(self, h0: int, w0: int) -> tuple[float, float]:
        """(row, column) factors, model px per original px, by which the tiles of an h0 x w0 image are
        resized: `tile_scale` on both axes, or with None the whole-image path's own (resized / original)."""
        if self.tile_scale is not None:
            return self.tile_scale, self.tile_scale
        nh, nw = resized_shape(h0, w0, self.min_size, self.max_size)
        return nh / h0, nw / w0

    def _warn_shrunk_tiles(self, h0: int, w0: int, scale: tuple[float, float]) -> None:
        """tile_scale None on an image the whole-image factor shrinks a lot: it may not be the training scale."""
        shrink = 1.0 / min(scale)
        if self.tile_scale is None and self.max_downscale and shrink > self.max_downscale:
            warnings.warn(
                f"image of {h0}x{w0} px: its tiles are shrunk {shrink:.1f}x, the whole image's test resize "
                f"(min_size_test={self.min_size}, max_size_test={self.max_size}), because tile_scale is None "
                "(test.tile_scale=auto without data.crop_size: the model is taken to be trained on whole images "
                "of this size). If it was trained on smaller images, set test.tile_scale to their factor, "
                "min_size_test / their side (e.g. 800 / 512 = 1.5625)", stacklevel=4)  # the caller of __call__

    def _check_whole_image(self, h0: int, w0: int) -> None:
        """tiling="never": refuse an image the whole-image path would shrink by more than max_downscale."""
        if self.tiling != "never" or not self.max_downscale:
            return
        nh, nw = resized_shape(h0, w0, self.min_size, self.max_size)
        shrink = max(h0 / nh, w0 / nw)
        if shrink > self.max_downscale:
            raise ValueError(
                f"image of {h0}x{w0} px would be shrunk {shrink:.1f}x to {nh}x{nw} px by the whole-image path "
                f"(tiling='never', min_size_test={self.min_size}, max_size_test={self.max_size}; limit "
                f"max_downscale={self.max_downscale:g}): objects would be far smaller than the model was trained "
                "on. Use tiling='auto' (config: test.tiling=auto) to predict it tile by tile")

    @contextlib.contextmanager
    def _detection_cap(self):
        """Set the model's per-image detection cap to detections_per_tile for the call, restore it after."""
        if self.detections_per_tile is None:
            yield
            return
        heads = getattr(self.model, "roi_heads", None)
        if heads is None or not hasattr(heads, "max_dets"):
            raise ValueError("the model has no roi_heads.max_dets to cap detections per tile; pass "
                             "detections_per_tile=None (test.detections_per_tile=null)")
        saved = heads.max_dets
        heads.max_dets = self.detections_per_tile
        try:
            yield
        finally:
            heads.max_dets = saved

    def _detect(self, images: list[Tensor], scale: tuple[float, float] | None = None) -> list[dict]:
        """Run the model on images of ONE size, float32 [3,h,w] in [0,1] (any device), each resized by
        `scale` (row, column factors; a tile's, `scale_of`) or, with None, by the whole-image test resize.

        Returns per image `boxes` float32 [n,4] xyxy in that image's pixels (clamped to it), `labels` int64,
        `scores` float32 (the model's order: descending) and `masks` CropMasks of size (h, w), on the CPU.
        """
        h0, w0 = (int(s) for s in images[0].shape[-2:])
        if scale is None:
            nh, nw = resized_shape(h0, w0, self.min_size, self.max_size)
        else:  # rounded like resized_shape; a one-tile image under the whole-image factor gets its exact size
            nh, nw = max(int(h0 * scale[0] + 0.5), 1), max(int(w0 * scale[1] + 0.5), 1)
        # the data layer's resize (PIL's for 8-bit images, as detectron2), so test and training pixels agree
        batch = torch.stack([resize_image(im.cpu(), (nh, nw)).to(self.device) for im in images])
        out = []
        for det in self.model(list(batch)):
            boxes = boxes_to_original(det["boxes"], (nh, nw), (h0, w0))
            masks = paste_masks_to_crops(det["masks"], boxes, (h0, w0), self.mask_threshold)
            out.append({"boxes": boxes.float().cpu(), "labels": det["labels"].cpu().to(torch.int64),
                        "scores": det["scores"].float().cpu(), "masks": masks})
        return out


def _top(pred: dict, k: int | None) -> dict:
    """The k highest-scoring detections (stable: ties keep their order), all when k is None."""
    order = torch.argsort(pred["scores"], descending=True, stable=True)
    if k is not None:
        order = order[:k]
    if torch.equal(order, torch.arange(len(pred["scores"]))):
        return pred
    return {"boxes": pred["boxes"][order], "labels": pred["labels"][order], "scores": pred["scores"][order],
            "masks": pred["masks"].select(order.numpy())}
