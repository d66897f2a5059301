"""Fidelity of the data path's geometry (issue 10): masks stay registered with the image at any scale, 8-bit
images are resized exactly like PIL (detectron2's uint8 path), and the guidance conv starts as the authors'."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from gains.alrm import ALRM
from gains.sparse_maps import SparseMaps
from gains.transforms import EvalTransform, TrainTransform, resize_image


def disk_scene(h, w, cy, cx, r):
    """An 8-bit image (255 inside a disk, 0 outside) as float [3,H,W] and the disk's mask uint8 [1,H,W]."""
    yy, xx = np.mgrid[:h, :w]
    inside = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 < r * r  # pixel centres, continuous coordinates
    image = torch.from_numpy(inside.astype(np.float32))[None].repeat(3, 1, 1)
    return image, torch.from_numpy(inside.astype(np.uint8))[None]


def centre_of_mass(weights: torch.Tensor) -> np.ndarray:
    w = weights.double()
    yy, xx = torch.meshgrid(torch.arange(w.shape[-2]), torch.arange(w.shape[-1]), indexing="ij")
    return np.array([float((w * yy).sum() / w.sum()), float((w * xx).sum() / w.sum())])


@pytest.mark.parametrize("src, dst", [(512, 800), (512, 640), (2000, 1333), (300, 451), (800, 512)])
@pytest.mark.parametrize("sparse", [False, True])
def test_masks_stay_registered_with_the_image(src, dst, sparse):
    """A shape drawn in the image and in its mask: after the resize the mask is the image's shape binarised
    (the same pixels, up to the 8-bit image's rounding) and their centres of mass agree to a small fraction
    of a pixel, on the train and the eval transforms. Nearest-neighbour masks were off by +0.35..0.52 px."""
    image, mask = disk_scene(src, src, cy=src * 0.43 + 0.3, cx=src * 0.57 - 0.2, r=src * 0.11)
    masks = SparseMaps.from_dense(mask, 0) if sparse else mask
    for transform in (EvalTransform(dst, 10 * dst), TrainTransform([dst], 10 * dst, hflip_prob=0.0)):
        random.seed(0)
        out_image, out_mask, _ = transform(image, masks, None)
        dense = out_mask.dense() if sparse else out_mask
        assert dense.shape[-2:] == out_image.shape[-2:] == (dst, dst)
        shape = out_image[0] >= 0.5
        differ = int((dense[0].bool() != shape).sum())
        assert differ <= 0.01 * int(shape.sum()), differ  # the same pixels but for the image's 1/255 rounding
        delta = centre_of_mass(dense[0]) - centre_of_mass(out_image[0])
        assert np.abs(delta).max() < 0.1, delta
        rows, cols = torch.nonzero(dense[0].any(1))[:, 0], torch.nonzero(dense[0].any(0))[:, 0]
        irows, icols = torch.nonzero(shape.any(1))[:, 0], torch.nonzero(shape.any(0))[:, 0]
        assert abs(int(rows[0]) - int(irows[0])) <= 1 and abs(int(rows[-1]) - int(irows[-1])) <= 1
        assert abs(int(cols[0]) - int(icols[0])) <= 1 and abs(int(cols[-1]) - int(icols[-1])) <= 1


def test_8bit_images_are_resized_exactly_like_pil():
    rng = np.random.default_rng(0)
    for trial in range(30):
        h, w = (int(v) for v in rng.integers(7, 181, 2)) if trial else (513, 511)
        nh, nw = (int(v) for v in rng.integers(5, 260, 2))
        channels = 3 if trial % 2 else 1
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
        expected = np.asarray(Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
                              .resize((nw, nh), Image.BILINEAR)).reshape(nh, nw, channels)
        got = resize_image(image, (nh, nw))
        assert torch.equal(got, torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255.0), trial


def test_16bit_and_float_images_keep_the_float_resize():
    """16-bit / float images are not quantised to 8 bits: the upsampled image is textbook bilinear
    interpolation of the float values (loop oracle in conftest), far finer than 1/255."""
    from tests.conftest import bilinear_upsample_oracle
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 65535, (3, 40, 50)).astype(np.float32) / 65535)
    expected = bilinear_upsample_oracle(image.double().numpy(), 61, 77)
    assert np.abs(resize_image(image, (61, 77)).double().numpy() - expected).max() < 1e-5


def test_predictor_resizes_like_the_data_layer(monkeypatch):
    """The Predictor's test-time resize is the eval transform's (PIL for 8-bit): same pixels reach the model."""
    from gains.predictor import Predictor

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            seen.extend(images)
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                     "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 28, 28)} for _ in images]

    pixels = np.random.default_rng(2).integers(0, 256, (45, 67), dtype=np.uint8)
    Predictor(Spy(), 80, 200, device="cpu", tiling="never", detections_per_tile=None)(pixels)
    image = torch.from_numpy(pixels).float()[None].repeat(3, 1, 1) / 255.0
    expected, _, _ = EvalTransform(80, 200)(image, torch.zeros(0, 45, 67, dtype=torch.uint8), None)
    assert torch.equal(seen[0], expected)


def test_guidance_conv_starts_as_pytorchs_default():
    torch.manual_seed(0)
    ours = ALRM(32, 16, 2).guidance
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(48, 16, 3, padding=1)
    assert torch.equal(ours.weight, reference.weight) and torch.equal(ours.bias, reference.bias)
    old = ALRM(32, 16, 2, guidance_init="kaiming").guidance
    assert torch.count_nonzero(old.bias) == 0
    with pytest.raises(ValueError, match="guidance_init"):
        ALRM(32, 16, 2, guidance_init="xavier")
