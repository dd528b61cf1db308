"""Hostile and broken inputs, every format, and paths that are not image files: each is refused with a one-line InputError naming the file,
or read with the documented result (docs/reliability.md, "Inputs"). The files are built in hostile_files.py.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hostile_files import (
    Refused,
    check_refused,
    ct,
    dicom_series,
    metaimage,
    nrrd,
    physical,
    scanner_nifti,
    write,
)

from napari_medcl.errors import InputError
from napari_medcl.io import case_name, read_image, write_image
from napari_medcl.volume import Volume

REFUSED = Refused()
refuse = REFUSED.add


# 24. Paths
@refuse
def link_loop(tmp):
    os.symlink(tmp / "loop.nii.gz", tmp / "loop.nii.gz")
    return tmp / "loop.nii.gz", "symbolic link loop"


@refuse
def broken_link(tmp):
    os.symlink(tmp / "gone.nii.gz", tmp / "a.nii.gz")
    return tmp / "a.nii.gz", "broken symbolic link (its target does not exist)"


@refuse
def named_pipe(tmp):
    os.mkfifo(tmp / "a.nii.gz")
    return tmp / "a.nii.gz", "not a regular file (a device, pipe or socket)"


@refuse
def folder_named_like_an_image(tmp):
    (tmp / "scan.nii.gz").mkdir()
    return tmp / "scan.nii.gz", "no DICOM series found in this folder"


def test_unreadable_file_and_data_file(tmp_path):
    """24. A file, or the data file a header names, without read permission: refused by name. Root reads
    anything, so as root the reads run under an unprivileged effective user, in a folder it can enter."""
    root = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="medcl-unreadable-")) if root else tmp_path
    try:
        folder.chmod(0o755)
        image = write(folder / "a.nii.gz", gzip.compress(scanner_nifti()))
        header = write(folder / "b.mhd", metaimage("ElementDataFile = b.raw\n"))
        write(folder / "b.raw", bytes(60)).chmod(0)
        image.chmod(0)
        if root:
            os.seteuid(65534)
        try:
            with pytest.raises(InputError, match=r"a\.nii\.gz: cannot open the file \(Permission denied\)"):
                read_image(image)
            with pytest.raises(InputError, match=r"b\.mhd: the data file b\.raw .* cannot be opened \(Perm"):
                read_image(header)
        finally:
            if root:
                os.seteuid(0)
    finally:
        if root:
            shutil.rmtree(folder)


@pytest.mark.parametrize("spacing", [1e-6, 1e6])
def test_absurd_but_positive_spacing_is_read(tmp_path, spacing):
    """5. Policy: any finite positive spacing is accepted as declared (1e-6 mm and 1e6 mm included)."""
    image = sitk.GetImageFromArray(ct())
    image.SetSpacing((spacing, 1.0, spacing))
    for extension in (".nii.gz", ".nrrd", ".mha"):
        sitk.WriteImage(image, str(tmp_path / f"a{extension}"))
        volume = read_image(tmp_path / f"a{extension}")
        assert volume.spacing == pytest.approx((spacing, 1.0, spacing), rel=1e-6)


def test_negative_spacing_in_nrrd_and_mha_becomes_a_flipped_axis(tmp_path):
    """5. NRRD and MetaImage may declare a negative spacing: ITK flips that axis, so every voxel keeps its
    position (voxel i sits at i x spacing)."""
    for path in (
        write(tmp_path / "a.nrrd", nrrd("spacings: -2 1 1\n", bytes(range(60)))),
        write(tmp_path / "a.mha", metaimage("ElementSpacing = -2 1 1\n", bytes(range(60)))),
    ):
        volume = read_image(path)
        assert volume.spacing == (1.0, 1.0, 2.0)
        np.testing.assert_array_equal(volume.direction, np.diag([1.0, 1.0, -1.0]))
        np.testing.assert_allclose(physical(volume, (0, 0, 3)), [0, 0, -6.0])


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((3, 4, 5), np.int16),
        np.full((3, 4, 5), -1024, np.int16),
        np.pad(np.ones((1, 1, 1), np.float32), 2),  # one non-zero voxel
        np.array([-32768, 32767] * 30, np.int16).reshape(3, 4, 5),
        np.array([1e38, -1e38, 0.0] * 20, np.float64).reshape(3, 4, 5),
        np.array([np.finfo(np.float32).max, np.finfo(np.float32).tiny] * 30, np.float32).reshape(3, 4, 5),
        np.array([0, 255] * 30, np.uint8).reshape(3, 4, 5),
        np.ones((1, 1, 1), np.float32),  # tiny in all axes
        ct((1, 4, 5)),  # one slice
    ],
    ids=[
        "zeros",
        "minus1024",
        "single-voxel",
        "int16-limits",
        "float64-1e38",
        "float32-limits",
        "uint8",
        "1x1x1",
        "1-slice",
    ],
)
def test_constant_extreme_and_tiny_images_round_trip(tmp_path, array):
    """11-13. Constant images, extreme intensities and tiny images read back exactly in every 3D format."""
    volume = Volume(array, (2.0, 0.5, 0.5), (1.0, 2.0, 3.0), np.eye(3))
    for extension in (".nii.gz", ".nrrd", ".mha"):
        read = read_image(write_image(volume, tmp_path / f"a{extension}"))
        assert read.array.dtype == array.dtype and np.array_equal(read.array, array)
        assert np.isfinite(read.array).all()


def test_bool_volume_is_stored_as_uint8(tmp_path):
    """12. bool images: written as uint8 0/1 (no bool voxel type in the formats), read back as uint8."""
    mask = ct() > 100
    read = read_image(write_image(Volume(mask, (1, 1, 1), (0, 0, 0), np.eye(3)), tmp_path / "m.nii.gz"))
    assert read.array.dtype == np.uint8 and np.array_equal(read.array, mask)


def test_unicode_spaces_and_long_names(tmp_path):
    """23. Unicode, spaces and a 200-character name, in every format and for a DICOM folder."""
    volume = Volume(ct(), (2.0, 0.5, 0.5), (1.0, 2.0, 3.0), np.eye(3))
    for extension in (".nii", ".nii.gz", ".nrrd", ".mha"):
        for name in (f"ünï cödé 扫描 {extension[1:]}{extension}", "a" * 200 + extension):
            read = read_image(write_image(volume, tmp_path / name))
            assert np.array_equal(read.array, volume.array) and read.source.name == name
    mhd = write(tmp_path / "dossier été" / "scan ü.mhd", metaimage("ElementDataFile = données ü.raw\n"))
    write(mhd.parent / "données ü.raw", bytes(range(60)))
    assert read_image(mhd).array.ravel()[59] == 59
    folder = dicom_series(tmp_path / "série ü 1", count=2)
    assert read_image(folder).array.shape == (2, 4, 5)


def test_same_case_name_from_nii_and_nii_gz(tmp_path):
    """23. a.nii and a.nii.gz share the case name "a"; the CLI refuses the second input (its outputs would
    overwrite the first's): tests/test_cli.py::test_same_case_name_twice_is_refused_for_the_second."""
    volume = Volume(ct(), (1, 1, 1), (0, 0, 0), np.eye(3))
    first, second = write_image(volume, tmp_path / "a.nii"), write_image(volume, tmp_path / "a.nii.gz")
    assert case_name(first) == case_name(second) == "a"
    assert np.array_equal(read_image(first).array, read_image(second).array)


def test_byte_budget(tmp_path):
    """17. max_bytes counts bytes per value: 60 float64 values = 480 bytes."""
    path = write_image(Volume(ct(dtype=np.float64), (1, 1, 1), (0, 0, 0), np.eye(3)), tmp_path / "a.mha")
    with pytest.raises(
        InputError, match=r"of 8-byte values = 480 bytes, over the limit of 479 \(max_bytes\)"
    ):
        read_image(path, max_bytes=479)
    assert read_image(path, max_bytes=480).array.nbytes == 480
    folder = dicom_series(tmp_path / "ct")
    with pytest.raises(
        InputError, match=r"ct: header declares a 5 x 4 x 5 .* = 200 bytes, over the limit of 199"
    ):
        read_image(folder, max_bytes=199)


@pytest.mark.parametrize("make", REFUSED, ids=[f.__name__ for f in REFUSED])
def test_refused(tmp_path, capfd, make):
    check_refused(tmp_path, capfd, make)
