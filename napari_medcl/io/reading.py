"""Reading an image file, or the DICOM series in a folder, as a Volume.

A file is read by the SimpleITK ImageIO its extension names in the format table, after the format's header
guard has checked it in Python: ITK's readers are not fuzzed, MetaIO has known memory-safety bugs reachable
from a malformed header, and niftilib zero-fills what is missing.
"""

from __future__ import annotations

import stat
import warnings
from pathlib import Path

from napari_medcl.errors import InputError, InputWarning
from napari_medcl.io.dicom import read_dicom
from napari_medcl.io.file_content import not_readable_as, os_problem
from napari_medcl.io.formats import BY_EXTENSION, FORMATS, SUPPORTED_EXTENSIONS, ImageFormat
from napari_medcl.io.header_guard import MAX_BYTES, MAX_VOXELS, Budget, Findings, HeaderError
from napari_medcl.io.naming import extension_of
from napari_medcl.io.sitk_bridge import (
    check_reader,
    itk_warnings_off,
    load_sitk,
    read_header,
    read_voxels,
    to_volume,
)
from napari_medcl.volume import Volume


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
    budget = Budget(max_voxels, max_bytes)
    if _path_kind(path) == "folder":
        return read_dicom(path, series=series, budget=budget, allow_nonfinite=allow_nonfinite)
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
    sitk = load_sitk()
    with itk_warnings_off(sitk):
        reader = read_header(sitk, path, fmt.image_io, extension)
        check_reader(sitk, path, reader, extension, budget)
        image = read_voxels(reader, path, extension)
    volume = to_volume(
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
        raise InputError(path, os_problem(error, path)) from None
    if stat.S_ISDIR(mode):
        return "folder"
    if not stat.S_ISREG(mode):
        raise InputError(path, "not a regular file (a device, pipe or socket)")
    return "file"


def _input_format(path: Path) -> tuple[ImageFormat, str]:
    extension = extension_of(path)
    fmt = BY_EXTENSION.get(extension)
    if fmt is None:
        read_from_folder = next((f for f in FORMATS if f.folder_files and f.folder_files == extension), None)
        hint = f"; a {read_from_folder.title} is read from its folder" if read_from_folder else ""
        shown = extension or "no extension"
        raise InputError(
            path, f"unsupported file type ({shown}); supported: {', '.join(SUPPORTED_EXTENSIONS)}{hint}"
        )
    return fmt, extension


def _check_file(path: Path, fmt: ImageFormat, extension: str, budget: Budget) -> Findings:
    """The format's own checks, in Python, before ITK parses anything."""
    if fmt.guard is None:
        return Findings()
    try:
        return fmt.guard(path, extension, budget)
    except HeaderError as error:
        raise InputError(path, not_readable_as(path, extension, str(error))) from None
    except OSError as error:  # e.g. a data file named by the header that cannot be opened
        name = Path(error.filename).name if error.filename else path.name
        raise InputError(path, f"cannot read {name} ({error.strerror or error})") from None
