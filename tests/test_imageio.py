"""Image reading (gains/imageio.py): PNG, JPEG and TIFF at 8 bit, 16 bit and float, grey and RGB, to float RGB.

Oracle: the array written with PIL or tifffile, scaled by its dtype's maximum (exact for the lossless
formats), and the percentile stretch of a dim 16-bit image.
"""
import numpy as np
import pytest
import torch

from conftest import write_png
from gains.imageio import read_image, to_float_rgb

FORMATS = [(np.uint8, ".png", 0), (np.uint8, ".png", 3), (np.uint16, ".png", 0), (np.uint8, ".jpg", 0),
           (np.uint8, ".jpg", 3), (np.uint16, ".tif", 0), (np.uint16, ".tif", 3), (np.float32, ".tif", 0),
           (np.float32, ".tif", 3)]  # PIL cannot write 16-bit RGB PNG; 16-bit RGB is covered by TIFF


@pytest.mark.parametrize("dtype, suffix, channels", FORMATS)
def test_read_image_formats(tmp_path, dtype, suffix, channels):
    rng = np.random.default_rng(0)
    shape = (12, 10, 3) if channels else (12, 10)
    top = 1.0 if dtype == np.float32 else np.iinfo(dtype).max
    array = (rng.random(shape) * top).astype(dtype)
    array.flat[0] = top  # make the full range present
    path = tmp_path / f"im{suffix}"
    if suffix == ".tif":
        import tifffile
        tifffile.imwrite(path, array)
    else:
        write_png(path, array)
    image = read_image(path)
    assert image.dtype == torch.float32 and image.shape == (3, 12, 10)
    assert 0.0 <= image.min() and image.max() <= 1.0
    if suffix != ".jpg":  # lossless formats: exact scaling
        expected = array.astype(np.float32) / top
        expected = np.repeat(expected[None], 3, 0) if not channels else np.moveaxis(expected, -1, 0)
        np.testing.assert_allclose(image.numpy(), expected, rtol=1e-6)


def test_percentile_normalisation_stretches_dim_16bit():
    dim = np.linspace(100, 4000, 400, dtype=np.float64).reshape(20, 20).astype(np.uint16)
    assert float(to_float_rgb(dim).max()) < 0.07  # /65535 leaves it nearly black
    stretched = to_float_rgb(dim, "percentile")
    assert float(stretched.max()) == 1.0 and float(stretched.min()) == 0.0


def test_png_above_pils_pixel_limit_is_a_data_error_naming_the_file(tmp_path, monkeypatch):
    """PIL refuses PNG/JPEG files above 2 x MAX_IMAGE_PIXELS with its own exception type (not an OSError);
    the loader names the file and says to use TIFF. Tested with the limit lowered, not with a huge file."""
    from PIL import Image

    from gains.errors import DataError
    from gains.imageio import read_image_array, read_image_size

    path = tmp_path / "field.png"
    write_png(path, np.zeros((64, 64), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x 1000
    for read in (read_image_size, read_image_array):
        with pytest.raises(DataError, match=r"field\.png: .*decompression bomb.*save the field as TIFF"):
            read(path)
