"""Hostile and broken inputs, PNG and TIFF: each is refused with a one-line InputError naming the file,
or read with the documented result (docs/reliability.md, "Inputs"). The files are built in hostile_files.py.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hostile_files import Refused, check_refused, patched, png, scanner_nifti, tiff, write

from napari_medcl.io import read_image

REFUSED = Refused()
refuse = REFUSED.add


@refuse
def tiff_pages_of_different_sizes(tmp):
    pages = [np.zeros((4, 5)), np.zeros((4, 5)), np.zeros((2, 3))]  # a thumbnail as the last page
    return write(tmp / "a.tif", tiff(pages)), "page 3 is 3 x 2 with 1 sample(s) of 8 bits but page 1 is 5 x 4"


@refuse
def tiff_page_chain_loop(tmp):
    # SimpleITK 2.5 / ITK 5.4 hangs for ever on this file: it must never reach ITK
    data = bytearray(tiff([np.zeros((4, 5)), np.zeros((4, 5))]))
    first = struct.unpack_from("<I", data, 4)[0]
    count = struct.unpack_from("<H", data, first)[0]
    struct.pack_into("<I", data, first + 2 + 12 * count, first)  # page 1 points back to itself
    return write(tmp / "a.tif", bytes(data)), "outside the file or in a loop"


@refuse
def png_gray_alpha(tmp):
    rows = [bytes([10, 255] * 5)] * 4
    return write(tmp / "a.png", png(5, 4, 4, 8, rows)), "cannot be read as .png"


def test_rgba_png_and_rgb_nifti_become_channels(tmp_path):
    """15. RGBA PNG: 4 channels; NIfTI RGB24: 3 channels, channels first."""
    rgba = np.arange(4 * 5 * 4, dtype=np.uint8).reshape(4, 5, 4)
    volume = read_image(write(tmp_path / "a.png", png(5, 4, 6, 8, [row.tobytes() for row in rgba])))
    assert volume.channel_axis and np.array_equal(volume.array, np.moveaxis(rgba, -1, 0))
    data = patched(patched(scanner_nifti(), "datatype", 128), "bitpix", 24)
    data = data[:352] + np.arange(3 * 60, dtype=np.uint8).tobytes()
    volume = read_image(write(tmp_path / "rgb.nii", data))
    assert volume.channel_axis and volume.array.shape == (3, 3, 4, 5)
    assert np.array_equal(
        volume.array, np.moveaxis(np.arange(180, dtype=np.uint8).reshape(3, 4, 5, 3), -1, 0)
    )


def test_palette_png_is_expanded_to_rgb(tmp_path):
    """15. Palette PNG: ITK expands the palette, giving 3 channels (not the indices)."""
    palette = bytes(v for i in range(256) for v in (i, 255 - i, 7))
    indices = np.arange(20, dtype=np.uint8).reshape(4, 5)
    volume = read_image(write(tmp_path / "p.png", png(5, 4, 3, 8, [r.tobytes() for r in indices], palette)))
    assert volume.channel_axis and volume.array.shape == (3, 4, 5)
    np.testing.assert_array_equal(volume.array[0], indices)
    np.testing.assert_array_equal(volume.array[1], 255 - indices)


def test_one_bit_png_reads_as_0_and_255(tmp_path):
    """15. A 1-bit PNG mask reads as uint8 0/255 (libpng expands the bit depth): documented, not labels 0/1."""
    rows = [bytes([0b10100000])] * 4
    volume = read_image(write(tmp_path / "m.png", png(3, 4, 0, 1, rows)))
    np.testing.assert_array_equal(volume.array, [[255, 0, 255]] * 4)


def test_sixteen_bit_png(tmp_path):
    rows = [np.array([0, 1000, 65535], ">u2").tobytes()] * 2
    volume = read_image(write(tmp_path / "a.png", png(3, 2, 0, 16, rows)))
    assert volume.array.dtype == np.uint16
    np.testing.assert_array_equal(volume.array, [[0, 1000, 65535]] * 2)


def test_tiff_spacing(tmp_path):
    """16. TIFF without resolution tags: spacing 1; with them (per cm): the pixel size in mm."""
    page = np.arange(20).reshape(4, 5)
    assert read_image(write(tmp_path / "a.tif", tiff([page]))).spacing == (1.0, 1.0)
    volume = read_image(write(tmp_path / "b.tif", tiff([page], resolution=(100.0, 50.0))))
    assert volume.spacing == pytest.approx((0.2, 0.1))  # (y, x): 50 and 100 pixels per cm
    stack = read_image(write(tmp_path / "c.tif", tiff([page, page + 1, page + 2])))
    assert stack.array.shape == (3, 4, 5) and np.array_equal(stack.array[2], page + 2)


@pytest.mark.parametrize("make", REFUSED, ids=[f.__name__ for f in REFUSED])
def test_refused(tmp_path, capfd, make):
    check_refused(tmp_path, capfd, make)
