"""Writing a Volume in the format its extension names, atomically, with the file read back before it
replaces anything: a format that cannot hold the geometry, the pixel type or the voxels is an error, never a
silently misplaced mask.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.atomic import atomic_path
from napari_medcl.errors import InputError, OutputError, OutputFormatError
from napari_medcl.io.formats import BY_EXTENSION, BY_NAME, WRITABLE_EXTENSIONS, ImageFormat
from napari_medcl.io.header_guard import format_numbers
from napari_medcl.io.naming import extension_of
from napari_medcl.io.sitk_bridge import (
    geometry_from_itk,
    geometry_to_itk,
    itk_reason,
    itk_warnings_off,
    load_sitk,
    read_header,
    read_voxels,
)
from napari_medcl.volume import Volume

# Tolerances of the read-back check after writing: loose enough for float32 headers (NIfTI) and PNG's
# 5-digit spacing, tight enough to catch a format dropping the origin, the direction or the z spacing.
_SPACING_RTOL = 1e-4
# What to suggest when a format cannot store a geometry: those that store any direction matrix first.
_FULL_GEOMETRY_FIRST = ("mha", "nrrd", "nifti")
_POSITION_ATOL = 1e-4


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
    sitk = load_sitk()
    image = _to_itk(sitk, volume, fmt, path)
    with itk_warnings_off(sitk), atomic_path(path) as temp:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(temp))
        writer.SetImageIO(fmt.image_io)
        writer.SetUseCompression(fmt.compress)
        try:
            writer.Execute(image)
        except RuntimeError as error:
            reason = f"cannot write: {itk_reason(error, temp, path.name)}"
            raise OutputError(path, _disk_full_hint(path, volume, reason)) from None
        reader = _check_written(sitk, image, temp, fmt, path)
        _check_voxels(sitk, image, reader, temp, fmt, path, volume)
    return path


def _check_voxels(
    sitk: Any, image: Any, reader: Any, temp: Path, fmt: ImageFormat, path: Path, volume: Volume
) -> None:
    """Read the written file back whole: it must give the voxels written (JPEG: only read; it is lossy).

    ITK's NIfTI writer ignores a full disk (niftilib prints "wrote only N of M bytes" and carries on), leaving
    a cut file behind that only a full read finds."""
    try:
        written = read_voxels(reader, temp, extension_of(path))
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
    if not fmt.lossy and not same:
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


def _output_format(path: Path) -> ImageFormat:
    extension = extension_of(path)
    fmt = BY_EXTENSION.get(extension)
    if fmt is not None and extension in fmt.two_file:
        raise OutputFormatError(
            path,
            f"{extension} keeps header and voxels in two files; write {fmt.written_extensions[0]} instead",
        )
    if fmt is None:
        raise OutputFormatError(
            path,
            f"cannot write {extension or 'a file without extension'}; use {', '.join(WRITABLE_EXTENSIONS)}",
        )
    return fmt


def _to_itk(sitk: Any, volume: Volume, fmt: ImageFormat, path: Path) -> Any:
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
    geometry_to_itk(image, spacing, origin, direction)
    return image


def _check_picture(
    fmt: ImageFormat, path: Path, array: np.ndarray, spatial_dims: int, volume: Volume
) -> None:
    if fmt.write_dtypes is None:
        return
    if spatial_dims == 2 and array.dtype.name in fmt.write_dtypes:
        return
    better = (BY_NAME["tiff"] if spatial_dims == 2 else BY_NAME["nifti"]).written_extensions[0]
    raise OutputFormatError(
        path,
        f"{fmt.name.upper()} holds one 2D {'/'.join(fmt.write_dtypes)} image; this volume is "
        f"{volume.array.dtype} of shape {volume.array.shape}: write {better} instead",
    )


def _check_written(sitk: Any, image: Any, temp: Path, fmt: ImageFormat, path: Path) -> Any:
    """Read the written header back: a format that cannot hold the geometry or pixel type is an error,
    never a silently misplaced mask. Returns the reader, ready to read the voxels."""
    try:
        written = read_header(sitk, temp, fmt.image_io, extension_of(path))
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
    wanted, got = geometry_from_itk(image), geometry_from_itk(written)
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
            others = ", ".join(
                BY_NAME[name].written_extensions[0]
                for name in _FULL_GEOMETRY_FIRST
                if BY_NAME[name] is not fmt
            )
            raise OutputFormatError(
                path,
                f"{fmt.name.upper()} cannot store this {name}{why}: {format_numbers(want)} would read back as "
                f"{format_numbers(have)}; write {others} instead",
            )
    return written


def _describe(header: tuple[Sequence[int], int, str]) -> str:
    size, components, pixel_type = header
    return f"{' x '.join(map(str, size))} {pixel_type} with {components} component(s)"
