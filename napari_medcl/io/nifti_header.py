"""NIfTI file checks. ITK's NIfTI reader (niftilib) zero-fills a file shorter than its header declares,
replaces NaN/Inf voxels by 0 (before ITK 6), replaces a zero or NaN pixdim by 1, flips an axis for a
negative one, and picks qform or sform by rules other tools do not share, all silently; so the header is
parsed and the voxel bytes are streamed here first.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import InputError
from napari_medcl.io.header_guard import (
    CHUNK,
    Budget,
    Findings,
    HeaderError,
    check_budget,
    check_length,
    format_numbers,
)

# NIfTI qform and sform both set and further apart than this fraction of the smallest voxel (plus
# _QFORM_ANGLE radians times the distance from voxel 0) anywhere in the volume: ITK and FSL/nibabel would
# place the image differently. The angle allows for the qform's float32 quaternion, which near a 180 degree
# rotation only holds the rotation to about 1e-3 rad (the fuzzer found ITK's own files off by that much).
_XFORM_VOXEL_RTOL = 0.1
_QFORM_ANGLE = 2e-3


@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that decide what ITK reads (NIfTI's RAS+ coordinates)."""

    dims: tuple[int, ...]  # dim[0 : 8]
    datatype: int
    pixdim: tuple[float, ...]  # pixdim[0 : 8]; pixdim[0] is qfac
    vox_offset: float
    scl_slope: float
    scl_inter: float
    qform_code: int
    sform_code: int
    quatern: tuple[float, float, float]  # b, c, d
    qoffset: tuple[float, float, float]
    srow: tuple[tuple[float, ...], ...]  # 3 rows of 4
    magic: bytes
    header_size: int
    endian: str  # "<" or ">"


@dataclass(frozen=True)
class _NiftiLayout:
    shape: tuple[int, ...]  # dim[1 : dim[0] + 1], (x, y, z, t, components...)
    compressed: bool
    offset: int  # where the voxels start, in the (decompressed) stream
    nbytes: int  # voxel bytes the header declares
    itemsize: int
    float_dtype: np.dtype | None  # set for float32/float64 data, whose NaN/Inf are counted


# datatype code -> (bytes per voxel, numpy code of float data whose NaN/Inf are counted, or "")
_NIFTI_TYPES = {
    2: (1, ""),  # uint8
    4: (2, ""),  # int16
    8: (4, ""),  # int32
    16: (4, "f4"),  # float32
    64: (8, "f8"),  # float64
    128: (3, ""),  # RGB24, read as 3 channels
    256: (1, ""),  # int8
    512: (2, ""),  # uint16
    768: (4, ""),  # uint32
    1024: (8, ""),  # int64
    1280: (8, ""),  # uint64
    2304: (4, ""),  # RGBA32, read as 4 channels
}
_NIFTI_UNSUPPORTED = {1: "1-bit", 32: "complex64", 1536: "float128", 1792: "complex128", 2048: "complex256"}


def check_nifti(path: Path, extension: str, budget: Budget) -> Findings:
    """Parse and check the header, check the declared size against the budget, then stream the voxel bytes
    (before ITK sees the file, so a broken gzip stream gets a precise message)."""
    compressed = extension.endswith(".gz")
    try:
        with _nifti_stream(path, compressed) as stream:
            head = stream.read(540)
        header = _parse_nifti_header(head)
        layout = _nifti_layout(header, compressed)
        warning = _check_nifti_geometry(header, layout.shape)
    except ValueError as error:
        raise HeaderError(str(error)) from None
    check_budget(path, layout.shape, 1, layout.itemsize, budget)
    return Findings(nonfinite=_scan_nifti(path, layout), warning=warning)


def _parse_nifti_header(head: bytes) -> _NiftiHeader:
    """The fields of a NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header of either byte order."""
    endian = next(
        (e for e in "<>" if len(head) >= 4 and struct.unpack(e + "i", head[:4])[0] in (348, 540)), None
    )
    if endian is None:
        raise ValueError("not a NIfTI file (sizeof_hdr is neither 348 nor 540)")
    size = struct.unpack(endian + "i", head[:4])[0]
    if len(head) < size:
        raise ValueError(f"header is {len(head)} bytes, shorter than its {size}")

    def unpack(fmt: str, offset: int) -> tuple[Any, ...]:
        return struct.unpack_from(endian + fmt, head, offset)

    if size == 348:
        (datatype,) = unpack("h", 70)
        dims, pixdim = unpack("8h", 40), unpack("8f", 76)
        vox_offset, scl_slope, scl_inter = unpack("3f", 108)
        qform_code, sform_code = unpack("2h", 252)
        quatern_and_offset, srow, magic = unpack("6f", 256), unpack("12f", 280), head[344:348]
    else:
        (datatype,) = unpack("h", 12)
        dims, pixdim = unpack("8q", 16), unpack("8d", 104)
        (vox_offset,), (scl_slope, scl_inter) = unpack("q", 168), unpack("2d", 176)
        qform_code, sform_code = unpack("2i", 344)
        quatern_and_offset, srow, magic = unpack("6d", 352), unpack("12d", 400), head[4:8]
    return _NiftiHeader(
        dims=dims,
        datatype=datatype,
        pixdim=pixdim,
        vox_offset=float(vox_offset),
        scl_slope=scl_slope,
        scl_inter=scl_inter,
        qform_code=qform_code,
        sform_code=sform_code,
        quatern=quatern_and_offset[:3],
        qoffset=quatern_and_offset[3:],
        srow=(srow[0:4], srow[4:8], srow[8:12]),
        magic=magic,
        header_size=size,
        endian=endian,
    )


def _nifti_layout(header: _NiftiHeader, compressed: bool) -> _NiftiLayout:
    if header.magic[:3] not in (b"n+1", b"n+2"):
        raise ValueError(f"not a single-file NIfTI (magic {header.magic!r})")
    dims = header.dims
    if not 1 <= dims[0] <= 7:
        raise ValueError(f"header dim[0] is {dims[0]}, must be 1 to 7")
    shape = dims[1 : dims[0] + 1]
    if min(shape) < 1:
        raise ValueError(f"header declares dimensions {tuple(shape)}")
    if header.datatype in _NIFTI_UNSUPPORTED:
        raise ValueError(f"{_NIFTI_UNSUPPORTED[header.datatype]} voxels are not supported")
    if header.datatype not in _NIFTI_TYPES:
        raise ValueError(f"unknown datatype code {header.datatype}")
    # bitpix is not used: niftilib and nibabel size voxels by datatype alone.
    itemsize, float_code = _NIFTI_TYPES[header.datatype]
    if not math.isfinite(header.vox_offset):
        raise ValueError(f"vox_offset is {header.vox_offset}")
    offset = int(header.vox_offset)
    if offset < header.header_size:
        raise ValueError(f"voxel offset {offset} lies inside the {header.header_size}-byte header")
    return _NiftiLayout(
        shape=tuple(shape),
        compressed=compressed,
        offset=offset,
        nbytes=math.prod(shape) * itemsize,
        itemsize=itemsize,
        float_dtype=np.dtype(header.endian + float_code) if float_code else None,
    )


def _check_nifti_geometry(header: _NiftiHeader, shape: tuple[int, ...]) -> str | None:
    """Refuse what ITK would silently change or what other tools would read differently; return a warning
    for a header without orientation (ITK: origin 0, identity direction; nibabel: x and y flipped)."""
    spatial = min(len(shape), 3)
    for axis in range(1, spatial + 1):
        size = header.pixdim[axis]
        if not (math.isfinite(size) and size > 0):
            raise ValueError(f"pixdim[{axis}] (voxel size) is {size:g}, must be positive")
    slope, inter = header.scl_slope, header.scl_inter
    if math.isfinite(slope) and slope != 0:
        if not math.isfinite(inter):  # niftilib would use 0, nibabel refuses
            raise ValueError(f"scl_slope is {slope:g} but scl_inter is {inter}")
    elif math.isfinite(inter) and inter != 0:
        # No scaling by the NIfTI standard and nibabel; ITK reads the slope as 1 and adds the intercept.
        raise ValueError(f"scl_slope is {slope:g} (no scaling) but scl_inter is {inter:g}")
    qform = _nifti_qform(header) if header.qform_code > 0 else None
    sform = _nifti_sform(header) if header.sform_code > 0 else None
    if qform is None and sform is None:
        return (
            "header declares no orientation (qform_code = sform_code = 0): read with origin 0 and identity "
            "direction as ITK does; other tools (nibabel, FSL) place such images differently"
        )
    if qform is not None and sform is not None:
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in (*shape[:spatial], 1, 1)[:3]])).reshape(3, -1)
        distance = float(np.max(np.linalg.norm((qform - sform) @ np.vstack([corners, np.ones(8)]), axis=0)))
        lever = float(np.max(np.linalg.norm(sform[:, :3] @ corners, axis=0)))  # mm from voxel 0
        voxel = min(header.pixdim[1 : spatial + 1])
        if distance > max(1e-3, _XFORM_VOXEL_RTOL * voxel) + _QFORM_ANGLE * lever:
            itk_choice = "sform" if header.sform_code == 1 and not _is_skewed(sform) else "qform"
            raise ValueError(
                f"qform and sform disagree by up to {distance:.3g} mm (qform_code {header.qform_code}, "
                f"sform_code {header.sform_code}): ITK would use the {itk_choice}, FSL and nibabel the sform; "
                "make them equal (e.g. fslorient -copysform2qform)"
            )
    return None


def _nifti_qform(header: _NiftiHeader) -> np.ndarray:
    """The (3, 4) qform matrix (voxel index -> RAS mm) from the quaternion, pixdim and qoffset."""
    b, c, d = header.quatern
    if not all(math.isfinite(v) for v in (b, c, d, *header.qoffset)):
        raise ValueError(f"qform quaternion {(b, c, d)} or offset {header.qoffset} is not finite")
    norm = b * b + c * c + d * d
    if norm > 1 + 1e-4:
        # niftilib rescales it silently, nibabel refuses: the rotation is ambiguous.
        raise ValueError(f"qform quaternion (b, c, d) = {(b, c, d)} has b^2 + c^2 + d^2 = {norm:.6g} > 1")
    if 1.0 - norm < 1e-7:  # a 180 degree rotation: niftilib normalises (b, c, d) and takes a = 0
        b, c, d = (v / math.sqrt(norm) for v in (b, c, d))
    a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    qfac = -1.0 if header.pixdim[0] < 0 else 1.0
    zooms = np.array([header.pixdim[1], header.pixdim[2], qfac * header.pixdim[3]])
    return np.hstack([rotation * zooms, np.reshape(header.qoffset, (3, 1))])


def _nifti_sform(header: _NiftiHeader) -> np.ndarray:
    sform = np.array(header.srow, dtype=np.float64)
    if not np.all(np.isfinite(sform)):
        raise ValueError(f"sform (srow_x/y/z) is not finite: {format_numbers(sform)}")
    return sform


def _is_skewed(affine: np.ndarray) -> bool:
    """True when the columns of the affine's (3, 3) part are not orthogonal (ITK then ignores the sform)."""
    matrix = affine[:, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(norms == 0):
        return True
    unit = matrix / norms
    return not np.allclose(unit.T @ unit, np.eye(3), atol=1e-4)


@contextmanager
def _nifti_stream(path: Path, compressed: bool) -> Iterator[Any]:
    """The file's (decompressed) bytes; gzip trouble becomes ValueError with a short reason."""
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as stream:
            yield stream
    except gzip.BadGzipFile as error:
        if "Not a gzipped file" in str(error):
            raise ValueError("not gzip-compressed although named .nii.gz") from None
        raise ValueError(f"corrupt gzip stream ({error})") from None
    except EOFError:
        raise ValueError("file is truncated (the gzip stream ends early)") from None
    except zlib.error as error:
        raise ValueError(f"corrupt gzip stream ({error})") from None
    except OSError as error:
        raise ValueError(f"cannot read the file ({error.strerror or error})") from None


def _scan_nifti(path: Path, layout: _NiftiLayout) -> int:
    """Check that all declared voxel bytes are present (and the gzip CRC); return the NaN/Inf count."""
    try:
        if not layout.compressed and layout.float_dtype is None:
            check_length(layout.nbytes, path.stat().st_size - layout.offset)  # nothing to count: size tells
            return 0
        return _stream_voxels(path, layout)
    except ValueError as error:
        raise InputError(path, str(error)) from None


def _stream_voxels(path: Path, layout: _NiftiLayout) -> int:
    nonfinite, done = 0, 0
    with _nifti_stream(path, layout.compressed) as stream:
        stream.seek(layout.offset)
        while done < layout.nbytes:
            want = min(layout.nbytes - done, CHUNK)  # CHUNK is a multiple of every float item size
            chunk = stream.read(want)
            if len(chunk) < want:
                check_length(layout.nbytes, done + len(chunk))
            if layout.float_dtype is not None:
                values = np.frombuffer(chunk, dtype=layout.float_dtype)
                nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
            done += len(chunk)
        while stream.read(CHUNK):  # reading to the end makes gzip check its CRC and length
            pass
    return nonfinite
