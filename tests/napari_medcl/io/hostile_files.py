"""Builders of hostile and broken input files for the ``test_hostile_*.py`` corpus (reliability.md §5.1
items 1-24), and the check every refused case passes.

Every file is built here: NIfTI, MetaImage, NRRD, PNG and TIFF from raw bytes where the header matters, DICOM
with pydicom, the rest with SimpleITK. Cases already pinned in test_io.py are not repeated.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from napari_medcl.errors import InputError
from napari_medcl.io import read_image
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


def physical(volume: Volume, index) -> np.ndarray:
    return np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * np.asarray(index))


class Refused(list):
    """Builders (tmp_path -> (path, expected message part)) of refused cases; ``refuse = REFUSED.add``."""

    def add(self, make):
        """Mark a builder as a refused case."""
        self.append(make)
        return make


def check_refused(tmp_path, capfd, make):
    """The case is refused with one line naming the file, nothing on stderr, nothing written."""
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
