"""Labels as a DICOM Segmentation object (SEG) that references the DICOM series they were made on.

The SEG is built by highdicom (imported here, only when a SEG is written or read, so that ``import
napari_medcl`` stays fast). The source series is read again with pydicom, header only, and every slice is
matched to a plane of the labels by its ImagePositionPatient: the labels must lie on the series' grid
exactly as ``read_image`` read it (same orientation, pixel spacing, rows and columns, one slice per plane),
never assumed from the file order.

Segments: one per non-background class (index 0 is not a segment), numbered 1..n in class-index order,
labelled with the class name, coloured with the class colour (recommended display CIELab). Segmentation type
BINARY: every SEG reader understands it, it exists in every highdicom we accept, and its bit-packed frames are
small; LABELMAP (one frame per slice holding segment numbers) is newer than highdicom 0.22 and still unknown to
many viewers. Frames that hold none of a segment are left out (highdicom's default), so a SEG of a few small
structures stays small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import InputError, OutputFormatError, UsageError
from napari_medcl.volume import Volume

__all__ = [
    "DICOM_SEG_EXTENSION",
    "DicomSeg",
    "Segment",
    "dicom_seg_dataset",
    "read_dicom_seg",
    "write_dicom_seg",
]

DICOM_SEG_EXTENSION = ".dcm"
MANUFACTURER = "napari-medcl"
# Slices further than this fraction of the smallest voxel side from a plane of the labels grid, or pixel
# spacings differing by more than this fraction, do not lie on the grid.
_GRID_RTOL = 0.01
# Direction cosines differing by more than this: another orientation (the tolerance of io/dicom.py).
_ORIENTATION_ATOL = 1e-4
# Type 2 attributes (present, possibly empty) that highdicom copies from the source images; a source file
# that leaves them out entirely gets them empty in the copy read here.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class Segment:
    """A class written as a segment: the label value in the labels array, its name and ``#rrggbb`` colour."""

    index: int
    name: str
    color: str | None = None


@dataclass(frozen=True)
class DicomSeg:
    """A SEG read back: ``labels`` holds segment numbers (0 outside every segment) on the referenced series'
    grid in array order; ``segment_names[k]`` names segment ``k + 1``."""

    labels: Volume
    segment_names: list[str]
    series_uid: str  # the referenced (source) series
    instance_uids: list[str]  # the referenced source instances, as listed in the SEG
    sop_instance_uid: str  # the SEG's own


def write_dicom_seg(
    labels: Volume,
    source_folder: Path,
    classes: Sequence[Any],
    path: Path,
    *,
    series_uid: str | None = None,
    algorithm_name: str,
    algorithm_version: str,
) -> Path:
    """Write integer ``labels`` (on the grid of a DICOM series in ``source_folder``) as a DICOM SEG at
    ``path`` (ending in ``.dcm``), atomically: an existing file is replaced whole or left as it was.

    ``classes``: objects with ``.index``, ``.name`` and ``.color`` (``ModelSpec.classes``); index 0 is the
    background. ``series_uid`` picks the source series; by default ``labels.metadata["series_uid"]``, else the
    folder's only series, else the one series whose grid the labels lie on. Raises ``OutputFormatError`` for a
    path not ending in ``.dcm``, ``InputError`` for a missing or unusable source folder, ``UsageError`` for
    labels off the series' grid or holding values that are not class indices, ``OutputError`` when the file
    cannot be written.
    """
    from napari_medcl.atomic import atomic_path

    path = Path(path)
    check_seg_path(path)
    dataset = dicom_seg_dataset(
        labels,
        source_folder,
        classes,
        series_uid=series_uid,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
    )
    with atomic_path(path) as temp:
        dataset.save_as(temp)
    return path


def check_seg_path(path: Path) -> None:
    """OutputFormatError unless ``path`` names a ``.dcm`` file (with a name before the extension)."""
    name = Path(path).name.lower()
    if not name.endswith(DICOM_SEG_EXTENSION) or name == DICOM_SEG_EXTENSION:
        raise OutputFormatError(path, f"a DICOM Segmentation file name must end in {DICOM_SEG_EXTENSION}")


def dicom_seg_dataset(
    labels: Volume,
    source_folder: Path,
    classes: Sequence[Any],
    *,
    series_uid: str | None = None,
    algorithm_name: str,
    algorithm_version: str,
) -> Any:
    """The ``highdicom.seg.Segmentation`` that ``write_dicom_seg`` saves (same arguments and errors)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from napari_medcl import __version__

    source_folder = Path(source_folder)
    array = _check_labels(labels, source_folder)
    segments = sorted((c for c in classes if int(c.index) != 0), key=lambda c: int(c.index))
    if not segments:
        raise UsageError(f"labels for DICOM series {source_folder}: no class besides the background to save")
    _check_values(array, segments, source_folder)
    if series_uid is None:
        series_uid = labels.metadata.get("series_uid")
    datasets = _source_datasets(source_folder, labels, series_uid)

    # Label value -> segment number (1..n, in class-index order); values without a class were refused above.
    lut = np.zeros(int(array.max(initial=0)) + 1, dtype=np.uint16 if len(segments) > 255 else np.uint8)
    for number, segment in enumerate(segments, start=1):
        if int(segment.index) < lut.size:
            lut[int(segment.index)] = number
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=algorithm_version[:64],
        source=MANUFACTURER,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(segment.name)[:64],
            # The model's classes carry names, not coded concepts: a generic category and type, the
            # meaning is in the label.
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            **_display_color(hd, getattr(segment, "color", None)),
        )
        for number, segment in enumerate(segments, start=1)
    ]
    # pixel_array[k] is the frame of datasets[k]: _source_datasets put them in the labels' plane order.
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=lut[array],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm_name[:64],
        software_versions=__version__,
        device_serial_number="none",
        series_description=f"{algorithm_name} segmentation"[:64],
    )


def read_dicom_seg(path: Path, source_folder: Path | None = None) -> DicomSeg:
    """Read a SEG written by ``write_dicom_seg`` (or another SEG of a series of single-frame images).

    With ``source_folder`` (the referenced series), ``labels`` covers that series' whole grid, as
    ``read_image`` reads it; without it, the grid spanned by the SEG's own frames, which leaves out the
    slices at either end where no segment is present. Raises ``InputError`` naming the file.
    """
    import highdicom as hd
    import pydicom

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, AttributeError) as error:
        raise InputError(path, f"not a readable DICOM Segmentation ({error})") from None
    try:
        referenced = seg.ReferencedSeriesSequence[0]
        series_uid = str(referenced.SeriesInstanceUID)
        instance_uids = [str(item.ReferencedSOPInstanceUID) for item in referenced.ReferencedInstanceSequence]
        names = [str(seg.get_segment_description(n).segment_label) for n in seg.get_segment_numbers()]
        if source_folder is None:
            labels = _volume_from_hd(seg.get_volume(combine_segments=True), path)
        else:
            datasets = _series_datasets(Path(source_folder), series_uid)
            grid = _grid_of(datasets, Path(source_folder))
            planes = seg.get_pixels_by_source_instance(
                [str(ds.SOPInstanceUID) for ds in grid.datasets], combine_segments=True
            )
            labels = Volume(
                planes, grid.spacing, grid.origin, grid.direction, source=path, format="dicom_seg"
            )
    except (AttributeError, IndexError, KeyError, ValueError, RuntimeError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(path, f"cannot read the segmentation's frames or references ({error})") from None
    return DicomSeg(
        labels=labels,
        segment_names=names,
        series_uid=series_uid,
        instance_uids=instance_uids,
        sop_instance_uid=str(seg.SOPInstanceUID),
    )


# --------------------------------------------------------------------------------------------------------------
# checks


def _check_labels(labels: Volume, folder: Path) -> np.ndarray:
    array = np.asarray(labels.array)
    if labels.channel_axis or array.ndim != 3:
        raise UsageError(
            f"labels for DICOM series {folder}: need a 3D labels array (z, y, x), got shape {array.shape}"
        )
    if array.dtype.kind not in "biu":
        raise UsageError(f"labels for DICOM series {folder}: must be integers, got dtype {array.dtype}")
    if array.size and int(array.min()) < 0:
        raise UsageError(f"labels for DICOM series {folder}: negative label value {int(array.min())}")
    return array


def _check_values(array: np.ndarray, segments: Sequence[Any], folder: Path) -> None:
    present = np.flatnonzero(np.bincount(array.ravel().astype(np.int64, copy=False)))
    unknown = sorted(set(present.tolist()) - {0} - {int(s.index) for s in segments})
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise UsageError(
            f"labels for DICOM series {folder}: label values {shown} are not among the classes "
            f"({', '.join(f'{int(s.index)}={s.name}' for s in segments) or 'background only'})"
        )


def _display_color(hd: Any, color: str | None) -> dict[str, Any]:
    """``display_color=CIELab`` for a ``#rrggbb`` colour, when this highdicom has it; else nothing."""
    if not color or not hasattr(hd, "color") or not hasattr(hd.color, "CIELabColor"):
        return {}
    try:
        return {"display_color": hd.color.CIELabColor.from_string(str(color))}
    except (ValueError, TypeError, AttributeError):
        return {}


# --------------------------------------------------------------------------------------------------------------
# the source series


@dataclass(frozen=True)
class _Grid:
    datasets: list[Any]  # one per slice, in array (z) order
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray


def _source_datasets(folder: Path, labels: Volume, series_uid: str | None) -> list[Any]:
    """The source series' datasets (header only) in the order of the labels' planes."""
    by_series = _folder_series(folder)
    if series_uid is not None:
        if series_uid not in by_series:
            raise InputError(
                folder, f"no DICOM series {series_uid} here; the folder holds {', '.join(by_series)}"
            )
        candidates = {series_uid: by_series[series_uid]}
    else:
        candidates = by_series
    problems, matches = {}, {}
    for uid, datasets in candidates.items():
        try:
            matches[uid] = _match_grid(datasets, labels, folder)
        except UsageError as error:
            problems[uid] = str(error)
    if len(matches) == 1:
        return next(iter(matches.values()))
    if matches:
        raise UsageError(
            f"labels of shape {labels.spatial_shape} lie on the grid of {len(matches)} DICOM series in {folder} "
            f"({', '.join(matches)}); choose one with series_uid (CLI: --series UID)"
        )
    if len(problems) == 1:
        raise UsageError(next(iter(problems.values())))
    raise UsageError(
        f"labels of shape {labels.spatial_shape} lie on the grid of none of the {len(problems)} DICOM series in "
        f"{folder} ({', '.join(problems)})"
    )


def _folder_series(folder: Path) -> dict[str, list[Any]]:
    import pydicom

    if not folder.is_dir():
        raise InputError(
            folder,
            "the source DICOM folder does not exist"
            if not folder.exists()
            else "is not a folder; labels can be saved as DICOM SEG only for a DICOM series folder",
        )
    series: dict[str, list[Any]] = {}
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError as error:
        raise InputError(folder, f"cannot list the folder ({error.strerror or error})") from None
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SeriesInstanceUID" in ds and "ImagePositionPatient" in ds and "PixelSpacing" in ds:
            series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    if not series:
        raise InputError(folder, "holds no DICOM image series (subfolders are not searched)")
    return series


def _series_datasets(folder: Path, series_uid: str) -> list[Any]:
    by_series = _folder_series(folder)
    if series_uid not in by_series:
        raise InputError(folder, f"does not hold the referenced DICOM series {series_uid}")
    return by_series[series_uid]


def _grid_of(datasets: list[Any], folder: Path) -> _Grid:
    """The series' grid as ``read_image`` gives it: rows along the row direction (x), columns along the
    column direction (y), slices sorted along row x column (z), all in array order (z, y, x)."""
    first = datasets[0]
    for ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(
                folder,
                f"{Path(ds.filename).name} is a multi-frame image; DICOM SEG export supports series "
                "of single-frame images",
            )
        for key in ("ImageOrientationPatient", "FrameOfReferenceUID", "StudyInstanceUID", "SOPInstanceUID"):
            if key not in ds:
                raise InputError(folder, f"{Path(ds.filename).name} has no {key}, which a DICOM SEG needs")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    for ds in datasets:
        if np.any(
            np.abs(np.asarray(ds.ImageOrientationPatient, dtype=np.float64) - orientation) > _ORIENTATION_ATOL
        ):
            raise InputError(folder, f"{Path(ds.filename).name}: slices have different orientations")
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    datasets = [datasets[k] for k in order]
    positions = positions[order]
    along = positions @ normal
    gap = float(np.median(np.diff(along))) if len(datasets) > 1 else float(first.get("SliceThickness") or 1.0)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    direction_xyz = np.column_stack([row, column, normal])  # ITK order: x, y, z
    return _Grid(
        datasets=datasets,
        spacing=(gap, row_spacing, column_spacing),
        origin=tuple(positions[0][::-1]),
        direction=direction_xyz[::-1, ::-1].copy(),  # to array order: rows and columns reversed
    )


def _match_grid(datasets: list[Any], labels: Volume, folder: Path) -> list[Any]:
    """``datasets`` in the labels' plane order, after checking slice by slice that each one's position,
    orientation, pixel spacing and size put it exactly on one plane of the labels grid."""
    uid = str(datasets[0].SeriesInstanceUID)
    where = f"labels of shape {labels.spatial_shape} do not lie on the grid of DICOM series {uid} in {folder}"
    depth, rows, columns = labels.spatial_shape
    if len(datasets) != depth:
        raise UsageError(f"{where}: {len(datasets)} slices, the labels have {depth} planes")
    tolerance = _GRID_RTOL * min(labels.spacing)
    # Array axis j (z, y, x) has physical direction labels.direction[:, j], in (z, y, x) coordinates.
    x_axis, y_axis = labels.direction[::-1, 2], labels.direction[::-1, 1]  # as x, y, z
    step = np.asarray(labels.direction) @ np.diag(labels.spacing)
    by_plane: dict[int, Any] = {}
    for ds in datasets:
        name = Path(ds.filename).name if getattr(ds, "filename", None) else str(ds.SOPInstanceUID)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(
                folder, f"{name} is a multi-frame image; DICOM SEG export supports single-frame series"
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise UsageError(
                f"{where}: {name} has {ds.Rows} x {ds.Columns} pixels, the labels {rows} x {columns}"
            )
        orientation = np.asarray(ds.get("ImageOrientationPatient", []), dtype=np.float64)
        if orientation.shape != (6,) or np.any(
            np.abs(orientation - np.r_[x_axis, y_axis]) > _ORIENTATION_ATOL
        ):
            raise UsageError(f"{where}: {name} has another orientation ({orientation.round(4).tolist()})")
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        if not np.allclose((row_spacing, column_spacing), labels.spacing[1:], rtol=_GRID_RTOL, atol=0):
            raise UsageError(
                f"{where}: {name} has pixel spacing {row_spacing:g} x {column_spacing:g} mm, the labels "
                f"{labels.spacing[1]:g} x {labels.spacing[2]:g}"
            )
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)[::-1]  # (z, y, x)
        index = np.linalg.solve(step, position - np.asarray(labels.origin))
        plane = int(round(index[0]))
        off = np.linalg.norm(step @ (index - [plane, 0, 0]))
        if off > tolerance or not 0 <= plane < depth:
            raise UsageError(
                f"{where}: {name} at {np.round(position[::-1], 3).tolist()} is on no plane of the labels"
            )
        if plane in by_plane:
            raise UsageError(f"{where}: {name} and another slice are both on plane {plane}")
        by_plane[plane] = ds
    for ds in by_plane.values():
        for key in ("FrameOfReferenceUID", "StudyInstanceUID"):
            if key not in ds:
                raise InputError(folder, f"{Path(ds.filename).name} has no {key}, which a DICOM SEG needs")
        for key in _TYPE2_COPIED:
            if key not in ds:
                setattr(ds, key, "")
    return [by_plane[k] for k in range(depth)]


def _volume_from_hd(volume: Any, path: Path) -> Volume:
    """A highdicom Volume (axes slice, row, column; affine to patient x, y, z) as a Volume in array order with
    its slice axis along row x column, as ``read_image`` orders a series."""
    array = np.asarray(volume.array)
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    direction = np.asarray(volume.direction, dtype=np.float64)  # columns: unit vectors, in x, y, z
    position = np.asarray(volume.position, dtype=np.float64)
    normal = np.cross(direction[:, 2], direction[:, 1])
    if direction[:, 0] @ normal < 0:
        position = position + direction[:, 0] * spacing[0] * (array.shape[0] - 1)
        direction = direction * [-1, 1, 1]
        array = array[::-1]
    return Volume(
        np.ascontiguousarray(array),
        tuple(spacing),
        tuple(position[::-1]),
        direction[::-1],  # rows to (z, y, x); columns are already the axes (slice, row, column)
        source=path,
        format="dicom_seg",
    )
