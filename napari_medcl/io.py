"""Read and write medical images with their geometry, with SimpleITK for every format.

Geometry is turned into array order here and only here (see ``volume.py``): SimpleITK lists spacing and
origin as (x, y, z) and its direction matrix ``D`` has ``D[:, j]`` = physical direction of index axis ``j`` in
physical (x, y, z) coordinates. In array order (z, y, x) both the index axes and the physical coordinates are
reversed, so the direction becomes ``D[::-1, ::-1]`` (``_geometry_from_itk`` / ``_geometry_to_itk``).

Each file format is read and written by the SimpleITK ImageIO named in ``_FORMATS``, chosen from the extension
(never by probing the content), so PNG bytes named ``.nii`` are an error rather than a silently different image.
Every failure a user can cause is an ``InputError`` (reading) or ``OutputError`` (writing) whose message is one
line naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.atomic import atomic_path, split_suffix
from napari_medcl.errors import InputError, OutputError
from napari_medcl.volume import Volume

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "OutputFormatError",
    "case_name",
    "is_supported",
    "output_extension",
    "read_image",
    "sha256_file",
    "write_image",
]


class OutputFormatError(OutputError, ValueError):
    """The volume cannot be stored in the chosen output format (wrong dtype or shape, two-file format,
    geometry the format cannot hold). Nothing is written."""


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

_CHUNK = 1 << 20
# Tolerances of the read-back check after writing: loose enough for float32 headers (NIfTI) and PNG's
# 5-digit spacing, tight enough to catch a format dropping the origin, the direction or the z spacing.
_SPACING_RTOL = 1e-4
_POSITION_ATOL = 1e-4
# Slices of a DICOM series further than this from the median gap (fraction of it) mean a missing or
# duplicated slice: the volume would be stretched, and the labels misplaced.
_SLICE_GAP_RTOL = 0.01


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


def read_image(
    path: str | Path,
    *,
    series: str | None = None,
    max_voxels: int | None = 2**31,
    allow_nonfinite: bool = False,
) -> Volume:
    """Read an image file, or the DICOM series in a folder, as a Volume in array order.

    Files: ``SUPPORTED_EXTENSIONS``; the format comes from the extension. 3D formats give (z, y, x) arrays
    (a one-slice volume stays 3D); PNG/JPEG and single-page TIFF give (y, x), multi-page TIFF (z, y, x). Pixels
    with several components (RGB, RGBA, vector images) come as a leading channel axis ``(C, *S)``.
    A folder is read as a DICOM series; when it holds several, ``series`` picks one by SeriesInstanceUID.

    The header is checked before any voxel is read: more than ``max_voxels`` values (voxels x components;
    None for no limit) or a 4D image is refused. Float images with NaN/Inf voxels are refused unless
    ``allow_nonfinite`` (NIfTI: ITK 5 reads those voxels as 0, so they are counted in the file itself).

    Raises ``InputError`` (one line, naming the file) for anything wrong with the input.
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom(path, series=series, max_voxels=max_voxels, allow_nonfinite=allow_nonfinite)
    if series is not None:
        raise InputError(path, "series= only applies to a folder holding a DICOM series")
    if not path.exists():
        raise InputError(path, "no such file or folder")
    fmt, extension = _input_format(path)
    try:
        with open(path, "rb") as file:
            if not file.read(1):
                raise InputError(path, "file is empty")
    except OSError as error:
        raise InputError(path, f"cannot open the file ({error.strerror})") from None
    sitk = _sitk()
    nonfinite = _check_nifti(path, extension, max_voxels) if fmt.name == "nifti" else None
    with _itk_warnings_off(sitk):
        reader = _read_header(sitk, path, fmt.image_io, extension)
        _check_header(
            path, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), max_voxels
        )
        if extension == ".mha":
            _check_metaimage_length(path)
        image = _read_voxels(reader, path, extension)
    metadata = {"extension": extension}
    return _to_volume(image, path, fmt, metadata, nonfinite=nonfinite, allow_nonfinite=allow_nonfinite)


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


def _sitk() -> Any:
    import SimpleITK as sitk  # heavy: imported on first use, not with napari_medcl

    return sitk


@contextmanager
def _itk_warnings_off(sitk: Any) -> Iterator[None]:
    """Silence ITK's warnings on stderr (they would clutter the CLI; what matters becomes an InputError).
    The switch is process-wide, so the previous value is put back."""
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


def _check_header(
    path: Path, dimension: int, size: Sequence[int], components: int, max_voxels: int | None
) -> None:
    """Refuse 4D images and declared sizes over the budget before any voxel is allocated."""
    if dimension == 4:
        raise InputError(path, "4D images (time series) are not supported; split the volume first")
    if dimension not in (2, 3):
        raise InputError(path, f"{dimension}D images are not supported (2D or 3D only)")
    _check_budget(path, size, components, max_voxels)


def _check_budget(path: Path, size: Sequence[int], components: int, max_voxels: int | None) -> None:
    values = math.prod(size) * components
    if max_voxels is not None and values > max_voxels:
        shape = " x ".join(str(n) for n in size)
        axes = ", ".join("xyztuvw"[: len(size)])
        per_voxel = f" with {components} components" if components > 1 else ""
        raise InputError(
            path,
            f"header declares a {shape} ({axes}) image{per_voxel} = {values:,} values, over the limit of "
            f"{max_voxels:,} (max_voxels)",
        )


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
    array = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, C)
    channels = array.ndim == dimension + 1
    if channels and array.shape[-1] == 1:
        array, channels = array[..., 0], False
    if channels:
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0))  # (C, z, y, x)
    if nonfinite is None and array.dtype.kind == "f" and not allow_nonfinite:
        nonfinite = int(array.size - np.count_nonzero(np.isfinite(array)))
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
    message = f"cannot be read as {extension}: {reason}"
    content = _sniff(path)
    if content is not None and content != _EXPECTED_CONTENT.get(extension):
        message += f" (the content looks like {content}: is the extension wrong?)"
    return message


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
# NIfTI file checks. ITK's NIfTI reader zero-fills a file shorter than its header declares and (before ITK 6)
# replaces NaN/Inf voxels by 0, silently; so the header is parsed and the voxel bytes are streamed here.


@dataclass(frozen=True)
class _NiftiLayout:
    shape: tuple[int, ...]  # dim[1 : dim[0] + 1], (x, y, z, t, components...)
    compressed: bool
    offset: int  # where the voxels start, in the (decompressed) stream
    nbytes: int  # voxel bytes the header declares
    float_dtype: np.dtype | None  # set for float32/float64 data, whose NaN/Inf are counted


_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _check_nifti(path: Path, extension: str, max_voxels: int | None) -> int:
    """Parse the header, check the declared size against the budget, then stream the voxel bytes (before
    ITK sees the file, so a broken gzip stream gets a precise message). Returns the NaN/Inf count."""
    layout = _nifti_layout(path, extension)
    _check_budget(path, layout.shape, 1, max_voxels)
    return _scan_nifti(path, layout)


def _nifti_layout(path: Path, extension: str) -> _NiftiLayout:
    compressed = extension == ".nii.gz"
    try:
        with _nifti_stream(path, compressed) as stream:
            head = stream.read(540)
        return _parse_nifti_header(head, compressed)
    except ValueError as error:
        raise InputError(path, _not_readable_as(path, extension, str(error))) from None


def _parse_nifti_header(head: bytes, compressed: bool) -> _NiftiLayout:
    """Voxel layout from a NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header of either byte order."""
    endian = next(
        (e for e in "<>" if len(head) >= 4 and struct.unpack(e + "i", head[:4])[0] in (348, 540)), None
    )
    if endian is None:
        raise ValueError("not a NIfTI file (sizeof_hdr is neither 348 nor 540)")
    size = struct.unpack(endian + "i", head[:4])[0]
    if len(head) < size:
        raise ValueError(f"header is {len(head)} bytes, shorter than its {size}")
    if size == 348:
        dims = struct.unpack(endian + "8h", head[40:56])
        datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
        offset, magic = int(struct.unpack(endian + "f", head[108:112])[0]), head[344:348]
    else:
        datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
        dims = struct.unpack(endian + "8q", head[16:80])
        offset, magic = struct.unpack(endian + "q", head[168:176])[0], head[4:8]
    if magic[:3] not in (b"n+1", b"n+2"):
        raise ValueError(f"not a single-file NIfTI (magic {magic!r})")
    if not 1 <= dims[0] <= 7:
        raise ValueError(f"header dim[0] is {dims[0]}, must be 1 to 7")
    shape = dims[1 : dims[0] + 1]
    if min(shape) < 1:
        raise ValueError(f"header declares dimensions {tuple(shape)}")
    if bitpix <= 0 or bitpix % 8:
        raise ValueError(f"header declares {bitpix} bits per voxel")
    if offset < size:
        raise ValueError(f"voxel offset {offset} lies inside the {size}-byte header")
    code = _NIFTI_FLOATS.get(datatype)
    return _NiftiLayout(
        shape=tuple(shape),
        compressed=compressed,
        offset=offset,
        nbytes=math.prod(shape) * bitpix // 8,
        float_dtype=None if code is None else np.dtype(endian + code),
    )


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
            want = min(layout.nbytes - done, _CHUNK)  # _CHUNK is a multiple of every item size
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
# MetaImage (.mha) length check. MetaIO reports a short LOCAL data block as "File cannot be read ... No such
# file or directory" and prints to stderr, so the data block is measured against the header first.

_MET_ITEM_SIZES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _check_metaimage_length(path: Path) -> None:
    fields, offset = _metaimage_header(path)
    if fields.get("ElementDataFile") != "LOCAL" or "HeaderSize" in fields:
        return
    try:
        if fields.get("CompressedData", "False").lower() == "true":
            declared, what = int(fields["CompressedDataSize"]), "compressed voxel data"
        else:
            dims = [int(n) for n in fields["DimSize"].split()]
            channels = int(fields.get("ElementNumberOfChannels", "1"))
            declared, what = math.prod(dims) * channels * _MET_ITEM_SIZES[fields["ElementType"]], "voxel data"
    except (KeyError, ValueError):
        return  # unusual header: MetaIO's own checks apply
    try:
        _check_length(declared, path.stat().st_size - offset, what)
    except ValueError as error:
        raise InputError(path, str(error)) from None


def _metaimage_header(path: Path, *, max_lines: int = 200) -> tuple[dict[str, str], int]:
    """The ``key = value`` fields of a MetaImage header and the byte offset where its LOCAL data starts."""
    fields: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as file:
        for _ in range(max_lines):
            line = file.readline(4096)
            if not line:
                break
            offset += len(line)
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    return fields, offset


# ----------------------------------------------------------------------------------------------------------
# DICOM series


def _read_dicom(folder: Path, *, series: str | None, max_voxels: int | None, allow_nonfinite: bool) -> Volume:
    sitk = _sitk()
    with _itk_warnings_off(sitk):
        uid = _choose_series(sitk, folder, series)
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        first = _read_header(sitk, Path(files[0]), "GDCMImageIO", ".dcm")
        width, height, *frames = first.GetSize()  # a multi-frame file declares its frames as depth
        size = (width, height, math.prod(frames) * len(files))
        _check_header(folder, 3, size, first.GetNumberOfComponents(), max_voxels)
        reader = sitk.ImageSeriesReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        image = _read_voxels(reader, folder, "")
    _check_slice_gaps(folder, reader, image, files)
    metadata = {"extension": "", "series_uid": uid, "files": len(files)}
    return _to_volume(
        image, folder, _BY_NAME["dicom"], metadata, nonfinite=None, allow_nonfinite=allow_nonfinite
    )


def _choose_series(sitk: Any, folder: Path, series: str | None) -> str:
    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise InputError(folder, "no DICOM series found in this folder (subfolders are not searched)")
    if series in uids:
        return series
    if series is not None:
        raise InputError(
            folder, f"no DICOM series {series} here; the folder holds {_list_series(sitk, folder, uids)}"
        )
    if len(uids) == 1:
        return uids[0]
    raise InputError(
        folder,
        f"holds {len(uids)} DICOM series, choose one with series=UID (CLI: --series UID): "
        f"{_list_series(sitk, folder, uids)}",
    )


def _list_series(sitk: Any, folder: Path, uids: list[str]) -> str:
    """'UID (N files, "description")' for each series; the description costs one header read per series."""
    items = []
    for uid in uids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
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


def _check_slice_gaps(folder: Path, reader: Any, image: Any, files: list[str]) -> None:
    """Refuse a series whose slices are not evenly spaced along the slice normal (a missing or duplicated
    slice): ITK only warns, and the volume it returns has a wrong spacing."""
    try:
        positions = np.array(
            [[float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")] for k in range(len(files))]
        )
    except (RuntimeError, ValueError):
        return  # no usable ImagePositionPatient: nothing to compare
    if len(files) < 2 or positions.shape[1] != 3:
        return
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    gaps = np.diff(positions @ normal)
    typical = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - typical)))
    if abs(gaps[worst] - typical) > max(1e-3, _SLICE_GAP_RTOL * abs(typical)) or abs(typical) < 1e-6:
        names = f"{Path(files[worst]).name} and {Path(files[worst + 1]).name}"
        raise InputError(
            folder,
            f"slices are not evenly spaced: {gaps[worst]:.4g} mm between {names}, {typical:.4g} mm typically "
            "(missing or duplicated slice?)",
        )


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_image(volume: Volume, path: str | Path) -> Path:
    """Write ``volume`` to ``path`` atomically, with its geometry and dtype; return ``path``.

    The format comes from the extension (``.nii.gz`` is compressed; ``.nrrd`` and ``.mha`` are written
    single-file and compressed). PNG takes uint8/uint16 and JPEG uint8, as one 2D image (a depth-1 volume is
    written as 2D); float maps of 2D images go to ``.tif``. After writing, the file's header is read back and
    must give the volume's shape, pixel type, spacing, origin and direction, else nothing is written.

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
            raise OutputError(path, f"cannot write: {_itk_reason(error, temp, path.name)}") from None
        _check_written(sitk, image, temp, fmt, path)
    return path


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


def _check_written(sitk: Any, image: Any, temp: Path, fmt: _Format, path: Path) -> None:
    """Read the written header back: a format that cannot hold the geometry or pixel type is an error,
    never a silently misplaced mask."""
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


def _describe(header: tuple[Sequence[int], int, str]) -> str:
    size, components, pixel_type = header
    return f"{' x '.join(map(str, size))} {pixel_type} with {components} component(s)"


def _fmt(value: Any) -> str:
    return np.array2string(np.asarray(value, dtype=np.float64), precision=4, separator=", ").replace("\n", "")
