"""Provenance: what made a Prediction (tool, model, input, preprocessing, tiling, timings), as typed records.

``Provenance.to_dict()`` is the content of a case's ``<case>.json`` sidecar; ``case_writer.write_prediction``
fills in what only the written case knows (the input file's SHA-256, the output file names, the write time).
A Provenance is also a Mapping over that dict, so ``prediction.provenance["tiling"]["windows"]`` reads the
same as the sidecar does. Each read builds the dict anew, so what a reader changes in it is not kept; for JSON,
or for many reads, take ``to_dict()`` once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelRecord:
    """The ONNX model that ran: its file, its SHA-256 and what it predicts."""

    name: str
    path: str
    sha256: str
    spatial_dims: int
    classes: tuple[str, ...]
    uncertainty_maps: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "spatial_dims": self.spatial_dims,
            "classes": list(self.classes),
            "uncertainty_maps": list(self.uncertainty_maps),
        }


@dataclass(frozen=True)
class InputRecord:
    """The scan segmented. ``geometry`` is ``Volume.geometry_dict()``; ``sha256`` is known once the case is
    written from a file or DICOM folder (None: not hashed, and left out of the dict)."""

    path: str | None
    format: str | None
    channels: int
    geometry: Mapping[str, Any]
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        fields = {
            "path": self.path,
            "format": self.format,
            "channels": self.channels,
            "geometry": copy.deepcopy(dict(self.geometry)),
        }
        if self.sha256 is not None:
            fields["sha256"] = self.sha256
        return fields


@dataclass(frozen=True)
class PreprocessingRecord:
    """How the scan was prepared for the network: normalisation and the grid it ran on."""

    normalization: Mapping[str, Any]
    resampled: bool
    model_grid_shape: tuple[int, ...]
    model_spacing: tuple[float, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "normalization": dict(self.normalization),
            "resampled": self.resampled,
            "model_grid_shape": list(self.model_grid_shape),
            "model_spacing": None if self.model_spacing is None else list(self.model_spacing),
        }


@dataclass(frozen=True)
class TilingRecord:
    """The sliding-window pass: window shape, overlap, how many windows and network calls."""

    patch: tuple[int, ...]
    window: tuple[int, ...]
    overlap: float
    windows: int
    tta: bool
    forward_passes: int
    batch_size: int
    padded_grid: tuple[int, ...]
    importance: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "patch": list(self.patch),
            "window": list(self.window),
            "overlap": self.overlap,
            "windows": self.windows,
            "tta": self.tta,
            "forward_passes": self.forward_passes,
            "batch_size": self.batch_size,
            "padded_grid": list(self.padded_grid),
            "importance": self.importance,
        }


@dataclass(frozen=True)
class OutputNames:
    """The file names of a written case, relative to its folder; ``probabilities`` maps class name to file;
    ``report_csv`` is the case report as CSV (``medcl-predict --report-csv``); ``dicom_seg`` is the DICOM
    Segmentation of the labels (DICOM-series inputs, when asked for); ``top_class_error`` the map of 1 - the
    probability of each voxel's label; ``error_likelihood`` the calibrated map of the probability that each
    voxel's label is wrong (a model with a calibrated error map). Fields that are None are left out of the
    dict, so a case written before a field existed reads the same."""

    labels: str
    entropy: str
    uncertainty: str | None = None
    probabilities: Mapping[str, str] | None = None
    report_csv: str | None = None
    dicom_seg: str | None = None
    top_class_error: str | None = None
    error_likelihood: str | None = None

    def to_dict(self) -> dict[str, Any]:
        names: dict[str, Any] = {"labels": self.labels}
        if self.uncertainty is not None:
            names["uncertainty"] = self.uncertainty
        names["entropy"] = self.entropy
        if self.top_class_error is not None:
            names["top_class_error"] = self.top_class_error
        if self.error_likelihood is not None:
            names["error_likelihood"] = self.error_likelihood
        if self.probabilities is not None:
            names["probabilities"] = dict(self.probabilities)
        if self.report_csv is not None:
            names["report_csv"] = self.report_csv
        if self.dicom_seg is not None:
            names["dicom_seg"] = self.dicom_seg
        return names


@dataclass(frozen=True)
class Provenance(Mapping[str, Any]):
    """Everything needed to tell how a Prediction was made, and to reproduce it.

    ``timings``: seconds per stage of the prediction (``write`` added by the case writer). ``nonzero_box``:
    the (start, stop) per axis of the region the network ran on when the model normalises over the non-zero
    voxels, else None. ``roi``: the (start, stop) per axis of the region asked for (``predict_iter(region=)``;
    None: the whole image, and then absent from the dict). ``outputs``: the files of the written case (None
    until it is written). ``verdict``: the training-data check (``Verdict.to_dict()``: level, reasons, score,
    details; None: not assessed, and then absent from the dict).
    """

    version: str
    model: ModelRecord
    execution_provider: str
    device_requested: str
    intended_use: str
    input: InputRecord
    preprocessing: PreprocessingRecord
    tiling: TilingRecord
    timings: Mapping[str, float]
    nonzero_box: tuple[tuple[int, int], ...] | None
    nonzero_is_foreground: bool
    roi: tuple[tuple[int, int], ...] | None = None
    outputs: OutputNames | None = None
    tool: str = "napari-medcl"
    verdict: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's JSON object (plain dicts, lists and scalars), keys in the sidecar's order."""
        fields = {
            "tool": self.tool,
            "version": self.version,
            "model": self.model.to_dict(),
            "execution_provider": self.execution_provider,
            "device_requested": self.device_requested,
            "intended_use": self.intended_use,
            "input": self.input.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "tiling": self.tiling.to_dict(),
            "timings": dict(self.timings),
            "nonzero_box": None if self.nonzero_box is None else [list(pair) for pair in self.nonzero_box],
            "nonzero_is_foreground": self.nonzero_is_foreground,
        }
        if self.roi is not None:
            fields["roi"] = [list(pair) for pair in self.roi]
        if self.verdict is not None:
            fields["verdict"] = copy.deepcopy(dict(self.verdict))
        if self.outputs is not None:
            fields["outputs"] = self.outputs.to_dict()
        return fields

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        """The Provenance whose ``to_dict()`` is ``data`` (a sidecar's JSON, or what medcl-serve sends)."""
        model, given = data["model"], data["input"]
        prep, tiling, outputs = data["preprocessing"], data["tiling"], data.get("outputs")
        spacing = prep["model_spacing"]
        return cls(
            version=data["version"],
            model=ModelRecord(
                name=model["name"],
                path=model["path"],
                sha256=model["sha256"],
                spatial_dims=model["spatial_dims"],
                classes=tuple(model["classes"]),
                uncertainty_maps=tuple(model["uncertainty_maps"]),
            ),
            execution_provider=data["execution_provider"],
            device_requested=data["device_requested"],
            intended_use=data["intended_use"],
            input=InputRecord(
                path=given["path"],
                format=given["format"],
                channels=given["channels"],
                geometry=copy.deepcopy(dict(given["geometry"])),
                sha256=given.get("sha256"),
            ),
            preprocessing=PreprocessingRecord(
                normalization=dict(prep["normalization"]),
                resampled=prep["resampled"],
                model_grid_shape=tuple(prep["model_grid_shape"]),
                model_spacing=None if spacing is None else tuple(spacing),
            ),
            tiling=TilingRecord(
                **{
                    **tiling,
                    "patch": tuple(tiling["patch"]),
                    "window": tuple(tiling["window"]),
                    "padded_grid": tuple(tiling["padded_grid"]),
                }
            ),
            timings=dict(data["timings"]),
            nonzero_box=_pairs(data["nonzero_box"]),
            nonzero_is_foreground=data["nonzero_is_foreground"],
            roi=_pairs(data.get("roi")),
            outputs=None if outputs is None else OutputNames(**outputs),
            tool=data.get("tool", "napari-medcl"),
            verdict=copy.deepcopy(data.get("verdict")),
        )

    # A Mapping over to_dict(): code and users that read the provenance as the sidecar's dict keep working,
    # and assigning to it raises (the typed fields are what the case writer and the CLI use).
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def _pairs(value: Any) -> tuple[tuple[int, int], ...] | None:
    """[[start, stop], ...] from JSON as a tuple of int pairs; None stays None."""
    return None if value is None else tuple((int(a), int(b)) for a, b in value)
