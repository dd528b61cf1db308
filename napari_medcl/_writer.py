"""napari writers: Labels and Image layers to the scan formats of the io format table (NIfTI, NRRD,
MetaImage) with the source scan's geometry.

The geometry is rebuilt from ``metadata["medcl_geometry"]`` (exact spacing, origin and oblique direction of the
file the image came from) when it still matches the layer; a layer without it is written with its scale and
translate and an identity direction. Writing is atomic (``io.write_image``): a failed save leaves any older
file untouched.

Labels of a scan opened from a DICOM series can also be saved as a DICOM Segmentation (``.dcm``,
``io.dicom_seg``) that references the series: one segment per class named in the layer's ``features``
(``index``, ``name``, as ``segment_layer`` makes them), coloured as in its colormap; a label value without a
class becomes a segment ``label N``. ``can_save_dicom_seg`` tells the widget when to offer
``DICOM_SEG_FILTER``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.layer_data import GEOMETRY_KEY, class_names

DICOM_SEG_FILTER = "DICOM Segmentation (*.dcm)"


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels: uint8 (uint16 above 255) with the source geometry."""
    return [str(write_layer_data((data, attributes, "labels"), path))]


def write_dicom_seg_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels of a DICOM series: a DICOM Segmentation referencing the series."""
    return [str(write_layer_data((data, attributes, "labels"), path))]


def write_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Image layers (e.g. an uncertainty map) with the source geometry."""
    return [str(write_layer_data((data, attributes, "image"), path))]


def write_layer_data(layer: Any, path: str | Path) -> Path:
    """Write a napari layer or LayerDataTuple to ``path``; returns the path written."""
    from napari_medcl.errors import OutputError
    from napari_medcl.io import write_image as io_write_image
    from napari_medcl.io.dicom_seg import DICOM_SEG_EXTENSION
    from napari_medcl.io.formats import SCAN_WRITE_EXTENSIONS
    from napari_medcl.layer_data import layer_kind, volume_from_layer

    path = Path(path)
    is_labels = (isinstance(layer, tuple) and len(layer) > 2 and layer[2] == "labels") or (
        not isinstance(layer, tuple) and layer_kind(layer) == "labels"
    )
    if path.name.lower().endswith(DICOM_SEG_EXTENSION):
        return _write_dicom_seg(layer, path, is_labels)
    if not path.name.lower().endswith(SCAN_WRITE_EXTENSIONS):
        raise OutputError(
            path,
            f"unsupported extension; use one of {', '.join(SCAN_WRITE_EXTENSIONS)} "
            f"(or {DICOM_SEG_EXTENSION}: DICOM SEG, for labels of a DICOM series)",
        )
    volume = volume_from_layer(layer)
    if is_labels:
        volume = volume.with_array(compact_labels(volume.array, path))
    return Path(io_write_image(volume, path))


def can_save_dicom_seg(layer: Any) -> bool:
    """True for a Labels layer (or LayerDataTuple) whose geometry says it lies on a scan read from a DICOM
    series, so that ``write_layer_data`` can save it as a DICOM SEG (``.dcm``)."""
    from napari_medcl.layer_data import layer_kind

    kind = (layer[2] if len(layer) > 2 else "image") if isinstance(layer, tuple) else layer_kind(layer)
    geometry = _layer_attribute(layer, "metadata", {}).get(GEOMETRY_KEY) or {}
    return kind == "labels" and geometry.get("format") == "dicom" and bool(geometry.get("source"))


def _write_dicom_seg(layer: Any, path: Path, is_labels: bool) -> Path:
    from napari_medcl import __version__
    from napari_medcl.errors import UsageError
    from napari_medcl.io.dicom_seg import Segment, check_seg_path, write_dicom_seg
    from napari_medcl.layer_data import PREDICTION_KEY, volume_from_layer

    check_seg_path(path)
    if not is_labels:
        raise UsageError(f"{path}: only a Labels layer can be saved as a DICOM Segmentation")
    if not can_save_dicom_seg(layer):
        raise UsageError(
            f"{path}: labels can be saved as DICOM SEG only for scans opened from a DICOM series; "
            "save them as .nii.gz, .nrrd or .mha"
        )
    volume = volume_from_layer(layer)
    if volume.format != "dicom" or volume.source is None:
        raise UsageError(
            f"{path}: the labels layer was moved or rescaled, so it no longer lies on the grid of the DICOM "
            "series it came from; reset its scale and translate to save it as DICOM SEG"
        )
    array = compact_labels(volume.array, path)
    names = class_names(layer)
    colors = _class_colors(layer)
    present = np.flatnonzero(np.bincount(array.ravel())).tolist() if array.size else []
    indices = sorted(({i for i in names if i != 0} | set(present)) - {0})
    classes = [Segment(i, names.get(i, f"label {i}"), colors.get(i)) for i in indices]
    provenance = _layer_attribute(layer, "metadata", {}).get(PREDICTION_KEY) or {}
    model = provenance.get("model") or {}
    return write_dicom_seg(
        volume.with_array(array),
        volume.source,
        classes,
        path,
        algorithm_name=str(model.get("name") or "napari-medcl"),
        algorithm_version=str(model.get("sha256") or __version__)[:64],
    )


def _layer_attribute(layer: Any, name: str, default: Any) -> Any:
    """A layer's ``metadata``, ``features`` or ``colormap``, from a napari layer or a LayerDataTuple."""
    if isinstance(layer, tuple):
        kwargs = layer[1] if len(layer) > 1 and layer[1] else {}
        value = kwargs.get(name)
    else:
        value = getattr(layer, name, None)
    return default if value is None else value


def _class_colors(layer: Any) -> dict[int, str]:
    """Label value -> ``#rrggbb`` from a direct label colormap (napari's, or the plain dict ``label_colormap``
    gives without napari); entries that are not colours are left out."""
    colormap = _layer_attribute(layer, "colormap", None)
    mapping = getattr(colormap, "color_dict", colormap)
    if not isinstance(mapping, dict):
        return {}
    colors = {}
    for key, value in mapping.items():
        if key is None:
            continue
        if isinstance(value, str):
            if value.startswith("#") and len(value) in (7, 9):
                colors[int(key)] = value[:7].lower()
            continue
        rgba = np.asarray(value, dtype=np.float64).ravel()
        if rgba.size in (3, 4) and np.all((rgba >= 0) & (rgba <= 1)):
            colors[int(key)] = "#" + "".join(f"{round(c * 255):02x}" for c in rgba[:3])
    return colors


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
