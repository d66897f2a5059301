"""Reading microscopy images: PNG/JPEG/TIFF, 8/16-bit or float, greyscale or RGB(A) -> float32 [3,H,W].

Intensities are scaled into [0, 1] in one of two documented ways (`normalize`):
- "dtype": divide by the dtype's maximum (255 for 8-bit, 65535 for 16-bit); floats are kept when already
  in [0, 1], else min-max scaled. Faithful to COCO-style pipelines (ISBI, UCOC and Kaggle are 8-bit).
- "percentile": per-image stretch of the 1st..99.8th percentile to [0, 1], clipped — the usual choice for
  16-bit fluorescence whose useful range is a few thousand counts (a /65535 image would be nearly black).
"""
from __future__ import annotations

import os
from pathlib import Path
from struct import error as struct_error
from zlib import error as zlib_error

import numpy as np
import torch

from .errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")
NORMALIZATIONS = ("dtype", "percentile")


_UNREADABLE_FIX = ("the file is corrupt or truncated (an interrupted copy or download?): copy it again from the "
                   "source, or re-export it as PNG/TIFF")


def _unreadable(path: Path, e: BaseException, what: str) -> DataError:
    reason = str(e).splitlines()[0][:200] if str(e) else ""
    return DataError(f"{path}: cannot {what} ({type(e).__name__}{': ' + reason if reason else ''}); "
                     f"{_UNREADABLE_FIX}")


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file header, without decoding pixels.

    Raises DataError naming the file when the header cannot be read (not an image, corrupt)."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile
            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
            return _hw_from_shape(shape, path)
        from PIL import Image
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct_error) as e:
        if _is_data_error(e):
            raise
        raise _unreadable(path, e, "read the image header") from None
    except Exception as e:  # noqa: BLE001 - PIL.Image.DecompressionBombError derives from Exception only
        raise _too_large(path, e) if _is_decompression_bomb(e) else e


def _is_data_error(e: BaseException) -> bool:
    return isinstance(e, DataError)


def _is_decompression_bomb(e: BaseException) -> bool:
    return type(e).__name__ == "DecompressionBombError"


def _too_large(path: Path, e: BaseException) -> DataError:
    """PIL refuses PNG/JPEG files above 2 x Image.MAX_IMAGE_PIXELS (a guard against hostile web images);
    whole-slide fields can be that large, and TIFFs (read with tifffile) have no such limit."""
    return DataError(f"{path}: {str(e).splitlines()[0][:200]} (PIL's limit for PNG/JPEG files); save the field "
                     "as TIFF (no such limit; prediction tiles it), or split it into smaller images")


def _hw_from_shape(shape: tuple, path: Path) -> tuple[int, int]:
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    if len(shape) == 3 and shape[-1] in (1, 3, 4):
        return int(shape[0]), int(shape[1])
    if len(shape) == 3 and shape[0] in (1, 3, 4):  # channel-first TIFF
        return int(shape[1]), int(shape[2])
    raise DataError(f"{path}: unsupported image shape {shape}; expected HxW, HxWxC or CxHxW with C in 1/3/4 "
                    "(for stacks, save one 2-D image per file)")


def read_image_array(path: str | os.PathLike) -> np.ndarray:
    """Decode to a numpy array [H,W] or [H,W,C] in the file's own dtype (uint8, uint16, float...).

    Every pixel is decoded inside the try (PIL decodes lazily: `.load()` is explicit, and truncated files are
    refused since ImageFile.LOAD_TRUNCATED_IMAGES stays False), so a corrupt or truncated file raises
    DataError naming it instead of decoding as a partial image or a numpy object array."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile
            array = tifffile.imread(path)
            if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
                array = np.moveaxis(array, 0, -1)
        else:
            from PIL import Image
            with Image.open(path) as im:
                im.load()
                if im.mode == "P":  # palette PNGs: expand to real colours
                    im = im.convert("RGB")
                array = np.array(im)
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct_error,
            zlib_error) as e:
        if _is_data_error(e):
            raise
        raise _unreadable(path, e, "decode the image") from None
    except Exception as e:  # noqa: BLE001 - PIL.Image.DecompressionBombError derives from Exception only
        raise _too_large(path, e) if _is_decompression_bomb(e) else e
    if array.dtype == object:  # numpy's fallback when PIL's array interface failed
        raise _unreadable(path, OSError("no pixel array"), "decode the image")
    _hw_from_shape(array.shape, path)
    return array


def to_float_rgb(array: np.ndarray, normalize: str = "dtype") -> torch.Tensor:
    """Numpy image [H,W] / [H,W,C] of any dtype -> float32 tensor [3,H,W] in [0,1] (grey is repeated,
    alpha dropped)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if array.ndim == 3:
        array = array[..., :3] if array.shape[-1] >= 3 else array[..., 0]
    values = array.astype(np.float32)
    if normalize == "percentile":
        lo, hi = np.percentile(values, (1.0, 99.8))
        values = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    elif np.issubdtype(array.dtype, np.integer):
        values /= float(np.iinfo(array.dtype).max)
    elif array.dtype == bool:
        pass
    elif values.size and (values.min() < 0.0 or values.max() > 1.0):
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / max(hi - lo, 1e-6)
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    if tensor.ndim == 2:
        return tensor.unsqueeze(0).expand(3, -1, -1).contiguous()
    return tensor.permute(2, 0, 1).contiguous()


def read_image(path: str | os.PathLike, normalize: str = "dtype") -> torch.Tensor:
    """File -> float32 tensor [3,H,W] in [0,1], RGB."""
    return to_float_rgb(read_image_array(path), normalize)
