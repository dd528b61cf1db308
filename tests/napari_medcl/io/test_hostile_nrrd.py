"""Hostile and broken inputs, NRRD (.nrrd, .nhdr): each is refused with a one-line InputError naming the file,
or read with the documented result (docs/reliability.md, "Inputs"). The files are built in hostile_files.py.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
from hostile_files import Refused, check_refused, nrrd, physical, write

from napari_medcl.io import read_image, write_image

REFUSED = Refused()
refuse = REFUSED.add


@refuse
def nrrd_zero_space_direction(tmp):
    fields = "space: left-posterior-superior\nspace directions: (0,0,0) (0,1,0) (0,0,1)\n"
    return write(tmp / "a.nrrd", nrrd(fields, bytes(60))), "voxel spacing [0., 1., 1.]: zero or not a number"


@refuse
def nrrd_nan_spacing(tmp):
    return write(tmp / "a.nrrd", nrrd("spacings: nan 1 1\n", bytes(60))), "spacing of axis 0 is nan"


@refuse
def nrrd_zero_spacing(tmp):
    return write(tmp / "a.nrrd", nrrd("spacings: 1 0 1\n", bytes(60))), "spacing of axis 1 is 0"


@refuse
def nrrd_declares_a_petavoxel(tmp):
    return write(
        tmp / "a.nrrd", nrrd("", bytes(60), sizes="100000 100000 100000")
    ), "1,000,000,000,000,000 values"


@refuse
def nrrd_gzip_block_declaring_1_gb(tmp):
    data = nrrd("", gzip.compress(bytes(1000)), sizes="1000 1000 1000", encoding="gzip")
    return write(
        tmp / "a.nrrd", data
    ), "compressed voxel data hold 1,000 bytes, the header declares 1,000,000,000"


@refuse
def nrrd_gzip_block_corrupt(tmp):
    block = bytearray(gzip.compress(bytes(range(60))))
    block[12:20] = b"\xff" * 8
    return write(tmp / "a.nrrd", nrrd("", bytes(block), encoding="gzip")), "corrupt compressed voxel data"


# 19. Detached NRRD
@refuse
def nhdr_data_file_dotdot(tmp):
    write(tmp / "secret.raw", bytes(60))
    data = nrrd("data file: ../secret.raw\n", None)
    return write(tmp / "in" / "scan.nhdr", data), "data file (../secret.raw) leads out of the header's folder"


@refuse
def nhdr_datafile_spelling_and_case(tmp):
    write(tmp / "secret.raw", bytes(60))
    data = nrrd("DataFile: ../secret.raw\n", None)  # NrrdIO: case-insensitive, space optional
    return write(tmp / "in" / "scan.nhdr", data), "leads out of the header's folder"


@refuse
def nhdr_data_file_absolute(tmp):
    secret = write(tmp / "secret.raw", bytes(60))
    return write(tmp / "in" / "scan.nhdr", nrrd(f"data file: {secret}\n", None)), "names an absolute path"


@refuse
def nhdr_data_file_link_leading_out(tmp):
    secret = write(tmp / "secret.raw", bytes(60))
    (tmp / "in").mkdir()
    os.symlink(secret, tmp / "in" / "scan.raw")
    return write(tmp / "in" / "scan.nhdr", nrrd("data file: scan.raw\n", None)), "outside the header's folder"


@refuse
def nrrd_attached_header_naming_a_data_file_outside(tmp):
    write(tmp / "secret.raw", bytes(60))
    return write(tmp / "in" / "scan.nrrd", nrrd("data file: ../secret.raw\n", b"")), "leads out of the header"


@refuse
def nhdr_data_file_missing(tmp):
    return write(tmp / "scan.nhdr", nrrd("data file: scan.raw\n", None)), "the data file scan.raw"


@refuse
def nhdr_data_file_shorter_than_declared(tmp):
    write(tmp / "scan.raw", bytes(30))
    data = nrrd("data file: scan.raw\n", None)
    return write(tmp / "scan.nhdr", data), "header declares 60 bytes of voxel data, 30 are present"


@refuse
def nhdr_data_file_list(tmp):
    write(tmp / "a.raw", bytes(20))
    data = nrrd("data file: LIST\n", None) + b"a.raw\na.raw\na.raw\n"
    return write(tmp / "scan.nhdr", data), "multi-file data (data file: LIST) is not supported"


@refuse
def nhdr_data_file_pattern(tmp):
    return write(tmp / "scan.nhdr", nrrd("data file: s%03d.raw 1 3 1\n", None)), "multi-file data"


@refuse
def nrrd_bzip2_encoding(tmp):
    data = nrrd("", b"BZh9", encoding="bzip2")
    return write(tmp / "a.nrrd", data), "bzip2 encoding is not supported (ITK's NrrdIO lacks it)"


@refuse
def nrrd_unknown_encoding(tmp):
    return write(tmp / "a.nrrd", nrrd("", bytes(60), encoding="zstd")), 'couldn\'t parse encoding "zstd"'


@refuse
def nrrd_attached_data_truncated(tmp):
    return write(
        tmp / "a.nrrd", nrrd("", bytes(30))
    ), "header declares 60 bytes of voxel data, 30 are present"


@refuse
def nrrd_sizes_count_wrong(tmp):
    return write(
        tmp / "a.nrrd", nrrd("", bytes(60), sizes="5 4 3").replace(b"sizes: 5 4 3", b"sizes: 5 4")
    ), ("sizes must be 3 positive integers")


def test_nrrd_ras_space_becomes_lps(tmp_path):
    """8. A NRRD in right-anterior-superior space with permuted, flipped space directions: every voxel lands
    where the header says, with x and y negated for LPS and the axes reversed into array order."""
    fields = (
        "space: right-anterior-superior\nspace directions: (0,0.5,0) (0,0,-2) (-0.7,0,0)\n"
        "space origin: (10,-20,30)\n"
    )
    volume = read_image(write(tmp_path / "a.nrrd", nrrd(fields, bytes(range(60)))))
    directions = np.array([[0, 0.5, 0], [0, 0, -2], [-0.7, 0, 0]]).T  # columns: axes i, j, k in RAS
    for i, j, k in [(0, 0, 0), (4, 3, 2), (1, 0, 2)]:
        lps = (np.array([10.0, -20.0, 30.0]) + directions @ [i, j, k]) * [-1, -1, 1]
        np.testing.assert_allclose(physical(volume, (k, j, i)), lps[::-1], atol=1e-9)
        assert volume.array[k, j, i] == i + 5 * j + 20 * k


def test_sheared_nrrd_keeps_its_shear(tmp_path):
    """7. Policy: a non-orthogonal direction with unit columns is read and kept as it is (MHA/NRRD store it;
    writing it to NIfTI is refused, test_io.py::test_sheared_direction_is_refused_where...)."""
    fields = "space: left-posterior-superior\nspace directions: (1,0,0) (0.5,1,0) (0,0,1)\n"
    volume = read_image(write(tmp_path / "a.nrrd", nrrd(fields, bytes(60))))
    np.testing.assert_allclose(physical(volume, (0, 1, 0)), [0.0, 1.0, 0.5])  # (z, y, x) of (0.5, 1, 0)
    again = read_image(write_image(volume, tmp_path / "b.mha"))
    np.testing.assert_allclose(again.direction, volume.direction, atol=1e-12)


def test_nhdr_data_file_and_encodings(tmp_path):
    """19. Detached NRRD with raw, gzip, ascii and hex data in the header's folder: read."""
    values = bytes(range(60))
    cases = {"raw": values, "gzip": gzip.compress(values), "ascii": " ".join(map(str, values)).encode()}
    cases["hex"] = values.hex().encode()
    for encoding, data in cases.items():
        write(tmp_path / f"{encoding}.dat", data)
        path = write(
            tmp_path / f"{encoding}.nhdr", nrrd(f"data file: {encoding}.dat\n", None, encoding=encoding)
        )
        assert read_image(path).array.ravel().tolist() == list(range(60)), encoding


@pytest.mark.parametrize("make", REFUSED, ids=[f.__name__ for f in REFUSED])
def test_refused(tmp_path, capfd, make):
    check_refused(tmp_path, capfd, make)
