"""DICOM series, read from a folder. GDCM's folder scan silently drops files around a broken link, a device or
a truncated file, and ITK stacks whatever it gets along the first slice's normal; so the folder is listed here
first, every DICOM file must end up in a series, and the slices must share one orientation and lie evenly
spaced on one line along the slice normal.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import InputError
from napari_medcl.io.file_content import os_problem, sniff
from napari_medcl.io.formats import BY_NAME
from napari_medcl.io.header_guard import Budget, format_numbers
from napari_medcl.io.sitk_bridge import (
    bytes_per_component,
    check_header,
    itk_reason,
    itk_warnings_off,
    load_sitk,
    read_header,
    to_volume,
)
from napari_medcl.volume import Volume

_DICOM = BY_NAME["dicom"]
# Slices of a DICOM series further than this from the median gap (fraction of it) mean a missing or
# duplicated slice: the volume would be stretched, and the labels misplaced.
_SLICE_GAP_RTOL = 0.01
# Slice positions drifting sideways by more than this fraction of a pixel (gantry tilt) would be misplaced:
# ITK stacks the slices along the normal of the first one.
_SLICE_DRIFT_PIXELS = 0.05
# Image orientation (direction cosines) of two slices differing by more than this: mixed orientations.
_ORIENTATION_ATOL = 1e-4


def folder_has_dicom(folder: Path, *, look_at: int = 20) -> bool:
    try:
        files = [p for p in sorted(folder.iterdir()) if p.is_file()][:look_at]
    except OSError:
        return False
    return any(p.suffix.lower() == _DICOM.folder_files or sniff(p) == _DICOM.content for p in files)


def read_dicom(folder: Path, *, series: str | None, budget: Budget, allow_nonfinite: bool) -> Volume:
    regular = _dicom_folder_files(folder)
    sitk = load_sitk()
    with itk_warnings_off(sitk):
        found = _dicom_series(sitk, folder)
        uid = _choose_series(sitk, folder, series, found)
        _check_all_dicom_read(folder, regular, found, uid)
        files = found[uid]
        first = read_header(sitk, Path(files[0]), _DICOM.image_io, _DICOM.folder_files)
        width, height, *frames = first.GetSize()  # a multi-frame file declares its frames as depth
        size = (width, height, math.prod(frames) * len(files))
        itemsize = bytes_per_component(sitk.GetPixelIDValueAsString(first.GetPixelID()))
        check_header(folder, 3, size, first.GetNumberOfComponents(), itemsize, budget)
        reader = sitk.ImageSeriesReader()
        reader.SetImageIO(_DICOM.image_io)
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        try:
            image = reader.Execute()
        except RuntimeError as error:
            raise InputError(folder, _series_problem(itk_reason(error, folder), Path(files[0]))) from None
    _check_slices(folder, reader, image, files)
    metadata = {"extension": "", "series_uid": uid, "files": len(files)}
    return to_volume(image, folder, _DICOM, metadata, nonfinite=None, allow_nonfinite=allow_nonfinite)


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
            raise InputError(folder, f"{entry.name}: {os_problem(error, path)}; remove it") from None
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
        reason = itk_reason(error, folder)
        raise InputError(folder, f"GDCM cannot scan the DICOM files (a corrupt file?): {reason}") from None


def _check_all_dicom_read(folder: Path, regular: list[Path], found: dict[str, list[str]], uid: str) -> None:
    """Every file with the DICOM marker that belongs to the chosen series (or whose series cannot be told)
    must be among the files GDCM lists: GDCM silently leaves out a truncated or unreadable file, which
    would make a thinner volume, or a gap blamed on a missing slice. Files of other series that GDCM skips
    (a dose report, a structured report: no pixel data) and files without the marker are ignored."""
    read = {os.path.normpath(name) for files in found.values() for name in files}
    for path in regular:
        if os.path.normpath(path) in read or sniff(path) != _DICOM.content:
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
    reader.SetImageIO(_DICOM.image_io)
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
                f"slices have different orientations: {names[0]} {format_numbers(orientations[0])} and {names[k]} "
                f"{format_numbers(orientations[k])}",
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
