"""Names: a case's name from its path, whether a path is something ``read_image`` reads, and the extension a
result is written in for an input of a given format.
"""

from __future__ import annotations

from pathlib import Path

from napari_medcl.atomic import split_suffix
from napari_medcl.io.dicom import folder_has_dicom
from napari_medcl.io.formats import BY_EXTENSION, BY_NAME


def extension_of(path: Path) -> str:
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
        return folder_has_dicom(path)
    return extension_of(path) in BY_EXTENSION


def output_extension(volume_format: str, source_extension: str, *, kind: str) -> str:
    """The extension to write a result in, for an input of ``volume_format`` (``Volume.format``).

    ``kind`` is ``"labels"`` (integer masks) or ``"map"`` (float maps). NIfTI keeps the input's ``.nii`` or
    ``.nii.gz``; NRRD and MetaImage are written single-file (``.nrrd``, ``.mha``); DICOM becomes ``.nii.gz``;
    PNG/JPEG labels become ``.png`` and float maps ``.tif`` (float32 TIFF); TIFF stays ``.tif``.
    """
    kinds = ("labels", "map")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    fmt = BY_NAME.get(volume_format)
    if fmt is None:
        raise ValueError(f"unknown volume format {volume_format!r}; known: {sorted(BY_NAME)}")
    extension = fmt.outputs[kinds.index(kind)]
    if extension:
        return extension
    source_extension = source_extension.lower()
    if source_extension not in fmt.extensions:
        raise ValueError(f"{source_extension!r} is not a {volume_format} extension {fmt.extensions}")
    return source_extension
