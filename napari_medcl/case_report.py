"""A per-case report: how much of each class was segmented, how much of it is expected to be wrong, and by
what model, in plain numbers. Pure numpy (no napari, Qt, SimpleITK or torch).

``case_report`` builds a ``CaseReport`` from label and error-likelihood arrays; ``prediction_report`` builds
one from a ``Prediction``. ``medcl-predict`` writes ``CaseReport.to_dict()`` into the case's sidecar under
``"report"`` (and with ``--report-csv`` ``CaseReport.to_csv`` as ``<case>_report.csv``); ``to_text`` gives
short lines for a widget label.

Sizes: a 3D image reports volumes in mL (voxel volume in mm^3 / 1000); a 2D image reports areas in cm^2
(pixel area in mm^2 / 100), and says so in ``measure`` and ``unit``.

Expected wrong volume of a class: the sum, over the voxels labelled with that class, of the probability that
the label is wrong, times the voxel volume. It needs a map that *is* a probability of error. For a model that
carries a calibrated error map (``ModelSpec.error_model``, fitted out of fold by ``medcl-calibrate
--error-case``) that is ``Prediction.error_likelihood``, named ``ERROR_LIKELIHOOD_NAME``. Otherwise it is the
model's own top-class complement, 1 - p(label) (``Prediction.top_class_error``, computed by every prediction
while it reduces the probabilities; ``top_class_error`` here computes 1 - max_k p_k from a probability array):
uncalibrated, the model's belief, not a measured error rate, and named so (``TOP_CLASS_ERROR_NAME``).
Normalised predictive entropy is in [0, 1] but is not a probability, so a report made from it names it and
leaves the expected wrong volume out (None).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_medcl.volume import Prediction

__all__ = [
    "ENTROPY_NAME",
    "ERROR_LIKELIHOOD_NAME",
    "ERROR_MAP_NAMES",
    "NOT_ASSESSED",
    "TOP_CLASS_ERROR_NAME",
    "VERDICT_LEVELS",
    "CaseReport",
    "ClassSize",
    "case_report",
    "prediction_report",
    "top_class_error",
]

TOP_CLASS_ERROR_NAME = "1 - probability of the label (uncalibrated)"
ERROR_LIKELIHOOD_NAME = "error likelihood"
# A probability-of-error map's name in a report, by its output kind (``Prediction.error_map``).
ERROR_MAP_NAMES = {"error_likelihood": ERROR_LIKELIHOOD_NAME, "top_class_error": TOP_CLASS_ERROR_NAME}
ENTROPY_NAME = "normalised predictive entropy (not a probability)"
NOT_ASSESSED = "not assessed: this model file carries no training-data profile"
VERDICT_LEVELS = ("ok", "caution", "out-of-distribution", "unknown")
_CHUNK = 1 << 22  # voxels per np.bincount call
_CSV_COLUMNS_BEFORE_SIZES = ("case", "class_index", "class_name", "background", "voxels")
_CSV_COLUMNS_AFTER_SIZES = (
    "unit",
    "expected_wrong_total",
    "error_likelihood",
    "verdict",
    "verdict_reasons",
    "model",
    "model_sha256",
    "tool_version",
    "execution_provider",
    "roi",
    "total_seconds",
)


@dataclass(frozen=True)
class ClassSize:
    """One class (or one label value that is no class of the model) in a case.

    ``amount``: volume in mL (3D) or area in cm^2 (2D), see ``CaseReport.unit``. ``expected_wrong``: in the
    same unit; None when the report has no error probability.
    """

    index: int
    name: str
    background: bool
    voxels: int
    amount: float
    expected_wrong: float | None


@dataclass(frozen=True)
class CaseReport:
    """What a case's segmentation holds, how much of it is expected wrong, the verdict and the model.

    ``spacing``: mm per axis, array order. ``measure``: "volume" (3D) or "area" (2D); ``unit``: "mL" or
    "cm2". ``classes``: every class of the model in index order (absent ones with 0), then any label value
    that is no class of the model. ``expected_wrong_total``: over all voxels, background included (a
    background voxel likely to be wrong is a likely missed structure); None without an error probability.
    ``error_likelihood``: the name of the map used (None: no map given); ``expected_wrong_note`` says why
    the expected wrong amounts are None when they are. ``verdict``: ok / caution / out-of-distribution /
    unknown, or None (not assessed, ``verdict_text`` says so). ``roi``: the (start, stop) per axis of the
    region asked for (provenance ``roi``), None for the whole image. ``timings``: seconds per stage.
    """

    case: str | None
    spatial_dims: int
    spacing: tuple[float, ...]
    measure: str
    unit: str
    classes: tuple[ClassSize, ...]
    expected_wrong_total: float | None
    error_likelihood: str | None
    expected_wrong_note: str | None
    verdict: str | None
    verdict_reasons: tuple[str, ...]
    model: str | None = None
    model_sha256: str | None = None
    tool_version: str | None = None
    execution_provider: str | None = None
    roi: tuple[tuple[int, int], ...] | None = None
    timings: Mapping[str, float] | None = None

    @property
    def verdict_text(self) -> str:
        """The verdict as one phrase: its level and reasons, or the plain statement that it was not assessed."""
        if self.verdict is None:
            return NOT_ASSESSED
        if not self.verdict_reasons:
            return self.verdict
        return f"{self.verdict}: {'; '.join(self.verdict_reasons)}"

    @property
    def size_key(self) -> str:
        """The name of the size field in ``to_dict`` and the CSV: ``volume_ml`` or ``area_cm2``."""
        return f"{self.measure}_{self.unit.lower()}"

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (the sidecar's ``"report"``); sizes under ``volume_ml`` and
        ``expected_wrong_ml`` (3D) or ``area_cm2`` and ``expected_wrong_cm2`` (2D)."""
        wrong_key = f"expected_wrong_{self.unit.lower()}"
        return {
            "case": self.case,
            "spatial_dims": self.spatial_dims,
            "spacing_mm": list(self.spacing),
            "measure": self.measure,
            "unit": self.unit,
            "classes": [
                {
                    "index": c.index,
                    "name": c.name,
                    "background": c.background,
                    "voxels": c.voxels,
                    self.size_key: c.amount,
                    wrong_key: c.expected_wrong,
                }
                for c in self.classes
            ],
            f"{wrong_key}_total": self.expected_wrong_total,
            "error_likelihood": self.error_likelihood,
            "expected_wrong_note": self.expected_wrong_note,
            "verdict": {
                "level": self.verdict,
                "reasons": list(self.verdict_reasons),
                "text": self.verdict_text,
            },
            "model": self.model,
            "model_sha256": self.model_sha256,
            "tool_version": self.tool_version,
            "execution_provider": self.execution_provider,
            "roi": None if self.roi is None else [list(pair) for pair in self.roi],
            "timings": None if self.timings is None else dict(self.timings),
        }

    def to_csv(self, path: str | Path) -> Path:
        """Write the report to ``path`` as CSV, atomically (an existing file is replaced whole or left as it
        was); OutputError naming ``path`` when it cannot be written.

        One header row, then one row per class: ``case, class_index, class_name, background, voxels``, the size
        (``volume_ml, expected_wrong_ml`` or ``area_cm2, expected_wrong_cm2``), then the case-level fields
        repeated on every row (``unit, expected_wrong_total, error_likelihood, verdict, verdict_reasons,
        model, model_sha256, tool_version, execution_provider, roi, total_seconds``). Empty cell: None.
        ``roi`` is JSON (``[[start, stop], ...]``), ``verdict_reasons`` joined with "; ".
        """
        from napari_medcl.atomic import write_text_atomic

        return write_text_atomic(path, self._csv_text())

    def _csv_text(self) -> str:
        wrong_key = f"expected_wrong_{self.unit.lower()}"
        case_fields = [
            self.unit,
            self.expected_wrong_total,
            self.error_likelihood,
            "not assessed" if self.verdict is None else self.verdict,
            "; ".join(self.verdict_reasons),
            self.model,
            self.model_sha256,
            self.tool_version,
            self.execution_provider,
            None if self.roi is None else json.dumps([list(pair) for pair in self.roi]),
            None if self.timings is None else self.timings.get("total"),
        ]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*_CSV_COLUMNS_BEFORE_SIZES, self.size_key, wrong_key, *_CSV_COLUMNS_AFTER_SIZES])
        for c in self.classes:
            row = [
                self.case,
                c.index,
                c.name,
                c.background,
                c.voxels,
                c.amount,
                c.expected_wrong,
                *case_fields,
            ]
            writer.writerow(["" if value is None else value for value in row])
        return out.getvalue()

    def to_text(self) -> str:
        """Short plain-text lines for a widget label: size per class, expected wrong amount, verdict, model."""
        unit = "cm²" if self.unit == "cm2" else self.unit
        elements = "voxels" if self.spatial_dims == 3 else "pixels"
        lines = []
        for c in sorted(self.classes, key=lambda c: c.background):  # structures first, background last
            tag = " (background)" if c.background and c.name.lower() != "background" else ""
            lines.append(f"{c.name}{tag}: {_number(c.amount)} {unit} ({c.voxels} {elements})")
        if self.expected_wrong_total is None:
            lines.append(f"Expected wrong {self.measure}: not computed ({self.expected_wrong_note})")
        else:
            per_class = ", ".join(
                f"{c.name} {_number(c.expected_wrong)}"
                for c in self.classes
                if not c.background and c.expected_wrong is not None
            )
            lines.append(
                f"Expected wrong {self.measure}: {_number(self.expected_wrong_total)} {unit}"
                + (f" ({per_class})" if per_class else "")
                + f", from {self.error_likelihood}"
            )
        lines.append(f"Training-data check: {self.verdict_text}")
        if self.model is not None:
            sha = f" (sha256 {self.model_sha256[:12]})" if self.model_sha256 else ""
            where = f" on {self.execution_provider}" if self.execution_provider else ""
            lines.append(f"Model: {self.model}{sha}{where}")
        return "\n".join(lines)


def top_class_error(probabilities: np.ndarray) -> np.ndarray:
    """The model's own probability that its label is wrong: 1 - max_k p_k.

    probabilities: (K, *S) class probabilities (softmax over axis 0). Returns (*S) float32 in [0, 1 - 1/K].
    Uncalibrated: it is what the model believes, not a measured error rate (``TOP_CLASS_ERROR_NAME``).
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim < 2:
        raise ValueError(f"probabilities must be (K, *S), got shape {probabilities.shape}")
    error = np.max(probabilities, axis=0).astype(np.float32, copy=False)  # a new array: changed in place
    np.subtract(np.float32(1.0), error, out=error)
    return np.clip(error, 0.0, 1.0, out=error)


def case_report(
    labels: np.ndarray,
    spacing: Iterable[float],
    classes: Any,
    *,
    error_likelihood: np.ndarray | None = None,
    error_likelihood_name: str = TOP_CLASS_ERROR_NAME,
    error_is_probability: bool = True,
    provenance: Mapping[str, Any] | None = None,
    verdict: Any = None,
    case: str | None = None,
) -> CaseReport:
    """Build the report of one case.

    labels: (*S) integer, S = (H, W) or (D, H, W). spacing: mm per axis of ``labels``, array order. classes:
    the model's classes: objects with ``.index`` and ``.name`` (``spec.ClassInfo``), a mapping index -> name,
    or names in index order; index 0 is background. error_likelihood: (*S) float in [0, 1], the probability
    that each voxel's label is wrong (``Prediction.error_map``), named ``error_likelihood_name``; None: no
    expected wrong amounts. ``error_is_probability=False`` for a map in [0, 1] that is not a probability
    (normalised entropy): it is named in the report, and the expected wrong amounts are None. provenance:
    ``Provenance`` or its ``to_dict()`` (model name and SHA-256, tool version, execution provider, roi,
    timings are read from it). verdict: None (not assessed), or an object with ``.level`` and ``.reasons``, or
    a dict with those keys; level one of ``VERDICT_LEVELS``.

    Raises ValueError on shapes that disagree (both shapes in the message), negative or non-integer labels,
    an error likelihood outside [0, 1] or not finite, an unknown verdict level.
    """
    labels = np.asarray(labels)
    spacing = tuple(float(s) for s in spacing)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be 2D (H, W) or 3D (D, H, W), got shape {labels.shape}")
    if len(spacing) != labels.ndim:
        raise ValueError(
            f"spacing {spacing} has {len(spacing)} axes, labels shape {labels.shape} has {labels.ndim}"
        )
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive mm per axis, got {spacing}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be non-negative, got {labels.min()}")
    names = _class_names(classes)

    voxel_mm = float(np.prod(spacing))
    measure, unit, scale = (
        ("volume", "mL", voxel_mm / 1000.0) if labels.ndim == 3 else ("area", "cm2", voxel_mm / 100.0)
    )
    flat = labels.ravel()
    length = max(len(names), int(flat.max()) + 1 if flat.size else 0)
    counts = _bincount(flat, None, length)

    wrong: np.ndarray | None = None
    note: str | None = None
    map_name: str | None = None
    if error_likelihood is not None:
        error_likelihood = np.asarray(error_likelihood)
        if error_likelihood.shape != labels.shape:
            raise ValueError(
                f"error_likelihood shape {error_likelihood.shape} differs from labels shape {labels.shape}"
            )
        map_name = error_likelihood_name
        if error_is_probability:
            _check_unit_interval(error_likelihood)
            wrong = _bincount(flat, error_likelihood.ravel(), length)
        else:
            note = f"{error_likelihood_name} is not a probability of error"
    else:
        note = "no error likelihood was given"

    sizes = []
    for k in range(length):
        if k >= len(names) and counts[k] == 0:
            continue
        name = names.get(k, f"label {k} (not a class of the model)")
        sizes.append(
            ClassSize(
                index=k,
                name=name,
                background=k == 0,
                voxels=int(counts[k]),
                amount=float(counts[k]) * scale,
                expected_wrong=None if wrong is None else float(wrong[k]) * scale,
            )
        )
    level, reasons = _verdict(verdict)
    facts = _provenance_facts(provenance)
    return CaseReport(
        case=case,
        spatial_dims=labels.ndim,
        spacing=spacing,
        measure=measure,
        unit=unit,
        classes=tuple(sizes),
        expected_wrong_total=None if wrong is None else float(wrong.sum()) * scale,
        error_likelihood=map_name,
        expected_wrong_note=note,
        verdict=level,
        verdict_reasons=reasons,
        **facts,
    )


def prediction_report(
    prediction: Prediction, *, case: str | None = None, classes: Any = None, verdict: Any = None
) -> CaseReport:
    """The report of ``prediction``: its labels and spacing, its provenance, and as error likelihood its
    calibrated ``error_likelihood`` when the model has one (``ERROR_LIKELIHOOD_NAME``), else its
    ``top_class_error`` (1 - the probability of each voxel's label, ``TOP_CLASS_ERROR_NAME``); for a
    Prediction built without either, ``top_class_error`` of its probabilities when it holds them, else its
    normalised entropy, named as such and without expected wrong amounts. ``classes`` (see ``case_report``)
    defaults to the provenance's; ``verdict`` to the prediction's own (``Prediction.verdict``; None: not
    assessed)."""
    provenance = prediction.provenance
    if verdict is None:
        verdict = getattr(prediction, "verdict", None)
    if classes is None:
        if provenance is None:
            raise ValueError("name the classes: the prediction has no provenance to read them from")
        classes = provenance.model.classes
    error_map = prediction.error_map
    if error_map is not None:
        kind, output = error_map
        error, name, is_probability = output.array, ERROR_MAP_NAMES[kind], True
    elif prediction.probabilities is not None:
        error, name, is_probability = (
            top_class_error(prediction.probabilities.array),
            TOP_CLASS_ERROR_NAME,
            True,
        )
    else:
        error, name, is_probability = prediction.entropy.array, ENTROPY_NAME, False
    return case_report(
        prediction.labels.array,
        prediction.labels.spacing,
        classes,
        error_likelihood=error,
        error_likelihood_name=name,
        error_is_probability=is_probability,
        provenance=provenance,
        verdict=verdict,
        case=case,
    )


def _class_names(classes: Any) -> dict[int, str]:
    """index -> name from ClassInfo-like objects, a mapping index -> name, or names in index order."""
    if isinstance(classes, Mapping):
        return {int(k): str(v) for k, v in classes.items()}
    names: dict[int, str] = {}
    for position, item in enumerate(classes):
        if isinstance(item, str):
            names[position] = item
        else:
            names[int(item.index)] = str(item.name)
    return names


def _bincount(flat: np.ndarray, weights: np.ndarray | None, length: int) -> np.ndarray:
    """np.bincount in chunks, so that its int64 (and float64 weights) copies stay small for big volumes."""
    total = np.zeros(length, dtype=np.int64 if weights is None else np.float64)
    for start in range(0, flat.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        total += np.bincount(flat[part], None if weights is None else weights[part], minlength=length)
    return total


def _check_unit_interval(values: np.ndarray) -> None:
    if values.size == 0:
        return
    low, high = float(np.min(values)), float(np.max(values))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
        raise ValueError(f"error_likelihood must be finite and in [0, 1], got values in [{low}, {high}]")


def _verdict(verdict: Any) -> tuple[str | None, tuple[str, ...]]:
    if verdict is None:
        return None, ()
    if isinstance(verdict, Mapping):
        level, reasons = verdict.get("level"), verdict.get("reasons") or ()
    else:
        level, reasons = getattr(verdict, "level", None), getattr(verdict, "reasons", None) or ()
    if level not in VERDICT_LEVELS:
        raise ValueError(f"verdict level must be one of {', '.join(VERDICT_LEVELS)}, got {level!r}")
    if isinstance(reasons, str):
        reasons = (reasons,)
    return str(level), tuple(str(r) for r in reasons)


def _provenance_facts(provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    if provenance is None:
        return {}
    model = provenance.get("model") or {}
    roi = provenance.get("roi")
    timings = provenance.get("timings")
    return {
        "model": model.get("name"),
        "model_sha256": model.get("sha256"),
        "tool_version": provenance.get("version"),
        "execution_provider": provenance.get("execution_provider"),
        "roi": None if roi is None else tuple((int(a), int(b)) for a, b in roi),
        "timings": None if timings is None else {str(k): float(v) for k, v in timings.items()},
    }


def _number(value: float | None) -> str:
    """Two decimals, or two significant digits for a small non-zero amount (0.0042, not 0.00)."""
    if value is None:
        return "-"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.2f}"
