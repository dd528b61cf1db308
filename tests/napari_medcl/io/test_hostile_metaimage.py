"""Hostile and broken inputs, MetaImage (.mha, .mhd): each is refused with a one-line InputError naming the file,
or read with the documented result (docs/reliability.md, "Inputs"). The files are built in hostile_files.py.
"""

from __future__ import annotations

import os
import zlib

import pytest
from hostile_files import Refused, check_refused, metaimage, write

from napari_medcl.errors import InputError
from napari_medcl.io import read_image

REFUSED = Refused()
refuse = REFUSED.add


@refuse
def mha_scaled_direction(tmp):
    data = metaimage("TransformMatrix = 2 0 0 0 1 0 0 0 1\n", bytes(60))
    return write(tmp / "a.mha", data), "direction matrix columns have lengths [2., 1., 1.], not 1"


@refuse
def mha_singular_direction(tmp):
    data = metaimage("TransformMatrix = 1 0 0 1 0 0 0 0 1\n", bytes(60))
    return write(tmp / "a.mha", data), "is singular: two image axes are parallel"


# 5. (MetaImage, NRRD) zero or unknown spacing
@refuse
def mha_zero_spacing(tmp):
    return write(tmp / "a.mha", metaimage("ElementSpacing = 0 1 1\n", bytes(60))), "ElementSpacing is zero"


@refuse
def mha_nan_spacing(tmp):
    data = metaimage("ElementSpacing = nan 1 1\n", bytes(60))
    return write(tmp / "a.mha", data), "ElementSpacing must be 3 finite numbers"


@refuse
def mha_infinite_origin(tmp):
    return write(tmp / "a.mha", metaimage("Offset = inf 0 0\n", bytes(60))), "Offset must be 3 finite numbers"


@refuse
def mha_declares_17_gb_of_channels(tmp):
    data = metaimage("ElementNumberOfChannels = 1431655765\n", bytes(60), dims="4 3 1", etype="MET_FLOAT")
    return write(tmp / "a.mha", data), "with 1431655765 components"


@refuse
def mha_compressed_block_declaring_1_gb(tmp):
    block = zlib.compress(bytes(1000))
    data = metaimage(
        f"CompressedData = True\nCompressedDataSize = {len(block)}\n", block, dims="1000 1000 1000"
    )
    return write(
        tmp / "a.mha", data
    ), "compressed voxel data hold 1,000 bytes, the header declares 1,000,000,000"


@refuse
def mha_empty_dimension(tmp):
    return write(tmp / "a.mha", metaimage("", bytes(60), dims="5 0 3")), "DimSize must be positive integers"


@refuse
def mha_ndims_above_ten(tmp):
    # MetaIO keeps DimSize in a fixed array of 10: refused before MetaIO parses it
    data = metaimage("", bytes(60), ndims=11, dims=" ".join(["1"] * 11))
    return write(tmp / "a.mha", data), "NDims is 11: only 2D and 3D images are supported"


@refuse
def mha_dimsize_count_wrong(tmp):
    return write(tmp / "a.mha", metaimage("", bytes(60), dims="5 4")), "DimSize must be 3 finite numbers"


@refuse
def mha_overlong_line(tmp):
    return write(tmp / "a.mha", metaimage("Comment = " + "x" * 600 + "\n", bytes(60))), "header line 5 is not"


@refuse
def mha_binary_in_header(tmp):
    return write(tmp / "a.mha", metaimage("Comment = a\0b\n", bytes(60))), "header line 5 is not"


@refuse
def mha_repeated_key(tmp):
    return write(tmp / "a.mha", metaimage("NDims = 2\n", bytes(60))), "header repeats NDims"


@refuse
def mha_unknown_element_type(tmp):
    return write(
        tmp / "a.mha", metaimage("", bytes(60), etype="MET_FOO")
    ), "ElementType 'MET_FOO' is not supported"


@refuse
def mha_without_element_data_file(tmp):
    data = b"ObjectType = Image\nNDims = 3\nDimSize = 5 4 3\nElementType = MET_UCHAR\n"
    return write(tmp / "a.mha", data), "header has no ElementDataFile line"


@refuse
def mha_not_an_image(tmp):
    data = metaimage("", bytes(60)).replace(b"ObjectType = Image", b"ObjectType = Tube")
    return write(tmp / "a.mha", data), "ObjectType is 'Tube', not Image"


# 18. MetaImage ElementDataFile
@refuse
def mhd_data_file_missing(tmp):
    data = metaimage("ElementDataFile = scan.raw\n")
    return write(tmp / "scan.mhd", data), "the data file scan.raw (named by ElementDataFile) does not exist"


@refuse
def mhd_data_file_dotdot(tmp):
    write(tmp / "secret.raw", bytes(60))
    data = metaimage("ElementDataFile = ../secret.raw\n")
    return write(
        tmp / "in" / "scan.mhd", data
    ), "ElementDataFile (../secret.raw) leads out of the header's folder"


@refuse
def mhd_data_file_dotdot_with_colon_separator(tmp):
    # MetaIO accepts "Key: value" as well as "Key = value"
    write(tmp / "secret.raw", bytes(60))
    data = metaimage("ElementDataFile: ../secret.raw\n")
    return write(tmp / "in" / "scan.mhd", data), "leads out of the header's folder with '..'"


@refuse
def mhd_data_file_dotdot_inside_subfolder_path(tmp):
    write(tmp / "secret.raw", bytes(60))
    data = metaimage("ElementDataFile = sub/../../secret.raw\n")
    return write(tmp / "in" / "scan.mhd", data), "leads out of the header's folder with '..'"


@refuse
def mhd_data_file_absolute(tmp):
    secret = write(tmp / "secret.raw", bytes(60))
    data = metaimage(f"ElementDataFile = {secret}\n")
    return write(tmp / "in" / "scan.mhd", data), "ElementDataFile names an absolute path"


@refuse
def mhd_data_file_link_leading_out(tmp):
    secret = write(tmp / "secret.raw", bytes(60))
    (tmp / "in").mkdir()
    os.symlink(secret, tmp / "in" / "scan.raw")
    data = metaimage("ElementDataFile = scan.raw\n")
    return write(tmp / "in" / "scan.mhd", data), "is a link to a file outside the header's folder"


@refuse
def mhd_data_file_link_loop(tmp):
    (tmp / "in").mkdir()
    os.symlink(tmp / "in" / "scan.raw", tmp / "in" / "scan.raw")
    data = metaimage("ElementDataFile = scan.raw\n")
    return write(tmp / "in" / "scan.mhd", data), "cannot be opened"


@refuse
def mhd_data_file_is_a_folder(tmp):
    (tmp / "scan.raw").mkdir()
    return write(tmp / "scan.mhd", metaimage("ElementDataFile = scan.raw\n")), "is not a regular file"


@refuse
def mha_local_header_pointing_outside(tmp):
    write(tmp / "secret.raw", bytes(60))
    data = metaimage("ElementDataFile = ../secret.raw\n")
    return write(tmp / "in" / "scan.mha", data), "leads out of the header's folder"


@refuse
def mhd_data_file_shorter_than_declared(tmp):
    write(tmp / "scan.raw", bytes(59))
    data = metaimage("ElementDataFile = scan.raw\n")
    return write(tmp / "scan.mhd", data), "header declares 60 bytes of voxel data, 59 are present"


@refuse
def mhd_data_file_list(tmp):
    write(tmp / "a.raw", bytes(20))
    data = metaimage("ElementDataFile = LIST\n", b"a.raw\na.raw\na.raw\n")
    return write(tmp / "scan.mhd", data), "multi-file data (ElementDataFile = LIST) is not supported"


@refuse
def mhd_data_file_pattern(tmp):
    data = metaimage("ElementDataFile = slice%03d.raw 1 3 1\n")
    return write(tmp / "scan.mhd", data), "multi-file data (ElementDataFile = slice%03d.raw 1 3 1)"


# 15. 4D, 2-channel PNG, differently sized TIFF pages
@refuse
def mha_4d(tmp):
    return write(tmp / "a.mha", metaimage("", bytes(120), ndims=4, dims="5 4 3 2")), "4D images (time series)"


def test_refused_before_the_data_file_is_opened(tmp_path, monkeypatch):
    """A header naming a file outside its folder is refused before SimpleITK is even asked."""
    from napari_medcl.io import reading

    write(tmp_path / "secret.raw", bytes(60))
    path = write(tmp_path / "in" / "scan.mhd", metaimage("ElementDataFile = ../secret.raw\n"))
    monkeypatch.setattr(reading, "load_sitk", lambda: pytest.fail("SimpleITK reached"))
    with pytest.raises(InputError, match="leads out of the header's folder"):
        read_image(path)


def test_mhd_data_file_in_a_subfolder_and_header_size(tmp_path):
    """18. A data file below the header's folder is fine; HeaderSize = -1 takes the last bytes."""
    write(tmp_path / "data" / "scan.raw", b"junk header" + bytes(range(60)))
    path = write(tmp_path / "scan.mhd", metaimage("HeaderSize = -1\nElementDataFile = data/scan.raw\n"))
    volume = read_image(path)
    assert volume.array.ravel().tolist() == list(range(60))


def test_metaimage_syntax_variants_metaio_accepts(tmp_path):
    """MetaIO also accepts "Key: value", CRLF line ends and blank lines: so do we (same result)."""
    data = b"ObjectType: Image\r\nNDims = 3\r\n\r\nDimSize = 5 4 3\r\nElementType = MET_UCHAR\r\n"
    data += b"ElementSpacing = 1e-1 .5 2.\r\nElementDataFile = LOCAL\r\n" + bytes(range(60))
    volume = read_image(write(tmp_path / "a.mha", data))
    assert volume.spacing == pytest.approx((2.0, 0.5, 0.1)) and volume.array.ravel()[59] == 59


@pytest.mark.parametrize("make", REFUSED, ids=[f.__name__ for f in REFUSED])
def test_refused(tmp_path, capfd, make):
    check_refused(tmp_path, capfd, make)
