"""Hostile and broken input files (reliability.md §5.1 items 1-24): each is refused with a one-line
InputError naming the file, or read with the documented result (docs/reliability.md, "Inputs").

Every file is built here: NIfTI, MetaImage, NRRD, PNG and TIFF from raw bytes where the header matters, DICOM
with pydicom, the rest with SimpleITK. Cases already pinned in test_io.py are not repeated.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian

from napari_medcl.errors import InputError, InputWarning
from napari_medcl.io import case_name, read_image, write_image
from napari_medcl.volume import Volume

# ---------------------------------------------------------------------------------------------------------
# Builders

NIFTI1 = {  # field: (offset, struct format) in a NIfTI-1 header
    "sizeof_hdr": (0, "i"),
    "dim": (40, "8h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    "pixdim": (76, "8f"),
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    "quatern": (256, "3f"),
    "qoffset": (268, "3f"),
    "srow": (280, "12f"),
    "magic": (344, "4s"),
}
DATATYPES = {np.uint8: (2, 8), np.int16: (4, 16), np.float32: (16, 32), np.float64: (64, 64)}


def nifti1(
    array: np.ndarray,
    *,
    pixdim=(1.0, 1.0, 1.0),
    sform=None,
    qform_code: int = 0,
    sform_code: int = 0,
    quatern=(0.0, 0.0, 0.0),
    qoffset=(0.0, 0.0, 0.0),
    qfac: float = 1.0,
    scl=(0.0, 0.0),
) -> bytes:
    """A single-file NIfTI-1 (little endian) holding ``array`` (z, y, x); ``sform`` is (3, 4) in RAS mm."""
    datatype, bitpix = DATATYPES[array.dtype.type]
    head = bytearray(352)
    nz, ny, nx = array.shape
    fields = {
        "sizeof_hdr": (348,),
        "dim": (3, nx, ny, nz, 1, 1, 1, 1),
        "datatype": (datatype,),
        "bitpix": (bitpix,),
        "pixdim": (qfac, *pixdim, 0, 0, 0, 0),
        "vox_offset": (352.0,),
        "scl_slope": (scl[0],),
        "scl_inter": (scl[1],),
        "qform_code": (qform_code,),
        "sform_code": (sform_code,),
        "quatern": tuple(quatern),
        "qoffset": tuple(qoffset),
        "srow": tuple(np.ravel(np.zeros((3, 4)) if sform is None else sform)),
        "magic": (b"n+1\0",),
    }
    for name, values in fields.items():
        offset, fmt = NIFTI1[name]
        struct.pack_into("<" + fmt, head, offset, *values)
    return bytes(head) + np.ascontiguousarray(array).astype("<" + array.dtype.str[1:]).tobytes()


def patched(data: bytes, field: str, *values) -> bytes:
    offset, fmt = NIFTI1[field]
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, offset, *values)
    return bytes(out)


def ct(shape=(3, 4, 5), dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(shape)) % 251).reshape(shape).astype(dtype)


def scanner_nifti(**changes) -> bytes:
    """A 5 x 4 x 3 image (x, y, z) at spacing 0.5, 0.6, 2.0 with equal qform and sform (codes 1)."""
    pixdim = changes.pop("pixdim", (0.5, 0.6, 2.0))
    sform = np.hstack([np.diag(pixdim), [[10.0], [20.0], [30.0]]])
    args = {"pixdim": pixdim, "sform": sform, "qform_code": 1, "sform_code": 1, "qoffset": (10.0, 20.0, 30.0)}
    return nifti1(changes.pop("array", ct()), **{**args, **changes})


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def metaimage(fields: str, data: bytes = b"", *, ndims=3, dims="5 4 3", etype="MET_UCHAR") -> bytes:
    """A MetaImage header (``fields`` go before ElementType; they end with ElementDataFile when given)."""
    header = f"ObjectType = Image\nNDims = {ndims}\nDimSize = {dims}\nElementType = {etype}\n{fields}"
    if "ElementDataFile" not in fields:
        header += "ElementDataFile = LOCAL\n"
    return header.encode() + data


def nrrd(fields: str, data: bytes | None = b"", *, sizes="5 4 3", type_="uint8", encoding="raw") -> bytes:
    """A NRRD header; ``data`` None makes a detached header (no blank line, no data)."""
    header = (
        f"NRRD0004\ntype: {type_}\ndimension: {len(sizes.split())}\nsizes: {sizes}\nencoding: {encoding}\n"
    )
    header += fields
    return header.encode() + (b"" if data is None else b"\n" + data)


def png(width: int, height: int, color_type: int, bit_depth: int, rows: list[bytes], palette=b"") -> bytes:
    """A PNG from raw scanlines (filter byte 0 is added here)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + (chunk(b"PLTE", palette) if palette else b"")
    body += chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row for row in rows))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def tiff(pages: list[np.ndarray], resolution: tuple[float, float] | None = None) -> bytes:
    """A little-endian classic TIFF of uint8 grayscale pages (one strip each), optional X/Y resolution in
    pixels per centimetre."""
    out = bytearray(b"II*\0" + struct.pack("<I", 0))
    previous_link = 4
    for page in pages:
        height, width = page.shape
        strip = len(out)
        out += page.astype(np.uint8).tobytes()
        rationals = len(out)
        if resolution:
            out += struct.pack("<IIII", int(resolution[0] * 1000), 1000, int(resolution[1] * 1000), 1000)
        tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, strip)]
        tags += [(277, 3, 1), (278, 4, height), (279, 4, width * height)]
        if resolution:
            tags += [(282, 5, rationals), (283, 5, rationals + 8), (296, 3, 3)]
        if len(out) % 2:
            out += b"\0"
        struct.pack_into("<I", out, previous_link, len(out))
        out += struct.pack("<H", len(tags))
        for tag, kind, value in sorted(tags):
            packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
            out += struct.pack("<HHI", tag, kind, 1) + packed
        previous_link = len(out)
        out += struct.pack("<I", 0)
    return bytes(out)


SERIES = "1.2.826.0.1.3680043.2.1125.77"


def dicom_slice(
    k: int, position, *, orientation=(1, 0, 0, 0, 1, 0), rows=4, cols=5, series=SERIES, rescale=None
):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT image storage
    meta.MediaStorageSOPInstanceUID = f"{series}.{k + 1}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Hostile^Test", "1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = (
        "1.2.826.0.1.3680043.2.1125.7",
        series,
        k + 1,
    )
    ds.ImagePositionPatient = [f"{p:.6f}" for p in position]
    ds.ImageOrientationPatient = [f"{c:.6f}" for c in orientation]
    ds.PixelSpacing, ds.SliceThickness = ["0.5", "0.6"], "2.0"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = (np.arange(rows * cols, dtype=np.int16).reshape(rows, cols) + 100 * k).tobytes()
    return ds


def dicom_series(folder: Path, count: int = 5, position=lambda k: (0.0, 0.0, 2.0 * k), **per_slice) -> Path:
    """``count`` axial slices; ``position(k)`` in mm, keyword values may be functions of k."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        options = {key: value(k) if callable(value) else value for key, value in per_slice.items()}
        dicom_slice(k, position(k), **options).save_as(folder / f"s{k:03d}.dcm", enforce_file_format=True)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Refused inputs: one line naming the file, nothing on stderr


REFUSED: list = []


def refuse(make):
    """Mark a builder (tmp_path -> (path, expected message part)) as a refused case."""
    REFUSED.append(make)
    return make


# 1. NIfTI header corruption
@refuse
def nifti_sizeof_hdr_349(tmp):
    return write(
        tmp / "a.nii", patched(scanner_nifti(), "sizeof_hdr", 349)
    ), "sizeof_hdr is neither 348 nor 540"


@refuse
def nifti_dim0_above_7(tmp):
    data = patched(scanner_nifti(), "dim", 8, 5, 4, 3, 1, 1, 1, 1)
    return write(tmp / "a.nii", data), "dim[0] is 8, must be 1 to 7"


@refuse
def nifti_negative_dim(tmp):
    data = patched(scanner_nifti(), "dim", 3, 5, -4, 3, 1, 1, 1, 1)
    return write(tmp / "a.nii", data), "header declares dimensions (5, -4, 3)"


@refuse
def nifti_zero_dim(tmp):
    data = patched(scanner_nifti(), "dim", 3, 5, 4, 0, 1, 1, 1, 1)
    return write(tmp / "a.nii", data), "header declares dimensions (5, 4, 0)"


@refuse
def nifti_unknown_datatype(tmp):
    return write(tmp / "a.nii", patched(scanner_nifti(), "datatype", 999)), "unknown datatype code 999"


@refuse
def nifti_complex(tmp):
    return write(
        tmp / "a.nii", patched(scanner_nifti(), "datatype", 32)
    ), "complex64 voxels are not supported"


@refuse
def nifti_vox_offset_nan(tmp):
    return write(tmp / "a.nii", patched(scanner_nifti(), "vox_offset", float("nan"))), "vox_offset is nan"


@refuse
def nifti_vox_offset_infinite(tmp):
    # raised OverflowError before (int(inf))
    return write(tmp / "a.nii", patched(scanner_nifti(), "vox_offset", float("inf"))), "vox_offset is inf"


@refuse
def nifti_vox_offset_inside_header(tmp):
    data = patched(scanner_nifti(), "vox_offset", 100.0)
    return write(tmp / "a.nii", data), "voxel offset 100 lies inside the 348-byte header"


@refuse
def nifti_two_file_magic(tmp):
    return write(tmp / "a.nii", patched(scanner_nifti(), "magic", b"ni1\0")), "not a single-file NIfTI"


# 2. Header dims larger than the data
@refuse
def nifti_dims_larger_than_data(tmp):
    data = patched(scanner_nifti(), "dim", 3, 5, 4, 9, 1, 1, 1, 1)
    return write(tmp / "a.nii", data), "header declares 360 bytes of voxel data, 120 are present"


# 5. Zero, negative, NaN pixdim
@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_pixdim_is_refused(tmp_path, value):
    path = write(tmp_path / "a.nii.gz", gzip.compress(scanner_nifti(pixdim=(0.5, value, 2.0))))
    with pytest.raises(InputError, match=rf"pixdim\[2\] \(voxel size\) is {value:g}, must be positive"):
        read_image(path)


# 6. qform and sform
@refuse
def nifti_qform_sform_disagree_itk_uses_sform(tmp):
    sform = np.hstack([np.diag([0.5, 0.6, 2.0]), [[60.0], [20.0], [30.0]]])  # 50 mm off the qform in x
    return write(tmp / "a.nii", scanner_nifti(sform=sform)), "disagree by up to 50 mm"


@refuse
def nifti_qform_sform_disagree_itk_uses_qform(tmp):
    sform = np.hstack([np.diag([0.5, 0.6, 2.0]), [[60.0], [20.0], [30.0]]])
    data = scanner_nifti(sform=sform, sform_code=2)  # aligned-anat sform: ITK takes the qform, FSL the sform
    return write(tmp / "a.nii", data), "ITK would use the qform, FSL and nibabel the sform"


@refuse
def nifti_sheared_sform_and_qform(tmp):
    sform = np.hstack([[[0.5, 0.3, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 2.0]], [[10.0], [20.0], [30.0]]])
    return write(tmp / "a.nii", scanner_nifti(sform=sform)), "ITK would use the qform"


# 7. Non-orthonormal directions
@refuse
def nifti_sheared_sform_only(tmp):
    sform = np.hstack([[[0.5, 0.3, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 2.0]], [[10.0], [20.0], [30.0]]])
    data = scanner_nifti(sform=sform, qform_code=0)
    return write(tmp / "a.nii", data), "ITK only supports orthonormal direction cosines"


@refuse
def nifti_sform_not_finite(tmp):
    sform = np.hstack([np.diag([np.nan, 0.6, 2.0]), [[10.0], [20.0], [30.0]]])
    return write(tmp / "a.nii", scanner_nifti(sform=sform)), "sform (srow_x/y/z) is not finite"


@refuse
def nifti_quaternion_not_finite(tmp):
    return write(tmp / "a.nii", scanner_nifti(quatern=(np.nan, 0, 0))), "qform quaternion (nan, 0.0, 0.0)"


@refuse
def nifti_quaternion_longer_than_one(tmp):
    return write(tmp / "a.nii", scanner_nifti(quatern=(0.8, 0.8, 0.0))), "b^2 + c^2 + d^2 = 1.28 > 1"


@refuse
def mha_scaled_direction(tmp):
    data = metaimage("TransformMatrix = 2 0 0 0 1 0 0 0 1\n", bytes(60))
    return write(tmp / "a.mha", data), "direction matrix columns have lengths [2., 1., 1.], not 1"


@refuse
def mha_singular_direction(tmp):
    data = metaimage("TransformMatrix = 1 0 0 1 0 0 0 0 1\n", bytes(60))
    return write(tmp / "a.mha", data), "is singular: two image axes are parallel"


@refuse
def nrrd_zero_space_direction(tmp):
    fields = "space: left-posterior-superior\nspace directions: (0,0,0) (0,1,0) (0,0,1)\n"
    return write(tmp / "a.nrrd", nrrd(fields, bytes(60))), "voxel spacing [0., 1., 1.]: zero or not a number"


# 9. scl_slope / scl_inter
@refuse
def nifti_slope_with_nan_intercept(tmp):
    return write(tmp / "a.nii", scanner_nifti(scl=(2.0, np.nan))), "scl_slope is 2 but scl_inter is nan"


@refuse
def nifti_zero_slope_with_intercept(tmp):
    # the standard and nibabel: no scaling; ITK: slope 1 and the intercept added
    return write(
        tmp / "a.nii", scanner_nifti(scl=(0.0, 5.0))
    ), "scl_slope is 0 (no scaling) but scl_inter is 5"


@refuse
def nifti_nan_slope_with_intercept(tmp):
    return write(tmp / "a.nii", scanner_nifti(scl=(np.nan, -1024.0))), "scl_slope is nan (no scaling)"


@refuse
def nifti_slope_overflowing_to_inf(tmp):
    return write(tmp / "a.nii", scanner_nifti(scl=(1e38, 0.0))), "NaN/Inf voxels"


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
def nrrd_nan_spacing(tmp):
    return write(tmp / "a.nrrd", nrrd("spacings: nan 1 1\n", bytes(60))), "spacing of axis 0 is nan"


@refuse
def nrrd_zero_spacing(tmp):
    return write(tmp / "a.nrrd", nrrd("spacings: 1 0 1\n", bytes(60))), "spacing of axis 1 is 0"


# 17. Volumes above the budget, headers declaring huge volumes
@refuse
def nifti_declares_35_trillion_voxels(tmp):
    data = patched(scanner_nifti(), "dim", 3, 32767, 32767, 32767, 1, 1, 1, 1)
    return write(tmp / "a.nii", data), "= 35,181,150,961,663 values, over the limit"


@refuse
def nrrd_declares_a_petavoxel(tmp):
    return write(
        tmp / "a.nrrd", nrrd("", bytes(60), sizes="100000 100000 100000")
    ), "1,000,000,000,000,000 values"


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


# 15. 4D, 2-channel PNG, differently sized TIFF pages
@refuse
def mha_4d(tmp):
    return write(tmp / "a.mha", metaimage("", bytes(120), ndims=4, dims="5 4 3 2")), "4D images (time series)"


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


@pytest.mark.parametrize("make", REFUSED, ids=[f.__name__ for f in REFUSED])
def test_refused(tmp_path, capfd, make):
    path, expected = make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capfd.readouterr()
    with pytest.raises(InputError) as caught:
        read_image(path)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message and len(message) < 400, message
    assert caught.value.path == path and message.startswith(f"{path}: ")
    assert capfd.readouterr().err == ""  # nothing from ITK, MetaIO, NrrdIO or GDCM either
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_refused_before_the_data_file_is_opened(tmp_path, monkeypatch):
    """A header naming a file outside its folder is refused before SimpleITK is even asked."""
    from napari_medcl.io import reading

    write(tmp_path / "secret.raw", bytes(60))
    path = write(tmp_path / "in" / "scan.mhd", metaimage("ElementDataFile = ../secret.raw\n"))
    monkeypatch.setattr(reading, "load_sitk", lambda: pytest.fail("SimpleITK reached"))
    with pytest.raises(InputError, match="leads out of the header's folder"):
        read_image(path)


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


# ---------------------------------------------------------------------------------------------------------
# Odd but valid inputs: read, with the documented result


def physical(volume: Volume, index) -> np.ndarray:
    return np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * np.asarray(index))


def test_nifti_ras_sform_becomes_lps_array_order(tmp_path):
    """8. A permuted, flipped, oblique RAS sform written byte by byte (no qform): every voxel lands where the
    sform says, with x and y negated for LPS and the axes reversed into array order."""
    rotation = np.linalg.qr(np.random.default_rng(4).normal(size=(3, 3)))[0]
    rotation = rotation[:, [2, 0, 1]] * [1, -1, 1]  # permuted, one axis flipped
    spacing = np.array([0.7, 1.3, 2.9])
    sform = np.hstack([rotation * spacing, [[-12.0], [40.5], [7.25]]])
    volume = read_image(write(tmp_path / "a.nii", nifti1(ct(), pixdim=spacing, sform=sform, sform_code=1)))
    assert np.array_equal(volume.array, ct())
    assert volume.spacing == pytest.approx(spacing[::-1])
    for i, j, k in [(0, 0, 0), (4, 3, 2), (1, 2, 0), (3, 0, 1)]:
        lps = (sform @ [i, j, k, 1.0]) * [-1, -1, 1]
        np.testing.assert_allclose(physical(volume, (k, j, i)), lps[::-1], atol=1e-4)


def test_nifti_qform_rotation_and_qfac(tmp_path):
    """8. A qform only: 90 degrees about z (quaternion d = sin 45 degrees) and qfac -1 (z flipped)."""
    half = np.sqrt(0.5)
    data = nifti1(
        ct(), pixdim=(0.5, 0.6, 2.0), qform_code=1, quatern=(0, 0, half), qoffset=(5, 6, 7), qfac=-1
    )
    volume = read_image(write(tmp_path / "a.nii", data))
    ras_matrix = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]) * [0.5, 0.6, -2.0]
    for i, j, k in [(0, 0, 0), (4, 3, 2), (2, 1, 1)]:
        lps = (ras_matrix @ [i, j, k] + [5, 6, 7]) * [-1, -1, 1]
        np.testing.assert_allclose(physical(volume, (k, j, i)), lps[::-1], atol=1e-5)


@pytest.mark.parametrize(("qform_code", "sform_code"), [(1, 0), (0, 1), (1, 1), (2, 4)])
def test_nifti_only_one_transform_or_both_equal(tmp_path, qform_code, sform_code):
    """6. Only qform, only sform, or both equal (whatever their codes): read, same geometry."""
    data = scanner_nifti(qform_code=qform_code, sform_code=sform_code)
    volume = read_image(write(tmp_path / "a.nii", data))
    assert volume.spacing == pytest.approx((2.0, 0.6, 0.5))
    assert volume.origin == pytest.approx((30.0, -20.0, -10.0))  # RAS (10, 20, 30) in LPS, reversed
    np.testing.assert_allclose(volume.direction, np.diag([1.0, -1.0, -1.0]), atol=1e-7)  # RAS axes in LPS


def test_nifti_without_orientation_warns(tmp_path):
    """6. Both codes 0: ITK's result (origin 0, identity direction, pixdim spacing) with an InputWarning."""
    path = write(tmp_path / "a.nii", scanner_nifti(qform_code=0, sform_code=0))
    with pytest.warns(
        InputWarning, match=r"a\.nii: header declares no orientation \(qform_code = sform_code = 0\)"
    ):
        volume = read_image(path)
    assert volume.spacing == pytest.approx((2.0, 0.6, 0.5)) and volume.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(volume.direction, np.eye(3))


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


def test_nifti_scaling(tmp_path):
    """9. scl_slope 0, NaN or Inf (intercept 0 or NaN): no scaling (NIfTI standard, niftilib, nibabel); a
    slope and intercept: float32 values."""
    for slope, inter in [(0.0, 0.0), (np.nan, 0.0), (np.inf, np.nan), (1.0, 0.0)]:
        volume = read_image(write(tmp_path / "a.nii", scanner_nifti(scl=(slope, inter))))
        assert volume.array.dtype == np.int16 and np.array_equal(volume.array, ct())
    volume = read_image(write(tmp_path / "b.nii", scanner_nifti(scl=(2.0, -1024.0))))
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, ct() * 2.0 - 1024.0)


def test_nifti_bitpix_is_ignored(tmp_path):
    """1. A bitpix disagreeing with the datatype: voxels sized by datatype, as niftilib and nibabel do."""
    volume = read_image(write(tmp_path / "a.nii", patched(scanner_nifti(), "bitpix", 32)))
    assert np.array_equal(volume.array, ct())


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


def test_mhd_data_file_in_a_subfolder_and_header_size(tmp_path):
    """18. A data file below the header's folder is fine; HeaderSize = -1 takes the last bytes."""
    write(tmp_path / "data" / "scan.raw", b"junk header" + bytes(range(60)))
    path = write(tmp_path / "scan.mhd", metaimage("HeaderSize = -1\nElementDataFile = data/scan.raw\n"))
    volume = read_image(path)
    assert volume.array.ravel().tolist() == list(range(60))


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


def test_metaimage_syntax_variants_metaio_accepts(tmp_path):
    """MetaIO also accepts "Key: value", CRLF line ends and blank lines: so do we (same result)."""
    data = b"ObjectType: Image\r\nNDims = 3\r\n\r\nDimSize = 5 4 3\r\nElementType = MET_UCHAR\r\n"
    data += b"ElementSpacing = 1e-1 .5 2.\r\nElementDataFile = LOCAL\r\n" + bytes(range(60))
    volume = read_image(write(tmp_path / "a.mha", data))
    assert volume.spacing == pytest.approx((2.0, 0.5, 0.1)) and volume.array.ravel()[59] == 59


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
