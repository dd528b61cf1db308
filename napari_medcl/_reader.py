"""napari reader: NIfTI, NRRD, MHA/MHD files and DICOM series folders, with their geometry.

``get_reader`` only decides (never raises): it returns None for anything it cannot read so that napari can try
other readers. Once a file is claimed, a read failure raises the io layer's one-line ``InputError`` naming the
file, which napari shows as a notification.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

LayerDataTuple = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerDataTuple]] | None:
    """The reader function for ``path`` (one path, or a list whose items we can all read), else None."""
    try:
        paths = [path] if isinstance(path, str | os.PathLike) else list(path)
        if paths and all(_claims(Path(p)) for p in paths):
            return read_paths
    except Exception:  # discovery must never raise: another reader may know the file
        return None
    return None


def read_paths(path: str | list[str]) -> list[LayerDataTuple]:
    """One Image LayerDataTuple per path (a file, or a folder holding one DICOM series)."""
    from napari_medcl.io import read_image
    from napari_medcl.layer_data import image_layer_data

    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    return [image_layer_data(read_image(p)) for p in paths]


def _claims(path: Path) -> bool:
    # Imported here: napari imports this module at start-up, and the format table brings the io package.
    from napari_medcl.io import is_supported  # cheap: looks at a few file names and DICOM markers
    from napari_medcl.io.formats import SCAN_EXTENSIONS

    if path.is_dir():
        return is_supported(path)
    return path.is_file() and path.name.lower().endswith(SCAN_EXTENSIONS)
