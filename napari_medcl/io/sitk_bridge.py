"""SimpleITK glue: loading it on first use, reading a header and its voxels, checking what ITK's header says,
and turning ITK images into Volumes and back.

Geometry is turned into array order here and only here (see ``volume.py``): SimpleITK lists spacing and
origin as (x, y, z) and its direction matrix ``D`` has ``D[:, j]`` = physical direction of index axis ``j`` in
physical (x, y, z) coordinates. In array order (z, y, x) both the index axes and the physical coordinates are
reversed, so the direction becomes ``D[::-1, ::-1]`` (``geometry_from_itk`` / ``geometry_to_itk``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import InputError
from napari_medcl.io.file_content import content_hint, not_readable_as
from napari_medcl.io.formats import ImageFormat
from napari_medcl.io.header_guard import Budget, check_budget, format_numbers
from napari_medcl.volume import Volume

# A direction matrix must have unit columns (within this) and |det| at least _MIN_DETERMINANT: a scaled or
# degenerate matrix would silently change voxel sizes or collapse an axis. Shear is allowed (see read_image).
_UNIT_ATOL = 1e-3
_MIN_DETERMINANT = 1e-3


def load_sitk() -> Any:
    import SimpleITK as sitk  # heavy: imported on first use, not with napari_medcl

    return sitk


# ITK's warning switch is process-wide: reads from several threads (napari's reader and a segmentation worker)
# would otherwise interleave their save/restore and leave the switch off for good.
_ITK_WARNINGS_LOCK = threading.RLock()


@contextmanager
def itk_warnings_off(sitk: Any) -> Iterator[None]:
    """Silence ITK's warnings on stderr (they would clutter the CLI; what matters becomes an InputError).
    The switch is process-wide, so the previous value is put back, under a lock."""
    with _ITK_WARNINGS_LOCK:
        previous = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def read_header(sitk: Any, path: Path, image_io: str, extension: str) -> Any:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(image_io)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(path, not_readable_as(path, extension, itk_reason(error, path))) from None
    return reader


def read_voxels(reader: Any, path: Path, extension: str) -> Any:
    try:
        return reader.Execute()
    except RuntimeError as error:
        reason = itk_reason(error, path)
        problem = not_readable_as(path, extension, reason)
        if problem.endswith(reason):  # no better explanation from the file's content
            problem = f"cannot read the voxel data (truncated or corrupt file?): {reason}"
        raise InputError(path, problem) from None


def check_reader(sitk: Any, path: Path, reader: Any, extension: str, budget: Budget) -> None:
    """What ITK's header says, checked before any voxel is allocated."""
    try:
        pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        if "complex" in pixel_type:
            raise InputError(path, f"complex pixels ({pixel_type}) are not supported")
        dimension = reader.GetDimension()
        size, components = reader.GetSize(), reader.GetNumberOfComponents()
        check_header(path, dimension, size, components, bytes_per_component(pixel_type), budget)
        check_geometry(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), dimension)
    except InputError as error:
        hint = content_hint(path, extension)  # e.g. NIfTI bytes named .png read as an empty PNG
        if not hint:
            raise
        raise InputError(path, error.problem + hint) from None


def bytes_per_component(pixel_type: str) -> int:
    """Bytes per component of a SimpleITK pixel type named like "vector of 16-bit signed integer"."""
    bits = re.search(r"(\d+)-bit", pixel_type)
    return int(bits.group(1)) // 8 if bits else 8


def check_header(
    path: Path,
    dimension: int,
    size: Sequence[int],
    components: int,
    itemsize: int,
    budget: Budget,
) -> None:
    """Refuse 4D and empty images and declared sizes over the budget before any voxel is allocated."""
    if dimension == 4:
        raise InputError(path, "4D images (time series) are not supported; split the volume first")
    if dimension not in (2, 3):
        raise InputError(path, f"{dimension}D images are not supported (2D or 3D only)")
    if min(size) < 1:
        raise InputError(path, f"header declares an empty image ({' x '.join(map(str, size))})")
    check_budget(path, size, components, itemsize, budget)


def check_geometry(
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
        raise InputError(
            path, f"header declares the voxel spacing {format_numbers(spacing_)}: zero or not a number"
        )
    if not np.all(np.isfinite(origin)):
        raise InputError(path, f"header declares a non-finite origin {format_numbers(origin)}")
    if not np.all(np.isfinite(matrix)):
        raise InputError(path, f"header declares a non-finite direction matrix {format_numbers(matrix)}")
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(np.abs(norms - 1.0) > _UNIT_ATOL):
        raise InputError(
            path,
            f"direction matrix columns have lengths {format_numbers(norms)}, not 1: the voxel size would be ambiguous",
        )
    if abs(np.linalg.det(matrix)) < _MIN_DETERMINANT:
        raise InputError(
            path, f"direction matrix {format_numbers(matrix)} is singular: two image axes are parallel"
        )


def to_volume(
    image: Any,
    source: Path,
    fmt: ImageFormat,
    metadata: dict[str, Any],
    *,
    nonfinite: int | None,
    allow_nonfinite: bool,
) -> Volume:
    """SimpleITK image (x, y[, z]) -> Volume (z, y, x), with components as a leading channel axis."""
    sitk = load_sitk()
    pixel_type = image.GetPixelIDTypeAsString()
    if "complex" in pixel_type:
        raise InputError(source, f"complex pixels ({pixel_type}) are not supported")
    dimension = image.GetDimension()
    check_geometry(
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
    spacing, origin, direction = geometry_from_itk(image)
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


def geometry_from_itk(image: Any) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """(spacing, origin, direction) in array order from a SimpleITK image or reader: the one reversal on read."""
    n = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(n, n)
    return tuple(image.GetSpacing())[::-1], tuple(image.GetOrigin())[::-1], direction[::-1, ::-1].copy()


def geometry_to_itk(
    image: Any, spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray
) -> None:
    """Set array-order geometry on a SimpleITK image: the one reversal on write."""
    image.SetSpacing([float(s) for s in spacing][::-1])
    image.SetOrigin([float(o) for o in origin][::-1])
    image.SetDirection(np.asarray(direction, dtype=np.float64)[::-1, ::-1].ravel().tolist())


def itk_reason(error: Exception, path: Path, name: str | None = None) -> str:
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
