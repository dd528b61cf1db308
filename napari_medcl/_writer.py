"""napari writers: Labels and Image layers to the scan formats of the io format table (NIfTI, NRRD,
MetaImage) with the source scan's geometry.

The geometry is rebuilt from ``metadata["medcl_geometry"]`` (exact spacing, origin and oblique direction of the
file the image came from) when it still matches the layer; a layer without it is written with its scale and
translate and an identity direction. Writing is atomic (``io.write_image``): a failed save leaves any older
file untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels: uint8 (uint16 above 255) with the source geometry."""
    return [str(write_layer_data((data, attributes, "labels"), path))]


def write_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Image layers (e.g. an uncertainty map) with the source geometry."""
    return [str(write_layer_data((data, attributes, "image"), path))]


def write_layer_data(layer: Any, path: str | Path) -> Path:
    """Write a napari layer or LayerDataTuple to ``path``; returns the path written."""
    from napari_medcl.errors import OutputError
    from napari_medcl.io import write_image as io_write_image
    from napari_medcl.io.formats import SCAN_WRITE_EXTENSIONS
    from napari_medcl.layer_data import layer_kind, volume_from_layer

    path = Path(path)
    if not path.name.lower().endswith(SCAN_WRITE_EXTENSIONS):
        raise OutputError(path, f"unsupported extension; use one of {', '.join(SCAN_WRITE_EXTENSIONS)}")
    is_labels = (isinstance(layer, tuple) and len(layer) > 2 and layer[2] == "labels") or (
        not isinstance(layer, tuple) and layer_kind(layer) == "labels"
    )
    volume = volume_from_layer(layer)
    if is_labels:
        volume = volume.with_array(compact_labels(volume.array, path))
    return Path(io_write_image(volume, path))


def compact_labels(array: np.ndarray, path: Path | None = None) -> np.ndarray:
    """Labels as uint8, or uint16 when a value exceeds 255 (clear error for negative or > 65535 values)."""
    from napari_medcl.errors import OutputError

    array = np.asarray(array)
    if array.size == 0:
        return array.astype(np.uint8)
    if array.dtype.kind not in "biu":
        raise OutputError(path or Path("labels"), f"labels must be integers, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise OutputError(path or Path("labels"), f"label values {low}..{high} do not fit uint16")
    return array.astype(np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16, copy=False)


def default_labels_path(layer_or_metadata: Any, name: str = "labels") -> Path | None:
    """``<case>_labels.nii.gz`` next to the scan the layer came from (a DICOM folder: beside the folder)."""
    from napari_medcl.layer_data import GEOMETRY_KEY

    metadata = (
        layer_or_metadata
        if isinstance(layer_or_metadata, dict)
        else getattr(layer_or_metadata, "metadata", {})
    )
    source = (metadata or {}).get(GEOMETRY_KEY, {}).get("source")
    if not source:
        return None
    from napari_medcl.io import case_name

    source = Path(source)
    return source.parent / f"{case_name(source)}_{name}.nii.gz"
