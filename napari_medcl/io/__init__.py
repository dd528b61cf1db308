"""Read and write medical images with their geometry, with SimpleITK for every format.

Geometry is turned into array order here and only here (see ``volume.py``): SimpleITK lists spacing and
origin as (x, y, z) and its direction matrix ``D`` has ``D[:, j]`` = physical direction of index axis ``j`` in
physical (x, y, z) coordinates. In array order (z, y, x) both the index axes and the physical coordinates are
reversed, so the direction becomes ``D[::-1, ::-1]`` (``_geometry_from_itk`` / ``_geometry_to_itk``).

Each file format is read and written by the SimpleITK ImageIO named in ``_FORMATS``, chosen from the extension
(never by probing the content), so PNG bytes named ``.nii`` are an error rather than a silently different image.
Every failure a user can cause is an ``InputError`` (reading) or ``OutputError`` (writing) whose message is one
line naming the file.

Untrusted files are checked in Python before ITK opens them (ITK's readers are not fuzzed, MetaIO has known
memory-safety bugs reachable from a malformed header, niftilib zero-fills what is missing): NIfTI, MetaImage
and NRRD headers are parsed here, data files they name must lie inside the header's folder, the declared size
is checked against a voxel and byte budget and against the bytes present, and multi-page TIFFs and DICOM
folders are checked for what ITK and GDCM would silently get wrong. The policy for each bad input, and the
test that pins it, is in ``docs/reliability.md``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import math
import os
import re
import shutil
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.atomic import atomic_path, split_suffix
from napari_medcl.errors import InputError, InputWarning, OutputError, OutputFormatError
from napari_medcl.volume import Volume

__all__ = [
    "MAX_BYTES",
    "MAX_VOXELS",
    "SUPPORTED_EXTENSIONS",
    "OutputFormatError",
    "case_name",
    "is_supported",
    "output_extension",
    "read_image",
    "sha256_file",
    "write_image",
]


@dataclass(frozen=True)
class _Format:
    name: str  # Volume.format
    image_io: str  # the SimpleITK ImageIO that reads and writes it
    extensions: tuple[str, ...]
    outputs: tuple[str, str]  # extension for (labels, float maps); "" keeps the input's extension
    picture: bool = False  # no origin or direction stored; a depth-1 volume is written as a 2D image
    write_dtypes: tuple[str, ...] | None = None  # None: whatever the ImageIO accepts
    compress: bool = False


_FORMATS = (
    _Format("nifti", "NiftiImageIO", (".nii", ".nii.gz"), ("", ""), compress=True),
    _Format("nrrd", "NrrdImageIO", (".nrrd", ".nhdr"), (".nrrd", ".nrrd"), compress=True),
    _Format("mha", "MetaImageIO", (".mha", ".mhd"), (".mha", ".mha"), compress=True),
    _Format("png", "PNGImageIO", (".png",), (".png", ".tif"), picture=True, write_dtypes=("uint8", "uint16")),
    _Format(
        "jpeg", "JPEGImageIO", (".jpg", ".jpeg"), (".png", ".tif"), picture=True, write_dtypes=("uint8",)
    ),
    _Format("tiff", "TIFFImageIO", (".tif", ".tiff"), (".tif", ".tif"), picture=True),
    _Format("dicom", "GDCMImageIO", (), (".nii.gz", ".nii.gz")),
)
_BY_EXTENSION = {extension: fmt for fmt in _FORMATS for extension in fmt.extensions}
_BY_NAME = {fmt.name: fmt for fmt in _FORMATS}
# Header and voxels in two files: read, never written. One rename cannot move both atomically, and the header
# names its data file, so renaming either breaks the pair.
_TWO_FILE = {".mhd": ".mha", ".nhdr": ".nrrd"}

SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(_BY_EXTENSION)

# read_image's default budget: values (voxels x components) and bytes a header may declare.
MAX_VOXELS = 2**31
MAX_BYTES = 2**33

_CHUNK = 1 << 20
# Tolerances of the read-back check after writing: loose enough for float32 headers (NIfTI) and PNG's
# 5-digit spacing, tight enough to catch a format dropping the origin, the direction or the z spacing.
_SPACING_RTOL = 1e-4
_POSITION_ATOL = 1e-4
# Slices of a DICOM series further than this from the median gap (fraction of it) mean a missing or
# duplicated slice: the volume would be stretched, and the labels misplaced.
_SLICE_GAP_RTOL = 0.01
# Slice positions drifting sideways by more than this fraction of a pixel (gantry tilt) would be misplaced:
# ITK stacks the slices along the normal of the first one.
_SLICE_DRIFT_PIXELS = 0.05
# Image orientation (direction cosines) of two slices differing by more than this: mixed orientations.
_ORIENTATION_ATOL = 1e-4
# A direction matrix must have unit columns (within this) and |det| at least _MIN_DETERMINANT: a scaled or
# degenerate matrix would silently change voxel sizes or collapse an axis. Shear is allowed (see read_image).
_UNIT_ATOL = 1e-3
_MIN_DETERMINANT = 1e-3
# NIfTI qform and sform both set and further apart than this fraction of the smallest voxel (plus
# _QFORM_ANGLE radians times the distance from voxel 0) anywhere in the volume: ITK and FSL/nibabel would
# place the image differently. The angle allows for the qform's float32 quaternion, which near a 180 degree
# rotation only holds the rotation to about 1e-3 rad (the fuzzer found ITK's own files off by that much).
_XFORM_VOXEL_RTOL = 0.1
_QFORM_ANGLE = 2e-3
# Header-parsing limits: real headers are a few kilobytes at most; these only bound the work on hostile files.
_MAX_TEXT_HEADER = 1 << 20
_MAX_HEADER_LINE = 500  # MetaIO reads names and values into 500-byte buffers


# ----------------------------------------------------------------------------------------------------------
# Names and extensions


def _extension(path: Path) -> str:
    """The lower-case extension as ``SUPPORTED_EXTENSIONS`` spells it (``.nii.gz`` whole)."""
    return split_suffix(path.name)[1].lower()


def case_name(path: str | Path) -> str:
    """The case's name: the file name without its (possibly double) extension, or a DICOM folder's name."""
    path = Path(path)
    return path.name if path.is_dir() else split_suffix(path.name)[0]


def is_supported(path: str | Path) -> bool:
    """True for a file with a supported extension, or a folder holding DICOM files (looks at a few files'
    names and DICOM markers only, so it is cheap enough for napari's reader lookup)."""
    path = Path(path)
    if path.is_dir():
        return _folder_has_dicom(path)
    return _extension(path) in _BY_EXTENSION


def _folder_has_dicom(folder: Path, *, look_at: int = 20) -> bool:
    try:
        files = [p for p in sorted(folder.iterdir()) if p.is_file()][:look_at]
    except OSError:
        return False
    return any(p.suffix.lower() == ".dcm" or _sniff(p) == "a DICOM file" for p in files)


def output_extension(volume_format: str, source_extension: str, *, kind: str) -> str:
    """The extension to write a result in, for an input of ``volume_format`` (``Volume.format``).

    ``kind`` is ``"labels"`` (integer masks) or ``"map"`` (float maps). NIfTI keeps the input's ``.nii`` or
    ``.nii.gz``; NRRD and MetaImage are written single-file (``.nrrd``, ``.mha``); DICOM becomes ``.nii.gz``;
    PNG/JPEG labels become ``.png`` and float maps ``.tif`` (float32 TIFF); TIFF stays ``.tif``.
    """
    kinds = ("labels", "map")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    fmt = _BY_NAME.get(volume_format)
    if fmt is None:
        raise ValueError(f"unknown volume format {volume_format!r}; known: {sorted(_BY_NAME)}")
    extension = fmt.outputs[kinds.index(kind)]
    if extension:
        return extension
    source_extension = source_extension.lower()
    if source_extension not in fmt.extensions:
        raise ValueError(f"{source_extension!r} is not a {volume_format} extension {fmt.extensions}")
    return source_extension


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Budget:
    """The most a header may declare: values (voxels x components) and bytes; None means no limit."""

    voxels: int | None
    bytes: int | None


@dataclass(frozen=True)
class _Findings:
    """What the pre-ITK checks of a file learnt: NaN/Inf voxels counted in the file itself (None: not
    counted) and a warning to give once the file is read."""

    nonfinite: int | None = None
    warning: str | None = None


def read_image(
    path: str | Path,
    *,
    series: str | None = None,
    max_voxels: int | None = MAX_VOXELS,
    max_bytes: int | None = MAX_BYTES,
    allow_nonfinite: bool = False,
) -> Volume:
    """Read an image file, or the DICOM series in a folder, as a Volume in array order.

    Files: ``SUPPORTED_EXTENSIONS``; the format comes from the extension. 3D formats give (z, y, x) arrays
    (a one-slice volume stays 3D); PNG/JPEG and single-page TIFF give (y, x), multi-page TIFF (z, y, x). Pixels
    with several components (RGB, RGBA, vector images) come as a leading channel axis ``(C, *S)``.
    A folder is read as a DICOM series; when it holds several, ``series`` picks one by SeriesInstanceUID.

    The header is checked before any voxel is read: more than ``max_voxels`` values (voxels x components) or
    ``max_bytes`` bytes (None: no limit), an empty or 4D image, a zero or non-finite spacing, a non-finite
    origin, and a direction matrix whose columns are not unit vectors or that is (nearly) singular are
    refused. Sheared (non-orthogonal) directions are kept as they are, so that they are written back
    unchanged (MHA and NRRD store them; NIfTI cannot, see ``write_image``). Float images with NaN/Inf voxels
    are refused unless ``allow_nonfinite`` (NIfTI: ITK 5 reads those voxels as 0, so they are counted in
    the file itself). A NIfTI file that declares no orientation is read with ITK's identity direction and
    an ``InputWarning``.

    Raises ``InputError`` (one line, naming the file) for anything wrong with the input.
    """
    path = Path(path)
    budget = _Budget(max_voxels, max_bytes)
    if _path_kind(path) == "folder":
        return _read_dicom(path, series=series, budget=budget, allow_nonfinite=allow_nonfinite)
    if series is not None:
        raise InputError(path, "series= only applies to a folder holding a DICOM series")
    fmt, extension = _input_format(path)
    try:
        with open(path, "rb") as file:
            if not file.read(1):
                raise InputError(path, "file is empty")
    except OSError as error:
        raise InputError(path, f"cannot open the file ({error.strerror or error})") from None
    findings = _check_file(path, fmt, extension, budget)
    sitk = _sitk()
    with _itk_warnings_off(sitk):
        reader = _read_header(sitk, path, fmt.image_io, extension)
        _check_reader(sitk, path, reader, extension, budget)
        image = _read_voxels(reader, path, extension)
    volume = _to_volume(
        image,
        path,
        fmt,
        {"extension": extension},
        nonfinite=findings.nonfinite,
        allow_nonfinite=allow_nonfinite,
    )
    if findings.warning is not None:
        warnings.warn(f"{path}: {findings.warning}", InputWarning, stacklevel=2)
    return volume


def _path_kind(path: Path) -> str:
    """ "folder" or "file"; anything else (missing, link loop, no permission, device, pipe) is refused before
    a reader opens it (opening a pipe would block, and ITK reports all of these as "cannot read")."""
    try:
        mode = path.stat().st_mode  # follows symbolic links
    except OSError as error:
        raise InputError(path, _os_problem(error, path)) from None
    if stat.S_ISDIR(mode):
        return "folder"
    if not stat.S_ISREG(mode):
        raise InputError(path, "not a regular file (a device, pipe or socket)")
    return "file"


def _os_problem(error: OSError, path: Path) -> str:
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if error.errno == errno.ENOENT:
        return (
            "broken symbolic link (its target does not exist)"
            if path.is_symlink()
            else "no such file or folder"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if error.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return f"cannot access ({error.strerror or error})"


def _input_format(path: Path) -> tuple[_Format, str]:
    extension = _extension(path)
    fmt = _BY_EXTENSION.get(extension)
    if fmt is None:
        hint = "; a DICOM series is read from its folder" if extension == ".dcm" else ""
        shown = extension or "no extension"
        raise InputError(
            path, f"unsupported file type ({shown}); supported: {', '.join(SUPPORTED_EXTENSIONS)}{hint}"
        )
    return fmt, extension


def _check_file(path: Path, fmt: _Format, extension: str, budget: _Budget) -> _Findings:
    """The format's own checks, in Python, before ITK parses anything."""
    try:
        if fmt.name == "nifti":
            return _check_nifti(path, extension, budget)
        if fmt.name == "mha":
            _check_metaimage(path, extension, budget)
        elif fmt.name == "nrrd":
            _check_nrrd(path, extension, budget)
        elif fmt.name == "tiff":
            _check_tiff(path, extension)
    except OSError as error:  # e.g. a data file named by the header that cannot be opened
        name = Path(error.filename).name if error.filename else path.name
        raise InputError(path, f"cannot read {name} ({error.strerror or error})") from None
    return _Findings()


def _sitk() -> Any:
    import SimpleITK as sitk  # heavy: imported on first use, not with napari_medcl

    return sitk


# ITK's warning switch is process-wide: reads from several threads (napari's reader and a segmentation worker)
# would otherwise interleave their save/restore and leave the switch off for good.
_ITK_WARNINGS_LOCK = threading.RLock()


@contextmanager
def _itk_warnings_off(sitk: Any) -> Iterator[None]:
    """Silence ITK's warnings on stderr (they would clutter the CLI; what matters becomes an InputError).
    The switch is process-wide, so the previous value is put back, under a lock."""
    with _ITK_WARNINGS_LOCK:
        previous = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _read_header(sitk: Any, path: Path, image_io: str, extension: str) -> Any:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(image_io)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(path, _not_readable_as(path, extension, _itk_reason(error, path))) from None
    return reader


def _read_voxels(reader: Any, path: Path, extension: str) -> Any:
    try:
        return reader.Execute()
    except RuntimeError as error:
        reason = _itk_reason(error, path)
        problem = _not_readable_as(path, extension, reason)
        if problem.endswith(reason):  # no better explanation from the file's content
            problem = f"cannot read the voxel data (truncated or corrupt file?): {reason}"
        raise InputError(path, problem) from None


def _check_reader(sitk: Any, path: Path, reader: Any, extension: str, budget: _Budget) -> None:
    """What ITK's header says, checked before any voxel is allocated."""
    try:
        pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        if "complex" in pixel_type:
            raise InputError(path, f"complex pixels ({pixel_type}) are not supported")
        dimension = reader.GetDimension()
        size, components = reader.GetSize(), reader.GetNumberOfComponents()
        _check_header(path, dimension, size, components, _itemsize(pixel_type), budget)
        _check_geometry(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), dimension)
    except InputError as error:
        hint = _content_hint(path, extension)  # e.g. NIfTI bytes named .png read as an empty PNG
        if not hint:
            raise
        raise InputError(path, error.problem + hint) from None


def _itemsize(pixel_type: str) -> int:
    """Bytes per component of a SimpleITK pixel type named like "vector of 16-bit signed integer"."""
    bits = re.search(r"(\d+)-bit", pixel_type)
    return int(bits.group(1)) // 8 if bits else 8


def _check_header(
    path: Path,
    dimension: int,
    size: Sequence[int],
    components: int,
    itemsize: int,
    budget: _Budget,
) -> None:
    """Refuse 4D and empty images and declared sizes over the budget before any voxel is allocated."""
    if dimension == 4:
        raise InputError(path, "4D images (time series) are not supported; split the volume first")
    if dimension not in (2, 3):
        raise InputError(path, f"{dimension}D images are not supported (2D or 3D only)")
    if min(size) < 1:
        raise InputError(path, f"header declares an empty image ({' x '.join(map(str, size))})")
    _check_budget(path, size, components, itemsize, budget)


def _check_budget(path: Path, size: Sequence[int], components: int, itemsize: int, budget: _Budget) -> None:
    values = math.prod(size) * components
    shape = " x ".join(str(n) for n in size)
    axes = ", ".join("xyztuvw"[: len(size)])
    per_voxel = f" with {components} components" if components > 1 else ""
    declared = f"header declares a {shape} ({axes}) image{per_voxel}"
    if budget.voxels is not None and values > budget.voxels:
        raise InputError(
            path, f"{declared} = {values:,} values, over the limit of {budget.voxels:,} (max_voxels)"
        )
    if budget.bytes is not None and values * itemsize > budget.bytes:
        raise InputError(
            path,
            f"{declared} of {itemsize}-byte values = {values * itemsize:,} bytes, over the limit of "
            f"{budget.bytes:,} (max_bytes)",
        )


def _check_geometry(
    path: Path,
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    dimension: int,
    *,
    positive: bool = False,
) -> None:
    """Refuse geometry that cannot place voxels: zero or non-finite spacing (negative is allowed in a header:
    ITK turns it into a flipped axis, so ``positive`` asks for the final, positive one), a non-finite
    origin, and a direction whose columns are not unit vectors or that is (nearly) singular."""
    spacing_ = np.asarray(spacing, dtype=np.float64)
    matrix = np.asarray(direction, dtype=np.float64).reshape(dimension, dimension)
    if not np.all(np.isfinite(spacing_)) or np.any(spacing_ <= 0 if positive else spacing_ == 0):
        raise InputError(path, f"header declares the voxel spacing {_fmt(spacing_)}: zero or not a number")
    if not np.all(np.isfinite(origin)):
        raise InputError(path, f"header declares a non-finite origin {_fmt(origin)}")
    if not np.all(np.isfinite(matrix)):
        raise InputError(path, f"header declares a non-finite direction matrix {_fmt(matrix)}")
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(np.abs(norms - 1.0) > _UNIT_ATOL):
        raise InputError(
            path,
            f"direction matrix columns have lengths {_fmt(norms)}, not 1: the voxel size would be ambiguous",
        )
    if abs(np.linalg.det(matrix)) < _MIN_DETERMINANT:
        raise InputError(path, f"direction matrix {_fmt(matrix)} is singular: two image axes are parallel")


def _to_volume(
    image: Any,
    source: Path,
    fmt: _Format,
    metadata: dict[str, Any],
    *,
    nonfinite: int | None,
    allow_nonfinite: bool,
) -> Volume:
    """SimpleITK image (x, y[, z]) -> Volume (z, y, x), with components as a leading channel axis."""
    sitk = _sitk()
    pixel_type = image.GetPixelIDTypeAsString()
    if "complex" in pixel_type:
        raise InputError(source, f"complex pixels ({pixel_type}) are not supported")
    dimension = image.GetDimension()
    _check_geometry(
        source, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), dimension, positive=True
    )
    array = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, C)
    channels = array.ndim == dimension + 1
    if channels and array.shape[-1] == 1:
        array, channels = array[..., 0], False
    if channels:
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0))  # (C, z, y, x)
    if array.dtype.kind == "f" and not allow_nonfinite:
        # Also counted after reading: NIfTI scaling (scl_slope) or DICOM rescaling can overflow to Inf.
        found = int(array.size - np.count_nonzero(np.isfinite(array)))
        nonfinite = max(nonfinite or 0, found)
    if nonfinite and not allow_nonfinite:
        raise InputError(source, f"contains {nonfinite:,} NaN/Inf voxels")
    spacing, origin, direction = _geometry_from_itk(image)
    return Volume(
        array,
        spacing,
        origin,
        direction,
        channel_axis=channels,
        source=source,
        format=fmt.name,
        metadata={"pixel_type": pixel_type, **metadata},
    )


def _geometry_from_itk(image: Any) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """(spacing, origin, direction) in array order from a SimpleITK image or reader: the one reversal on read."""
    n = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(n, n)
    return tuple(image.GetSpacing())[::-1], tuple(image.GetOrigin())[::-1], direction[::-1, ::-1].copy()


def _geometry_to_itk(
    image: Any, spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray
) -> None:
    """Set array-order geometry on a SimpleITK image: the one reversal on write."""
    image.SetSpacing([float(s) for s in spacing][::-1])
    image.SetOrigin([float(o) for o in origin][::-1])
    image.SetDirection(np.asarray(direction, dtype=np.float64)[::-1, ::-1].ravel().tolist())


# ----------------------------------------------------------------------------------------------------------
# Error messages


_MAGIC = (
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"II*\x00", "a TIFF image"),
    (0, b"MM\x00*", "a TIFF image"),
    (0, b"\x1f\x8b", "gzip-compressed data"),
    (0, b"NRRD", "a NRRD file"),
    (0, b"ObjectType", "a MetaImage file"),
    (128, b"DICM", "a DICOM file"),
    (344, b"n+1\x00", "an uncompressed NIfTI file"),
    (4, b"n+2\x00", "an uncompressed NIfTI file"),
)


def _sniff(path: Path) -> str | None:
    """What a file's first bytes say it is (for error messages and the DICOM folder check)."""
    try:
        with open(path, "rb") as file:
            head = file.read(352)
    except OSError:
        return None
    return next((kind for offset, magic, kind in _MAGIC if head[offset : offset + len(magic)] == magic), None)


# What ``_sniff`` says about a file whose content matches its extension.
_EXPECTED_CONTENT = {
    ".nii": "an uncompressed NIfTI file",
    ".nii.gz": "gzip-compressed data",
    ".nrrd": "a NRRD file",
    ".nhdr": "a NRRD file",
    ".mha": "a MetaImage file",
    ".mhd": "a MetaImage file",
    ".png": "a PNG image",
    ".jpg": "a JPEG image",
    ".jpeg": "a JPEG image",
    ".tif": "a TIFF image",
    ".tiff": "a TIFF image",
    ".dcm": "a DICOM file",
}


def _not_readable_as(path: Path, extension: str, reason: str) -> str:
    return f"cannot be read as {extension}: {reason}{_content_hint(path, extension)}"


def _content_hint(path: Path, extension: str) -> str:
    content = _sniff(path)
    if content is not None and content != _EXPECTED_CONTENT.get(extension):
        return f" (the content looks like {content}: is the extension wrong?)"
    return ""


def _itk_reason(error: Exception, path: Path, name: str | None = None) -> str:
    """One short line from SimpleITK's multi-line RuntimeError text: source locations and object ids dropped,
    and ``path`` (which the message already starts with) shortened to ``name``, by default its file name."""
    text = str(error).replace(str(path), path.name if name is None else name)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[-1] if lines else type(error).__name__
    for index, line in enumerate(lines):
        match = re.search(r"ERROR:\s*(?:\w+\s*\(0x[0-9a-fA-F]+\):\s*)?(.*)", line)
        if match:
            reason = match.group(1).strip()
            rest = lines[index + 1 :]
            if rest and (not reason or reason.endswith(":")):
                reason = f"{reason} {rest[-1]}".strip()  # e.g. NRRD's "fread got only 16 ... not 120"
            break
    reason = " ".join(reason.split())
    return reason if len(reason) <= 240 else reason[:237] + "..."


# ----------------------------------------------------------------------------------------------------------
# NIfTI file checks. ITK's NIfTI reader (niftilib) zero-fills a file shorter than its header declares,
# replaces NaN/Inf voxels by 0 (before ITK 6), replaces a zero or NaN pixdim by 1, flips an axis for a
# negative one, and picks qform or sform by rules other tools do not share, all silently; so the header is
# parsed and the voxel bytes are streamed here first.


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


def _check_nifti(path: Path, extension: str, budget: _Budget) -> _Findings:
    """Parse and check the header, check the declared size against the budget, then stream the voxel bytes
    (before ITK sees the file, so a broken gzip stream gets a precise message)."""
    compressed = extension == ".nii.gz"
    try:
        with _nifti_stream(path, compressed) as stream:
            head = stream.read(540)
        header = _parse_nifti_header(head)
        layout = _nifti_layout(header, compressed)
        warning = _check_nifti_geometry(header, layout.shape)
    except ValueError as error:
        raise InputError(path, _not_readable_as(path, extension, str(error))) from None
    _check_budget(path, layout.shape, 1, layout.itemsize, budget)
    return _Findings(nonfinite=_scan_nifti(path, layout), warning=warning)


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
        raise ValueError(f"sform (srow_x/y/z) is not finite: {_fmt(sform)}")
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
            _check_length(layout.nbytes, path.stat().st_size - layout.offset)  # nothing to count: size tells
            return 0
        return _stream_voxels(path, layout)
    except ValueError as error:
        raise InputError(path, str(error)) from None


def _stream_voxels(path: Path, layout: _NiftiLayout) -> int:
    nonfinite, done = 0, 0
    with _nifti_stream(path, layout.compressed) as stream:
        stream.seek(layout.offset)
        while done < layout.nbytes:
            want = min(layout.nbytes - done, _CHUNK)  # _CHUNK is a multiple of every float item size
            chunk = stream.read(want)
            if len(chunk) < want:
                _check_length(layout.nbytes, done + len(chunk))
            if layout.float_dtype is not None:
                values = np.frombuffer(chunk, dtype=layout.float_dtype)
                nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
            done += len(chunk)
        while stream.read(_CHUNK):  # reading to the end makes gzip check its CRC and length
            pass
    return nonfinite


def _check_length(declared: int, present: int, what: str = "voxel data") -> None:
    if present < declared:
        raise ValueError(
            f"file is truncated: the header declares {declared:,} bytes of {what}, {max(present, 0):,} are present"
        )


# ----------------------------------------------------------------------------------------------------------
# MetaImage (.mha, .mhd) header checks. MetaIO has memory-safety bugs reachable from a malformed header
# (Kitware/MetaIO#150), follows ElementDataFile anywhere (../, absolute paths, links), zero-fills a short
# compressed block and reports a short raw one as "No such file or directory"; so ITK only ever sees a
# header that parsed here: MetaIO's own syntax (``Key = value`` or ``Key: value``, exact key names, the
# header ending at ElementDataFile), with every field MetaIO reads into a fixed-size array validated.

_MET_ITEM_SIZES = {
    f"MET_{name}{suffix}": size
    for name, size in (
        ("CHAR", 1),
        ("UCHAR", 1),
        ("SHORT", 2),
        ("USHORT", 2),
        ("INT", 4),
        ("UINT", 4),
        ("LONG", 4),
        ("ULONG", 4),
        ("LONG_LONG", 8),
        ("ULONG_LONG", 8),
        ("FLOAT", 4),
        ("DOUBLE", 8),
    )
    for suffix in ("", "_ARRAY")
}
# Fields MetaIO reads as NDims numbers, and as NDims x NDims numbers.
_MET_VECTORS = (
    "DimSize",
    "ElementSpacing",
    "ElementSize",
    "Offset",
    "Origin",
    "Position",
    "CenterOfRotation",
    "ImagePosition",
    "ElementOrigin",
)
_MET_MATRICES = ("TransformMatrix", "Rotation", "Orientation", "ElementDirection")
_MET_LOCAL = ("LOCAL", "Local", "local")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _is_count(text: str) -> bool:
    """A plain decimal integer as C's stream extraction reads it (ASCII digits; at most 18 of them)."""
    return re.fullmatch(r"[0-9]{1,18}", text) is not None


def _check_metaimage(path: Path, extension: str, budget: _Budget) -> None:
    try:
        fields, offset = _metaimage_header(path)
        dims, channels, itemsize = _metaimage_layout(fields)
    except ValueError as error:
        raise InputError(path, _not_readable_as(path, extension, str(error))) from None
    if len(dims) == 4:
        raise InputError(path, "4D images (time series) are not supported; split the volume first")
    _check_budget(path, dims, channels, itemsize, budget)
    declared = math.prod(dims) * channels * itemsize
    name = fields["ElementDataFile"]
    try:
        data, start = (path, offset) if name in _MET_LOCAL else (_data_file(path, name, "ElementDataFile"), 0)
        skip = int(fields.get("HeaderSize", "0"))
        if skip > 0:
            start = skip  # MetaIO seeks from the beginning of the data file, LOCAL or not
        size = data.stat().st_size
        if fields.get("CompressedData", "False")[:1] in ("T", "t", "1"):
            compressed = size - start
            if "CompressedDataSize" in fields:
                compressed = int(fields["CompressedDataSize"])
                _check_length(compressed, size - start, "compressed voxel data")
            _check_inflated(data, start, compressed, declared)
        elif skip == -1:  # the data are the last bytes of the file
            _check_length(declared, size)
        else:
            _check_length(declared, size - start)
    except ValueError as error:
        raise InputError(path, str(error)) from None


def _metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """The fields of a MetaImage header, in order, and the byte offset where its LOCAL data starts.

    Raises ValueError for anything MetaIO would parse differently or unsafely: a line that is not
    ``Key = value`` text, a line longer than MetaIO's buffers, a repeated key, no ElementDataFile."""
    with open(path, "rb") as file:
        head = file.read(_MAX_TEXT_HEADER)
    fields: dict[str, str] = {}
    offset, number = 0, 0
    while "ElementDataFile" not in fields:
        end = head.find(b"\n", offset)
        if end < 0 and len(head) == _MAX_TEXT_HEADER:
            raise ValueError(f"no ElementDataFile line in the first {_MAX_TEXT_HEADER:,} bytes of the header")
        if offset >= len(head):
            raise ValueError("header has no ElementDataFile line")
        end = len(head) if end < 0 else end + 1
        line, offset, number = head[offset:end].rstrip(b"\r\n"), end, number + 1
        if not line.strip():
            continue
        text = line.decode("latin-1")
        if len(line) >= _MAX_HEADER_LINE or any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
            raise ValueError(f"header line {number} is not a MetaImage 'Key = value' line")
        separator = min((i for i in (text.find("="), text.find(":")) if i >= 0), default=-1)
        if separator < 0:
            raise ValueError(f"header line {number} has no '=': {text[:40]!r}")
        key = text[:separator].strip()
        if key in fields:
            raise ValueError(f"header repeats {key}")
        fields[key] = text[separator:].lstrip(" \t=:").rstrip()
    return fields, offset


def _metaimage_layout(fields: dict[str, str]) -> tuple[tuple[int, ...], int, int]:
    """(DimSize, channels, bytes per value) from validated MetaImage fields."""
    if fields.get("ObjectType", "Image") != "Image":
        raise ValueError(f"ObjectType is {fields['ObjectType']!r}, not Image")
    if not _is_count(fields.get("NDims", "")):
        raise ValueError(f"NDims is {fields.get('NDims', 'missing')!r}")
    ndims = int(fields["NDims"])
    if ndims not in (2, 3, 4):
        raise ValueError(f"NDims is {ndims}: only 2D and 3D images are supported")
    keys = list(fields)
    for key in (*_MET_VECTORS, *_MET_MATRICES):
        if key not in fields:
            continue
        if keys.index(key) < keys.index("NDims"):
            raise ValueError(f"{key} comes before NDims")
        values = fields[key].split()
        count = ndims * ndims if key in _MET_MATRICES else ndims
        if len(values) != count or not all(_NUMBER.fullmatch(v) for v in values):
            raise ValueError(f"{key} must be {count} finite numbers, got {fields[key][:60]!r}")
        numbers = [float(v) for v in values]
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"{key} is not finite: {fields[key][:60]!r}")
        if key in ("ElementSpacing", "ElementSize") and 0.0 in numbers:
            raise ValueError(f"{key} is zero: {fields[key]!r}")
    if "DimSize" not in fields:
        raise ValueError("no DimSize")
    if not all(_is_count(v) and int(v) > 0 for v in fields["DimSize"].split()):
        raise ValueError(f"DimSize must be positive integers, got {fields['DimSize'][:60]!r}")
    dims = tuple(int(v) for v in fields["DimSize"].split())
    element = fields.get("ElementType", "")
    if element not in _MET_ITEM_SIZES:
        raise ValueError(f"ElementType {element[:30]!r} is not supported")
    channels = fields.get("ElementNumberOfChannels", "1")
    for key, low in (("ElementNumberOfChannels", 1), ("HeaderSize", -1), ("CompressedDataSize", 0)):
        value = fields.get(key, str(low))
        if not re.fullmatch(r"-?[0-9]{1,18}", value) or int(value) < low:
            raise ValueError(f"{key} is {value[:30]!r}")
    name = fields["ElementDataFile"]
    if name.startswith("LIST") or "%" in name:
        raise ValueError(f"multi-file data (ElementDataFile = {name[:40]}) is not supported")
    if not name:
        raise ValueError("ElementDataFile is empty")
    return dims, int(channels), _MET_ITEM_SIZES[element]


# ----------------------------------------------------------------------------------------------------------
# NRRD (.nrrd, .nhdr) header checks. NrrdIO follows "data file:" anywhere, replaces a NaN spacing by 1,
# and allocates the whole volume before finding that a gzip block is short; so the header's fields that
# matter are read here first. Field names are case-insensitive and may be spelt without the space, as in
# NrrdIO; the header ends at the first empty line.

_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(
        ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort"), 2
    ),
    **dict.fromkeys(("unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32"), 4),
    **dict.fromkeys(("uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "int64", "int64_t"), 8),
    **dict.fromkeys(("signed long long int", "ulonglong", "unsigned long long", "uint64", "uint64_t"), 8),
    **dict.fromkeys(("unsigned long long int", "double"), 8),
}
_NRRD_ENCODINGS = {
    "raw": "raw",
    "gz": "gzip",
    "gzip": "gzip",
    "txt": "text",
    "text": "text",
    "ascii": "text",
    "hex": "hex",
    "bz2": "bzip2",
    "bzip2": "bzip2",
}
# Axis kinds NrrdIO treats as image axes (an unknown kind counts as one); the others hold components.
_NRRD_SPATIAL_KINDS = ("domain", "space", "time", "none", "???", "unknown")


def _check_nrrd(path: Path, extension: str, budget: _Budget) -> None:
    try:
        fields, offset = _nrrd_header(path)
        sizes, itemsize, encoding = _nrrd_layout(fields)
    except ValueError as error:
        raise InputError(path, _not_readable_as(path, extension, str(error))) from None
    _check_budget(path, sizes, 1, itemsize or 1, budget)
    if itemsize is None or encoding == "text" or encoding == "hex":
        return  # NrrdIO's own checks apply: it parses the numbers one by one
    declared = math.prod(sizes) * itemsize
    try:
        data, start = (path, offset)
        if "data file" in fields:
            data, start = _data_file(path, fields["data file"], "data file"), 0
        skip = int(fields.get("byte skip", "0"))
        if int(fields.get("line skip", "0")) > 0:
            return  # line lengths unknown: NrrdIO's own checks apply
        size = data.stat().st_size
        if encoding == "gzip":
            _check_inflated(data, start, size - start, declared + max(skip, 0))
        elif skip == -1:  # the data are the last bytes of the file
            _check_length(declared, size)
        else:
            _check_length(declared, size - start - skip)
    except ValueError as error:
        raise InputError(path, str(error)) from None


def _nrrd_header(path: Path) -> tuple[dict[str, str], int]:
    """NRRD fields (lower-case names, "datafile" spelt "data file" and so on) and where attached data start."""
    with open(path, "rb") as file:
        head = file.read(_MAX_TEXT_HEADER)
    if not head.startswith(b"NRRD"):
        raise ValueError("not a NRRD file (it does not start with NRRD)")
    fields: dict[str, str] = {}
    offset = head.find(b"\n") + 1
    while offset > 0 and offset < len(head):
        end = head.find(b"\n", offset)
        if end < 0 and len(head) == _MAX_TEXT_HEADER:
            raise ValueError(f"header longer than {_MAX_TEXT_HEADER:,} bytes")
        end = len(head) if end < 0 else end + 1
        line, offset = head[offset:end].rstrip(b"\r\n").decode("latin-1"), end
        if not line:
            break  # end of the header; attached data follow
        if line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        name = " ".join(name.lower().split())
        if name in ("data file", "datafile"):
            # Checked whatever else the line holds (NrrdIO may read it as a key/value pair if it holds
            # ":="; reading it as a data file here errs on the safe side).
            fields["data file"] = value.strip()
            if fields["data file"].startswith("LIST") or "%" in fields["data file"]:
                raise ValueError(f"multi-file data (data file: {fields['data file'][:40]}) is not supported")
            continue
        if not colon or value.startswith("="):
            continue  # key:=value pairs (and what NrrdIO rejects itself)
        fields[name.replace(" ", "")] = value.strip()
    fields = {_NRRD_NAMES.get(k, k): v for k, v in fields.items()}
    return fields, offset


_NRRD_NAMES = {"byteskip": "byte skip", "lineskip": "line skip"}


def _nrrd_layout(fields: dict[str, str]) -> tuple[tuple[int, ...], int | None, str]:
    """(sizes, bytes per value or None if the type is unknown here, encoding) from NRRD fields."""
    dimension = fields.get("dimension", "")
    if not _is_count(dimension) or not 1 <= int(dimension) <= 16:
        raise ValueError(f"dimension is {dimension[:20]!r}")
    sizes_text = fields.get("sizes", "").split()
    if len(sizes_text) != int(dimension) or not all(_is_count(s) and int(s) > 0 for s in sizes_text):
        raise ValueError(f"sizes must be {dimension} positive integers, got {fields.get('sizes', '')[:60]!r}")
    sizes = tuple(int(s) for s in sizes_text)
    encoding = _NRRD_ENCODINGS.get(fields.get("encoding", "").lower(), fields.get("encoding", ""))
    if encoding == "bzip2":
        raise ValueError("bzip2 encoding is not supported (ITK's NrrdIO lacks it); use gzip or raw")
    for key in ("byte skip", "line skip"):
        value = fields.get(key, "0")
        if not re.fullmatch(r"-?[0-9]{1,18}", value) or int(value) < (-1 if key == "byte skip" else 0):
            raise ValueError(f"{key} is {value[:30]!r}")
    if "spacings" in fields:
        _check_nrrd_spacings(fields, len(sizes))
    return sizes, _NRRD_TYPES.get(" ".join(fields.get("type", "").lower().split())), encoding


def _check_nrrd_spacings(fields: dict[str, str], dimension: int) -> None:
    """A NaN spacing means "unknown" in NRRD and NrrdIO reads it as 1 mm: refused on image axes."""
    spacings = fields["spacings"].split()
    kinds = fields.get("kinds", "").lower().split()
    for axis, text in enumerate(spacings[:dimension]):
        spatial = len(kinds) != dimension or kinds[axis] in _NRRD_SPATIAL_KINDS
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"spacings holds {text[:20]!r}") from None
        if spatial and not (math.isfinite(value) and value != 0):
            raise ValueError(f"spacing of axis {axis} is {text}: the voxel size is unknown")


# ----------------------------------------------------------------------------------------------------------
# Data files named by a header, and compressed data blocks


def _data_file(header: Path, name: str, field: str) -> Path:
    """The data file ``name`` (from the header's ``field``), which must lie in the header's folder or below
    it: no absolute path, no "..", no symbolic link leading out. Refused before any reader opens it."""
    name = os.fsdecode(name.encode("latin-1"))  # the header's bytes, as the C reader hands them to open()
    shown = name if len(name) <= 80 else name[:77] + "..."
    if not name:
        raise ValueError(f"{field} is empty")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise ValueError(
            f"{field} names an absolute path ({shown}); data files must be in the header's folder"
        )
    if ".." in re.split(r"[\\/]", name):
        raise ValueError(f"{field} ({shown}) leads out of the header's folder with '..'")
    folder = header.parent.resolve()
    target = header.parent / name
    try:
        resolved = target.resolve(strict=True)
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"the data file {shown} (named by {field}) does not exist") from None
    except (OSError, RuntimeError) as error:  # RuntimeError: a link loop, on Python < 3.13
        reason = getattr(error, "strerror", None) or "symbolic link loop"
        raise ValueError(f"the data file {shown} (named by {field}) cannot be opened ({reason})") from None
    if not resolved.is_relative_to(folder):
        raise ValueError(
            f"the data file {shown} (named by {field}) is a link to a file outside the header's folder"
        )
    if not stat.S_ISREG(mode):
        raise ValueError(f"the data file {shown} (named by {field}) is not a regular file")
    try:
        with open(resolved, "rb"):
            pass
    except OSError as error:
        raise ValueError(
            f"the data file {shown} (named by {field}) cannot be opened ({error.strerror})"
        ) from None
    return resolved


def _check_inflated(path: Path, start: int, length: int, declared: int) -> None:
    """Inflate ``length`` bytes of zlib/gzip data from ``start`` in ``path`` (in chunks, never holding the
    output) and check they give at least ``declared`` bytes: readers allocate the declared size first and
    zero-fill or fail only afterwards."""
    produced = 0
    inflater = zlib.decompressobj(47)  # 32 + 15: zlib or gzip header
    with open(path, "rb") as file:
        file.seek(start)
        left = max(length, 0)
        while left > 0 and produced < declared:
            chunk = file.read(min(left, _CHUNK))
            if not chunk:
                break
            left -= len(chunk)
            try:
                while chunk and produced < declared:
                    produced += len(inflater.decompress(chunk, _CHUNK))
                    chunk = inflater.unconsumed_tail
                    if inflater.eof:  # a gzip file may hold several members one after another
                        chunk = inflater.unused_data + chunk
                        inflater = zlib.decompressobj(47)
            except zlib.error as error:
                raise ValueError(f"corrupt compressed voxel data ({error})") from None
    if produced < declared:
        raise ValueError(
            f"compressed voxel data hold {produced:,} bytes, the header declares {declared:,} "
            "(truncated or corrupt file?)"
        )


# ----------------------------------------------------------------------------------------------------------
# TIFF page check. ITK reads a multi-page TIFF as a stack of pages of the first page's size: pages of
# another size (a thumbnail, a pyramid level) would be cut or padded silently.


def _check_tiff(path: Path, extension: str) -> None:
    try:
        pages = _tiff_pages(path)
    except (ValueError, struct.error) as error:
        raise InputError(
            path, _not_readable_as(path, extension, f"broken TIFF structure ({error})")
        ) from None
    for number, page in enumerate(pages[1:], start=2):
        if page != pages[0]:
            raise InputError(
                path,
                f"page {number} is {_page(page)} but page 1 is {_page(pages[0])}: a multi-page TIFF is read as "
                "a stack of equal pages (is it a pyramid or does it hold a thumbnail?)",
            )


def _page(page: tuple[int, int, int, int]) -> str:
    width, height, samples, bits = page
    return f"{width} x {height} with {samples} sample(s) of {bits} bits"


def _tiff_pages(path: Path) -> list[tuple[int, int, int, int]]:
    """(width, height, samples per pixel, bits per sample) of every page (IFD) of a classic or BigTIFF file."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        head = file.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 8:
            return []  # not a TIFF: the reader says what it is
        (version,) = struct.unpack(order + "H", head[2:4])
        if version == 42:
            offset_format, count_format, entry_size, value_size = "I", "H", 12, 4
            (offset,) = struct.unpack(order + "I", head[4:8])
        elif version == 43 and len(head) == 16:
            offset_format, count_format, entry_size, value_size = "Q", "Q", 20, 8
            (offset,) = struct.unpack(order + "Q", head[8:16])
        else:
            return []
        pages: list[tuple[int, int, int, int]] = []
        seen: set[int] = set()
        while offset:
            if offset in seen or offset >= size:
                raise ValueError(f"page {len(pages) + 1} lies at {offset}, outside the file or in a loop")
            seen.add(offset)
            file.seek(offset)
            count_size = struct.calcsize(count_format)
            (count,) = struct.unpack(order + count_format, file.read(count_size))
            if count * entry_size > size:
                raise ValueError(f"page {len(pages) + 1} declares {count} tags")
            entries = file.read(count * entry_size + value_size)
            tags = {}
            for index in range(count):
                entry = entries[index * entry_size : (index + 1) * entry_size]
                tag, kind = struct.unpack(order + "HH", entry[:4])
                if tag in (256, 257, 258, 277) and kind in (3, 4, 16):
                    item = {3: "H", 4: "I", 16: "Q"}[kind]
                    (values,) = struct.unpack_from(order + offset_format, entry, 4)
                    if values * struct.calcsize(item) <= value_size:
                        (tags[tag],) = struct.unpack_from(order + item, entry, 4 + value_size)
                    else:  # several values (BitsPerSample of RGB): the field holds their offset
                        (where,) = struct.unpack_from(order + offset_format, entry, 4 + value_size)
                        here = file.tell()
                        file.seek(where)
                        (tags[tag],) = struct.unpack(order + item, file.read(struct.calcsize(item)))
                        file.seek(here)
            (offset,) = struct.unpack(order + offset_format, entries[count * entry_size :])
            pages.append((tags.get(256, 0), tags.get(257, 0), tags.get(277, 1), tags.get(258, 1)))
    return pages


# ----------------------------------------------------------------------------------------------------------
# DICOM series. GDCM's folder scan silently drops files around a broken link, a device or a truncated file,
# and ITK stacks whatever it gets along the first slice's normal; so the folder is listed here first, every
# DICOM file must end up in a series, and the slices must share one orientation and lie evenly spaced on
# one line along the slice normal.


def _read_dicom(folder: Path, *, series: str | None, budget: _Budget, allow_nonfinite: bool) -> Volume:
    regular = _dicom_folder_files(folder)
    sitk = _sitk()
    with _itk_warnings_off(sitk):
        found = _dicom_series(sitk, folder)
        uid = _choose_series(sitk, folder, series, found)
        _check_all_dicom_read(folder, regular, found, uid)
        files = found[uid]
        first = _read_header(sitk, Path(files[0]), "GDCMImageIO", ".dcm")
        width, height, *frames = first.GetSize()  # a multi-frame file declares its frames as depth
        size = (width, height, math.prod(frames) * len(files))
        itemsize = _itemsize(sitk.GetPixelIDValueAsString(first.GetPixelID()))
        _check_header(folder, 3, size, first.GetNumberOfComponents(), itemsize, budget)
        reader = sitk.ImageSeriesReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        try:
            image = reader.Execute()
        except RuntimeError as error:
            raise InputError(folder, _series_problem(_itk_reason(error, folder), Path(files[0]))) from None
    _check_slices(folder, reader, image, files)
    metadata = {"extension": "", "series_uid": uid, "files": len(files)}
    return _to_volume(
        image, folder, _BY_NAME["dicom"], metadata, nonfinite=None, allow_nonfinite=allow_nonfinite
    )


def _series_problem(reason: str, first: Path) -> str:
    if "Size mismatch" in reason:
        return f"slices differ in size: {reason}"
    syntax = _transfer_syntax(first)
    if syntax is not None and syntax not in _UNCOMPRESSED_SYNTAXES:
        return f"cannot decode the pixel data (transfer syntax {syntax}): {reason}"
    return f"cannot read the series (truncated or corrupt file?): {reason}"


_UNCOMPRESSED_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _transfer_syntax(path: Path) -> str | None:
    """TransferSyntaxUID (0002,0010) from a DICOM file's meta header (always explicit VR little endian)."""
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
    except OSError:
        return None
    position = 132 if head[128:132] == b"DICM" else 0
    while position + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, position)
        if group != 2:
            return None
        vr = head[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,), start = struct.unpack_from("<I", head, position + 8), position + 12
        else:
            (length,), start = struct.unpack_from("<H", head, position + 6), position + 8
        if element == 0x10:
            return head[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        position = start + length
    return None


def _dicom_folder_files(folder: Path) -> list[Path]:
    """The regular files in ``folder`` (subfolders are not searched). A broken link, a link leading out of
    the folder, or a device/pipe/socket is refused: GDCM would skip other files around it, or read a file
    from elsewhere as part of the series, or block on a pipe."""
    inside = folder.resolve()
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        raise InputError(folder, f"cannot list the folder ({error.strerror or error})") from None
    files = []
    for entry in entries:
        path = Path(entry.path)
        try:
            mode = os.stat(path).st_mode  # follows links
        except OSError as error:
            raise InputError(folder, f"{entry.name}: {_os_problem(error, path)}; remove it") from None
        if stat.S_ISDIR(mode):
            continue
        if entry.is_symlink() and not path.resolve().is_relative_to(inside):
            raise InputError(
                folder, f"{entry.name} is a link to a file outside the folder; copy the file instead"
            )
        if not stat.S_ISREG(mode):
            raise InputError(
                folder, f"{entry.name} is not a regular file (a device, pipe or socket); remove it"
            )
        files.append(path)
    return files


def _dicom_series(sitk: Any, folder: Path) -> dict[str, list[str]]:
    """GDCM's series in ``folder``: SeriesInstanceUID -> its files, sorted along the slice normal."""
    try:
        return {
            uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        }
    except RuntimeError as error:  # e.g. a JPEG-compressed file whose data GDCM cannot make sense of
        reason = _itk_reason(error, folder)
        raise InputError(folder, f"GDCM cannot scan the DICOM files (a corrupt file?): {reason}") from None


def _check_all_dicom_read(folder: Path, regular: list[Path], found: dict[str, list[str]], uid: str) -> None:
    """Every file with the DICOM marker that belongs to the chosen series (or whose series cannot be told)
    must be among the files GDCM lists: GDCM silently leaves out a truncated or unreadable file, which
    would make a thinner volume, or a gap blamed on a missing slice. Files of other series that GDCM skips
    (a dose report, a structured report: no pixel data) and files without the marker are ignored."""
    read = {os.path.normpath(name) for files in found.values() for name in files}
    for path in regular:
        if os.path.normpath(path) in read or _sniff(path) != "a DICOM file":
            continue
        if _series_uid(path) in (None, uid):
            raise InputError(
                folder, f"{path.name} is a DICOM file that cannot be read (truncated or corrupt?); remove it"
            )


def _series_uid(path: Path) -> str | None:
    """SeriesInstanceUID (0020,000E) found in the first 64 KiB of a DICOM file, explicit or implicit VR
    little endian; None when it is not there (e.g. the file is cut short before it)."""
    try:
        with open(path, "rb") as file:
            head = file.read(1 << 16)
    except OSError:
        return None
    explicit = re.search(rb"\x20\x00\x0e\x00UI(..)", head, re.DOTALL)
    implicit = re.search(rb"\x20\x00\x0e\x00(....)", head, re.DOTALL)
    for match, size in ((explicit, "<H"), (implicit, "<I")):
        if match is None:
            continue
        (length,) = struct.unpack(size, match.group(1))
        value = head[match.end() : match.end() + length]
        if 0 < length <= 64 and len(value) == length and re.fullmatch(rb"[0-9.]+", value.rstrip(b"\0 ")):
            return value.rstrip(b"\0 ").decode("ascii")
    return None


def _choose_series(sitk: Any, folder: Path, series: str | None, found: dict[str, list[str]]) -> str:
    uids = list(found)
    if not uids:
        raise InputError(folder, "no DICOM series found in this folder (subfolders are not searched)")
    if series in found:
        return series
    if series is not None:
        raise InputError(
            folder, f"no DICOM series {series} here; the folder holds {_list_series(sitk, found)}"
        )
    if len(uids) == 1:
        return uids[0]
    raise InputError(
        folder,
        f"holds {len(uids)} DICOM series, choose one with series=UID (CLI: --series UID): "
        f"{_list_series(sitk, found)}",
    )


def _list_series(sitk: Any, found: dict[str, list[str]]) -> str:
    """'UID (N files, "description")' for each series; the description costs one header read per series."""
    items = []
    for uid, files in found.items():
        description = _dicom_tag(sitk, files[0], "0008|103e")
        items.append(f"{uid} ({len(files)} files" + (f', "{description}")' if description else ")"))
    return "; ".join(items)


def _dicom_tag(sitk: Any, file: str, tag: str) -> str | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else None


def _slice_vectors(reader: Any, count: int, tag: str, size: int) -> np.ndarray | None:
    """A per-slice DICOM tag holding ``size`` numbers, as a (count, size) array; None if any slice lacks it."""
    try:
        rows = [[float(v) for v in reader.GetMetaData(k, tag).split("\\")] for k in range(count)]
    except (RuntimeError, ValueError):
        return None
    return np.array(rows) if all(len(row) == size for row in rows) else None


def _check_slices(folder: Path, reader: Any, image: Any, files: list[str]) -> None:
    """Refuse a series that ITK would stack wrongly: slices with different orientations, slices drifting
    sideways (gantry tilt: a sheared volume that ITK would straighten), and uneven gaps along the slice
    normal (a missing or duplicated slice: ITK only warns and returns a wrong spacing)."""
    if len(files) < 2:
        return
    names = [Path(f).name for f in files]
    orientations = _slice_vectors(reader, len(files), "0020|0037", 6)
    if orientations is not None:
        differs = np.flatnonzero(np.any(np.abs(orientations - orientations[0]) > _ORIENTATION_ATOL, axis=1))
        if differs.size:
            k = int(differs[0])
            raise InputError(
                folder,
                f"slices have different orientations: {names[0]} {_fmt(orientations[0])} and {names[k]} "
                f"{_fmt(orientations[k])}",
            )
    positions = _slice_vectors(reader, len(files), "0020|0032", 3)
    if positions is None:
        return  # no usable ImagePositionPatient: nothing to compare
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    along = positions @ normal
    sideways = positions - np.outer(along, normal)
    drift = np.linalg.norm(sideways - sideways[0], axis=1)
    worst = int(np.argmax(drift))
    if drift[worst] > max(1e-3, _SLICE_DRIFT_PIXELS * min(image.GetSpacing()[:2])):
        angle = math.degrees(math.atan2(drift[worst], abs(along[worst] - along[0])))
        raise InputError(
            folder,
            f"slices drift sideways ({drift[worst]:.3g} mm from {names[0]} to {names[worst]}, a gantry tilt "
            f"of about {angle:.2g} degrees): resample the series onto a straight grid first",
        )
    gaps = np.diff(along)
    typical = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - typical)))
    if abs(gaps[worst] - typical) > max(1e-3, _SLICE_GAP_RTOL * abs(typical)) or abs(typical) < 1e-6:
        raise InputError(
            folder,
            f"slices are not evenly spaced: {gaps[worst]:.4g} mm between {names[worst]} and {names[worst + 1]}, "
            f"{typical:.4g} mm typically (missing or duplicated slice?)",
        )


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_image(volume: Volume, path: str | Path) -> Path:
    """Write ``volume`` to ``path`` atomically, with its geometry and dtype; return ``path``.

    The format comes from the extension (``.nii.gz`` is compressed; ``.nrrd`` and ``.mha`` are written
    single-file and compressed). PNG takes uint8/uint16 and JPEG uint8, as one 2D image (a depth-1 volume is
    written as 2D); float maps of 2D images go to ``.tif``. After writing, the file's header is read back and
    must give the volume's shape, pixel type, spacing, origin and direction, and the whole file is read back
    and must give the same voxels (JPEG, lossy: read only), else nothing is written.

    Raises ``OutputFormatError`` (also a ValueError) when the format cannot hold the volume, and
    ``OutputError`` when the file cannot be written (the previous file, if any, is left intact).
    """
    path = Path(path)
    fmt = _output_format(path)
    sitk = _sitk()
    image = _to_itk(sitk, volume, fmt, path)
    with _itk_warnings_off(sitk), atomic_path(path) as temp:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(temp))
        writer.SetImageIO(fmt.image_io)
        writer.SetUseCompression(fmt.compress)
        try:
            writer.Execute(image)
        except RuntimeError as error:
            reason = f"cannot write: {_itk_reason(error, temp, path.name)}"
            raise OutputError(path, _disk_full_hint(path, volume, reason)) from None
        reader = _check_written(sitk, image, temp, fmt, path)
        _check_voxels(sitk, image, reader, temp, fmt, path, volume)
    return path


def _check_voxels(
    sitk: Any, image: Any, reader: Any, temp: Path, fmt: _Format, path: Path, volume: Volume
) -> None:
    """Read the written file back whole: it must give the voxels written (JPEG: only read; it is lossy).

    ITK's NIfTI writer ignores a full disk (niftilib prints "wrote only N of M bytes" and carries on), leaving
    a cut file behind that only a full read finds."""
    try:
        written = _read_voxels(reader, temp, _extension(path))
    except InputError as error:
        reason = f"the written file does not read back ({error.problem.replace(temp.name, path.name)})"
        raise OutputError(path, _disk_full_hint(path, volume, reason)) from None
    expected = sitk.GetArrayViewFromImage(image)
    got = sitk.GetArrayViewFromImage(written)
    if expected.dtype.kind in "fc":
        # NaN voxels do not survive ITK's NIfTI round trip (they read back as 0): compare the finite ones.
        finite = np.isfinite(expected)
        same = got.shape == expected.shape and np.array_equal(got[finite], expected[finite])
    else:
        same = np.array_equal(got, expected)
    if fmt.name != "jpeg" and not same:
        reason = "the written file reads back with other voxel values"
        raise OutputError(path, _disk_full_hint(path, volume, reason))


def _disk_full_hint(path: Path, volume: Volume, reason: str) -> str:
    """``reason``, prefixed with "disk full" when the folder has less room than the image's raw size: ITK's
    writers fail on a full disk without saying so."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return reason
    size = np.asarray(volume.array).nbytes
    if free >= size:
        return reason
    return f"disk full: {free} bytes free in {path.parent}, the image takes up to {size} bytes ({reason})"


def _output_format(path: Path) -> _Format:
    extension = _extension(path)
    if extension in _TWO_FILE:
        raise OutputFormatError(
            path, f"{extension} keeps header and voxels in two files; write {_TWO_FILE[extension]} instead"
        )
    fmt = _BY_EXTENSION.get(extension)
    if fmt is None:
        writable = [e for e in SUPPORTED_EXTENSIONS if e not in _TWO_FILE]
        raise OutputFormatError(
            path, f"cannot write {extension or 'a file without extension'}; use {', '.join(writable)}"
        )
    return fmt


def _to_itk(sitk: Any, volume: Volume, fmt: _Format, path: Path) -> Any:
    """Volume (array order, channels first) -> SimpleITK image (x, y, z order, components per pixel)."""
    array, channel_axis = np.asarray(volume.array), volume.channel_axis
    spacing, origin, direction = volume.spacing, volume.origin, volume.direction
    if fmt.picture and volume.spatial_dims == 3 and volume.spatial_shape[0] == 1:
        array = array[:, 0] if channel_axis else array[0]  # (C, 1, y, x) -> (C, y, x)
        spacing, origin, direction = spacing[1:], origin[1:], direction[1:, 1:]
    if channel_axis and array.shape[0] == 1:
        array, channel_axis = array[0], False
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    spatial_dims = array.ndim - (1 if channel_axis else 0)
    _check_picture(fmt, path, array, spatial_dims, volume)
    image = sitk.GetImageFromArray(
        np.moveaxis(array, 0, -1) if channel_axis else array, isVector=channel_axis
    )
    _geometry_to_itk(image, spacing, origin, direction)
    return image


def _check_picture(fmt: _Format, path: Path, array: np.ndarray, spatial_dims: int, volume: Volume) -> None:
    if fmt.write_dtypes is None:
        return
    if spatial_dims == 2 and array.dtype.name in fmt.write_dtypes:
        return
    better = ".tif" if spatial_dims == 2 else ".nii.gz"
    raise OutputFormatError(
        path,
        f"{fmt.name.upper()} holds one 2D {'/'.join(fmt.write_dtypes)} image; this volume is "
        f"{volume.array.dtype} of shape {volume.array.shape}: write {better} instead",
    )


def _check_written(sitk: Any, image: Any, temp: Path, fmt: _Format, path: Path) -> Any:
    """Read the written header back: a format that cannot hold the geometry or pixel type is an error,
    never a silently misplaced mask. Returns the reader, ready to read the voxels."""
    try:
        written = _read_header(sitk, temp, fmt.image_io, _extension(path))
    except InputError as error:
        raise OutputFormatError(path, f"the written file does not read back ({error.problem})") from None
    expected = (image.GetSize(), image.GetNumberOfComponentsPerPixel(), image.GetPixelIDTypeAsString())
    found = (
        written.GetSize(),
        written.GetNumberOfComponents(),
        sitk.GetPixelIDValueAsString(written.GetPixelID()),
    )
    if expected != found:
        raise OutputFormatError(
            path,
            f"{fmt.name.upper()} cannot hold this image: it would read back as {_describe(found)} instead of "
            f"{_describe(expected)}",
        )
    wanted, got = _geometry_from_itk(image), _geometry_from_itk(written)
    checks = (
        ("spacing", np.allclose(got[0], wanted[0], rtol=_SPACING_RTOL, atol=0)),
        ("origin", np.allclose(got[1], wanted[1], rtol=1e-6, atol=_POSITION_ATOL)),
        ("direction", np.allclose(got[2], wanted[2], rtol=0, atol=_POSITION_ATOL)),
    )
    for (name, ok), want, have in zip(checks, wanted, got):
        if not ok:
            direction = wanted[2]
            skewed = not np.allclose(direction.T @ direction, np.eye(len(direction)), atol=_POSITION_ATOL)
            why = " (the direction is not orthonormal)" if skewed else ""
            others = ", ".join(e for e in (".mha", ".nrrd", ".nii.gz") if _BY_EXTENSION[e] is not fmt)
            raise OutputFormatError(
                path,
                f"{fmt.name.upper()} cannot store this {name}{why}: {_fmt(want)} would read back as "
                f"{_fmt(have)}; write {others} instead",
            )
    return written


def _describe(header: tuple[Sequence[int], int, str]) -> str:
    size, components, pixel_type = header
    return f"{' x '.join(map(str, size))} {pixel_type} with {components} component(s)"


def _fmt(value: Any) -> str:
    return np.array2string(np.asarray(value, dtype=np.float64), precision=4, separator=", ").replace("\n", "")
