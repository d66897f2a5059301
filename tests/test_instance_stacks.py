"""gains.instance_stacks: one binary page / PNG per instance (overlaps kept); pages of another size, colour or
several values are one-line errors naming the file and the page."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from gains.annotations import DataError
from gains.instance_stacks import dsb2018_items, read_instance_stack, read_mask_pngs


def overlapping_pages(h: int = 20, w: int = 30) -> np.ndarray:
    pages = np.zeros((3, h, w), np.uint8)
    pages[0, 2:12, 2:14] = 255
    pages[1, 6:18, 8:20] = 255          # overlaps page 0
    pages[2, 1:4, 22:29] = 1            # any non-zero value is the instance
    return pages


@pytest.mark.parametrize("options", [{}, {"imagej": True}, {"photometric": "minisblack"}])
def test_stack_pages_become_overlapping_masks(tmp_path, options):
    """Plain tifffile (3 pages -> one RGB page: its samples), ImageJ and minisblack stacks alike."""
    pages = overlapping_pages()
    tifffile.imwrite(tmp_path / "s.tif", pages, **options)
    masks = read_instance_stack(tmp_path / "s.tif", 20, 30)
    np.testing.assert_array_equal(masks.dense(), pages > 0)
    six = np.concatenate([pages, pages[::-1]])
    tifffile.imwrite(tmp_path / "six.tif", six, **options)  # more pages than colour samples
    np.testing.assert_array_equal(read_instance_stack(tmp_path / "six.tif", 20, 30).dense(), six > 0)


def test_empty_pages_are_dropped_with_a_counted_warning(tmp_path):
    pages = np.concatenate([overlapping_pages(), np.zeros((1, 20, 30), np.uint8)])
    tifffile.imwrite(tmp_path / "s.tif", pages, photometric="minisblack")
    with pytest.warns(UserWarning, match=r"s\.tif: 1 empty page\(s\) dropped \(page 4\)"):
        assert len(read_instance_stack(tmp_path / "s.tif", 20, 30)) == 3
    tifffile.imwrite(tmp_path / "t.tif", pages[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_instance_stack(tmp_path / "t.tif", 20, 30)


def test_bad_stacks_are_one_line_errors_naming_file_and_page(tmp_path):
    with tifffile.TiffWriter(tmp_path / "sizes.tif") as tif:  # pages of different sizes
        tif.write(np.ones((20, 30), np.uint8))
        tif.write(np.ones((10, 30), np.uint8))
    with pytest.raises(DataError, match=r"sizes\.tif: page 2: 10x30 \(HxW\) but the image is 20x30") as err:
        read_instance_stack(tmp_path / "sizes.tif", 20, 30)
    assert "\n" not in str(err.value)
    labels = overlapping_pages()
    labels[1, 0, 0] = 7
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    with pytest.raises(DataError, match=r"labels\.tif: page 2: 2 different non-zero values.*--from-labels"):
        read_instance_stack(tmp_path / "labels.tif", 20, 30)
    (tmp_path / "junk.tif").write_bytes(b"II*\0 not really")
    with pytest.raises(DataError, match=r"junk\.tif: cannot read the TIFF stack"):
        read_instance_stack(tmp_path / "junk.tif", 20, 30)


def write_dsb_sample(root, sample: str, pages: np.ndarray, rgba: bool = True) -> None:
    (root / sample / "images").mkdir(parents=True)
    (root / sample / "masks").mkdir()
    image = np.full(pages.shape[1:] + (4,), 255, np.uint8) if rgba else np.zeros(pages.shape[1:], np.uint8)
    Image.fromarray(image).save(root / sample / "images" / f"{sample}.png")
    for k, page in enumerate(pages):
        Image.fromarray(page).save(root / sample / "masks" / f"m{k:02d}.png")


def test_dsb2018_layout(tmp_path):
    write_dsb_sample(tmp_path, "b2", overlapping_pages())
    write_dsb_sample(tmp_path, "a1", overlapping_pages()[:1])
    (tmp_path / "notes").mkdir()  # a folder without images/ is not a sample
    items = dsb2018_items(tmp_path)
    assert [(i.name, [m.name for m in ms]) for i, ms in items] == [("a1.png", ["m00.png"]),
                                                                    ("b2.png", ["m00.png", "m01.png", "m02.png"])]
    np.testing.assert_array_equal(read_mask_pngs(items[1][1], 20, 30).dense(), overlapping_pages() > 0)
    Image.fromarray((np.zeros((20, 30, 3)) + [0, 255, 0]).astype(np.uint8)).save(tmp_path / "b2" / "masks" / "m03.png")
    with pytest.raises(DataError, match=r"b2/masks: m03\.png: a colour image"):
        read_mask_pngs(dsb2018_items(tmp_path)[1][1], 20, 30)
    (tmp_path / "a1" / "images" / "extra.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"a1/images: 2 files; the DSB2018 layout has exactly one image"):
        dsb2018_items(tmp_path)
