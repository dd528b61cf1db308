"""Hostile and broken inputs, DICOM series: each is refused with a one-line InputError naming the file,
or read with the documented result (docs/reliability.md, "Inputs"). The files are built in hostile_files.py.
"""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pydicom
import pytest
from hostile_files import SERIES, Refused, check_refused, dicom_series, dicom_slice
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from napari_medcl.io import read_image

REFUSED = Refused()
refuse = REFUSED.add


# 20-22. DICOM series
@refuse
def dicom_duplicated_slice(tmp):
    folder = dicom_series(tmp / "ct")
    shutil.copy(folder / "s002.dcm", folder / "s002_copy.dcm")
    return folder, "slices are not evenly spaced: 0 mm between s002.dcm and s002_copy.dcm"


@refuse
def dicom_two_slices_at_one_position(tmp):
    folder = dicom_series(tmp / "ct", position=lambda k: (0.0, 0.0, 2.0 * min(k, 3)))
    return folder, "slices are not evenly spaced: 0 mm between s003.dcm and s004.dcm"


@refuse
def dicom_non_uniform_spacing(tmp):
    folder = dicom_series(tmp / "ct", position=lambda k: (0.0, 0.0, [0, 2, 4, 7, 9][k]))
    return folder, "slices are not evenly spaced: 3 mm between s002.dcm and s003.dcm, 2 mm typically"


@refuse
def dicom_gantry_tilt(tmp):
    folder = dicom_series(tmp / "ct", position=lambda k: (0.0, 0.5 * k, 2.0 * k))  # 14 degrees
    return folder, "slices drift sideways (2 mm from s000.dcm to s004.dcm, a gantry tilt of about 14 degrees)"


@refuse
def dicom_mixed_orientations(tmp):
    tilted = (1, 0, 0, 0, 0.995004, 0.099833)
    folder = dicom_series(tmp / "ct", orientation=lambda k: tilted if k == 2 else (1, 0, 0, 0, 1, 0))
    return folder, "slices have different orientations: s000.dcm"


@refuse
def dicom_rows_differ(tmp):
    return dicom_series(tmp / "ct", rows=lambda k: 6 if k == 2 else 4), "slices differ in size"


@refuse
def dicom_truncated_slice_in_the_middle(tmp):
    folder = dicom_series(tmp / "ct")
    data = (folder / "s002.dcm").read_bytes()
    (folder / "s002.dcm").write_bytes(data[:-20])
    return folder, "s002.dcm is a DICOM file that cannot be read (truncated or corrupt?)"


@refuse
def dicom_truncated_last_slice(tmp):
    # GDCM leaves the file out silently, so ITK would return 4 evenly spaced slices: refused
    folder = dicom_series(tmp / "ct")
    data = (folder / "s004.dcm").read_bytes()
    (folder / "s004.dcm").write_bytes(data[:300])
    return folder, "s004.dcm is a DICOM file that cannot be read"


@refuse
def dicom_folder_with_link_loop(tmp):
    # GDCM silently drops s000.dcm when a link loop sorts after it
    folder = dicom_series(tmp / "ct")
    os.symlink(folder / "zz", folder / "zz")
    return folder, "zz: symbolic link loop; remove it"


@refuse
def dicom_folder_with_broken_link(tmp):
    folder = dicom_series(tmp / "ct")
    os.symlink(folder / "gone.dcm", folder / "a.dcm")
    return folder, "a.dcm: broken symbolic link (its target does not exist); remove it"


@refuse
def dicom_folder_with_link_to_a_device(tmp):
    folder = dicom_series(tmp / "ct")
    os.symlink("/dev/zero", folder / "zero.dcm")
    return folder, "zero.dcm is a link to a file outside the folder"


@refuse
def dicom_folder_with_pipe(tmp):
    folder = dicom_series(tmp / "ct")
    os.mkfifo(folder / "pipe.dcm")  # opening it would block the reader
    return folder, "pipe.dcm is not a regular file (a device, pipe or socket)"


@refuse
def dicom_folder_with_link_to_another_series_slice(tmp):
    other = dicom_series(tmp / "other", count=1)
    folder = dicom_series(tmp / "ct")
    os.symlink(other / "s000.dcm", folder / "extra.dcm")
    return folder, "extra.dcm is a link to a file outside the folder"


@refuse
def dicom_truncated_sequence_item(tmp):
    folder = dicom_series(tmp / "ct", count=3)
    for k in range(3):
        ds = dicom_slice(k, (0.0, 0.0, 2.0 * k))
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3"
        ds.ReferencedImageSequence = [item]
        ds.save_as(folder / f"s{k:03d}.dcm", enforce_file_format=True)
    data = bytearray((folder / "s001.dcm").read_bytes())
    at = data.find(b"\x08\x00\x40\x11SQ")  # (0008,1140) SQ: its length now runs past the end of the file
    struct.pack_into("<I", data, at + 8, 0x7FFF0000)
    (folder / "s001.dcm").write_bytes(bytes(data))
    return folder, "s001.dcm is a DICOM file that cannot be read"


@refuse
def dicom_jpeg_syntax_with_garbage_data(tmp):
    # GDCM's folder scan itself throws on it (not only the pixel decoding)
    folder = tmp / "ct"
    folder.mkdir()
    for k in range(2):
        ds = dicom_slice(k, (0.0, 0.0, 2.0 * k))
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG baseline
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0not a jpeg" * 4])
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / f"s{k}.dcm", enforce_file_format=True)
    return folder, "GDCM cannot scan the DICOM files (a corrupt file?)"


@refuse
def dicom_compressed_without_decoder(tmp):
    folder = tmp / "ct"
    folder.mkdir()
    for k in range(2):
        ds = dicom_slice(k, (0.0, 0.0, 2.0 * k))
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: GDCM has no decoder
        ds.PixelData = encapsulate([bytes(40)])
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / f"s{k}.dcm", enforce_file_format=True)
    return folder, "cannot decode the pixel data (transfer syntax 1.2.840.10008.1.2.4.100)"


@refuse
def dicom_rescale_overflowing_to_inf(tmp):
    return dicom_series(tmp / "ct", count=2, rescale=("1e308", "0")), "NaN/Inf voxels"


def test_dicom_stray_files_are_ignored(tmp_path):
    """21. Notes, a macOS AppleDouble file, a subfolder, and a structured report of another series (no pixel
    data: GDCM lists no series for it) beside a series: ignored."""
    folder = dicom_series(tmp_path / "ct")
    (folder / "notes.txt").write_text("hello")
    (folder / "._s000.dcm").write_bytes(b"\0\x05\x16\x07" + bytes(200))
    (folder / "sub").mkdir()
    report = dicom_slice(0, (0.0, 0.0, 0.0), series=SERIES + ".9")
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    for tag in ("PixelData", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient"):
        delattr(report, tag)
    report.save_as(folder / "report.dcm", enforce_file_format=True)
    volume = read_image(folder)
    assert volume.array.shape == (5, 4, 5) and volume.metadata["files"] == 5


def test_dicom_without_preamble_is_read(tmp_path):
    """22. No 128-byte preamble and no DICM marker (old ACR-NEMA style): GDCM reads it."""
    folder = tmp_path / "ct"
    folder.mkdir()
    for k in range(3):
        pydicom.dcmwrite(folder / f"s{k}.dcm", dicom_slice(k, (0.0, 0.0, 2.0 * k)), enforce_file_format=False)
        assert (folder / f"s{k}.dcm").read_bytes()[128:132] != b"DICM"
    volume = read_image(folder)
    assert volume.array.shape == (3, 4, 5) and volume.spacing == pytest.approx((2.0, 0.5, 0.6))


def test_dicom_polyglot_preamble_is_only_data(tmp_path):
    """22. A preamble holding an executable header (CVE-2019-11687 polyglot) is read past, never run."""
    folder = dicom_series(tmp_path / "ct", count=3)
    for file in folder.iterdir():
        data = bytearray(file.read_bytes())
        data[:4] = b"\x7fELF"
        file.write_bytes(bytes(data))
    assert read_image(folder).array.shape == (3, 4, 5)


def test_dicom_rescale(tmp_path):
    """22. RescaleSlope/Intercept are applied (GDCM): integer slope stays integer, fractional gives float."""
    folder = dicom_series(tmp_path / "ct", count=3, rescale=("0.5", "-1024"))
    volume = read_image(folder)
    assert volume.array.dtype.kind == "f"
    np.testing.assert_allclose(volume.array[1, 0, :3], np.array([100, 101, 102]) * 0.5 - 1024)


def test_dicom_bit_depths(tmp_path):
    """22. BitsAllocated 32: int32; BitsStored 12 of 16 with garbage in the high bits: masked off (GDCM);
    BitsAllocated 12 (packed): unpacked to 16-bit values."""
    wide = dicom_series(tmp_path / "b32", count=2)
    for k, file in enumerate(sorted(wide.iterdir())):
        ds = pydicom.dcmread(file)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
        ds.PixelData = (np.arange(20, dtype=np.int32).reshape(4, 5) * 100_000 + k).tobytes()
        ds.save_as(file, enforce_file_format=True)
    volume = read_image(wide)
    assert volume.array.dtype == np.int32 and volume.array[1, 0, 1] == 100_001
    masked = dicom_series(tmp_path / "b12", count=2)
    for file in masked.iterdir():
        ds = pydicom.dcmread(file)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.PixelData = np.full((4, 5), 0xF00F, "<u2").tobytes()
        ds.save_as(file, enforce_file_format=True)
    assert np.all(read_image(masked).array == 0x00F)
    packed = dicom_series(tmp_path / "p12", count=2)
    for file in packed.iterdir():
        ds = pydicom.dcmread(file)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 12, 12, 11
        ds.PixelData = bytes(30)  # 20 pixels of 12 bits
        ds.save_as(file, enforce_file_format=True)
    volume = read_image(packed)
    assert volume.array.shape == (2, 4, 5) and np.all(volume.array == 0)


def test_dicom_single_slice_and_reversed_order(tmp_path):
    """20. One slice: depth 1 (spacing 1 along z, as ITK says); slices listed top-down: sorted by position."""
    assert read_image(dicom_series(tmp_path / "one", count=1)).array.shape == (1, 4, 5)
    volume = read_image(dicom_series(tmp_path / "down", position=lambda k: (0.0, 0.0, -2.0 * k)))
    assert volume.origin == pytest.approx((-8.0, 0.0, 0.0))
    assert volume.array[0, 0, 0] == 400  # the slice at z = -8 mm is s004


def test_dicom_spacing_within_tolerance_is_read(tmp_path):
    """20. Gaps within 1% of the median (decimal rounding in real series): read, spacing averaged by ITK."""
    folder = dicom_series(tmp_path / "ct", position=lambda k: (0.0, 0.0, [0, 2, 4, 6.01, 8.01][k]))
    assert read_image(folder).spacing[0] == pytest.approx(2.0025)


@pytest.mark.parametrize("make", REFUSED, ids=[f.__name__ for f in REFUSED])
def test_refused(tmp_path, capfd, make):
    check_refused(tmp_path, capfd, make)
