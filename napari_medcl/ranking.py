"""Which case to correct next: rank unlabelled scans by how much the model is expected to get wrong on them
and by how unlike its training data they are (``medcl-rank``; pure numpy + ONNX Runtime, no torch).

Each case is segmented once (``napari_medcl.predict``); two measurements come out of the prediction:

- the expected errors: the probability that each voxel's label is wrong (``Prediction.error_map``, the map
  the case report sums: the calibrated ``error_likelihood`` when the model carries an error model, else the
  model's own 1 - p(label), ``top_class_error``, uncalibrated), averaged over the voxels it labels as
  foreground (``expected_wrong_fraction``: the expected share of foreground voxels that are wrong) and summed
  into a volume (``expected_wrong``, mL, or cm2 for 2D images);
- the out-of-distribution verdict (``napari_medcl.verdict.assess``): level and severity score.

Order, most informative first: out-of-distribution, then caution, then the rest (ok, or unknown for a
model without a training-data profile); within a level, the larger expected share of wrong foreground first.
The verdict leads because the error estimate understates the errors on shifted scans (docs/uncertainty.md:
the uncalibrated map's calibration error is 0.014 on the held-out block, 0.085 on a perturbed copy; a
calibrated map is calibrated on the cases it was fitted on, not on shifted ones), so a low estimate on an
out-of-distribution scan is no reason to skip it. A scan that is empty or
constant is ranked last (nothing to label); a file that cannot be read or segmented is listed after it with
the reason, never stopping the others.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import MedclError, UsageError

__all__ = ["CSV_COLUMNS", "CaseRank", "rank_cases", "ranking_csv", "write_ranking"]

CSV_COLUMNS = (
    "rank",
    "case",
    "file",
    "status",
    "verdict",
    "verdict_score",
    "expected_wrong_percent_of_foreground",
    "expected_wrong",
    "unit",
    "foreground_voxels",
    "reason",
    "model",
    "model_sha256",
)
# Lower sorts first.
_LEVEL_ORDER = {"out-of-distribution": 0, "caution": 1, "ok": 2, "unknown": 2}
_NOTHING_TO_LABEL = 3
_FAILED = 4


@dataclass(frozen=True)
class CaseRank:
    """One case's place in the ranking. ``rank`` starts at 1; ``status`` is ``ranked`` or ``failed``
    (``reason`` then says why). ``expected_wrong_fraction``: mean of the error map (``Prediction.error_map``:
    the calibrated error likelihood, else 1 - p(label)) over the predicted foreground (over the whole image
    when there is none); ``expected_wrong``: its sum times the voxel size, in ``unit`` (mL, or cm2 for 2D
    images)."""

    rank: int
    case: str
    path: Path
    status: str
    reason: str
    verdict: str | None = None
    verdict_score: float | None = None
    expected_wrong_fraction: float | None = None
    expected_wrong: float | None = None
    unit: str | None = None
    foreground_voxels: int | None = None
    model: str | None = None
    model_sha256: str | None = None


@dataclass(frozen=True)
class _Measured:
    case: str
    path: Path
    group: int
    fraction: float
    row: dict[str, Any]


def rank_cases(
    inputs: Sequence[str | Path],
    model: Any = None,
    *,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    overlap: float = 0.5,
    on_case: Callable[[str, str | None], None] | None = None,
) -> list[CaseRank]:
    """Segment every input (image files or DICOM folders) with ``model`` (a session, a bundled name, an .onnx
    path; None: the default bundled model) and rank them, most informative first (see the module docstring).

    ``on_case(case, problem)`` is called after each case, ``problem`` None or the one-line reason it failed.
    Only an unusable model or option raises (ModelError, UsageError); a bad input becomes a failed row."""
    from napari_medcl.io import case_name
    from napari_medcl.onnx_session import open_session
    from napari_medcl.prediction import predict

    if not 0.0 <= float(overlap) < 1.0:
        raise UsageError(f"overlap must be in [0, 1), got {overlap!r}")
    session = open_session(model, device=device, backend=backend, precision=precision)
    measured: list[_Measured] = []
    for item in inputs:
        path = Path(item)
        case = case_name(path)
        try:
            prediction = predict(path, session, overlap=overlap)
        except MedclError as error:
            problem = str(error)
            measured.append(_Measured(case, path, _FAILED, 0.0, {"status": "failed", "reason": problem}))
            if on_case is not None:
                on_case(case, problem)
            continue
        measured.append(_measure(case, path, prediction, session))
        if on_case is not None:
            on_case(case, None)
    # Stable: equal keys keep the order the inputs were given in.
    ordered = sorted(measured, key=lambda m: (m.group, -m.fraction))
    return [CaseRank(rank=i + 1, case=m.case, path=m.path, **m.row) for i, m in enumerate(ordered)]


def _measure(case: str, path: Path, prediction: Any, session: Any) -> _Measured:
    labels = prediction.labels.array
    kind, error_map = prediction.error_map
    error = error_map.array
    foreground = labels > 0
    count = int(foreground.sum())
    region = foreground if count else np.ones(labels.shape, dtype=bool)
    wrong_voxels = float(error[region].sum(dtype=np.float64))
    fraction = wrong_voxels / max(1, int(region.sum()))
    spacing = prediction.labels.spacing
    three_d = len(spacing) == 3
    unit, scale = ("mL", 1e-3) if three_d else ("cm2", 1e-2)
    wrong_amount = wrong_voxels * float(np.prod(spacing)) * scale
    verdict = prediction.verdict
    level = None if verdict is None else verdict.level
    constant = verdict is not None and "constant" in (verdict.details.get("severity") or {})
    group = _NOTHING_TO_LABEL if constant else _LEVEL_ORDER.get(level or "unknown", 2)
    expected = (
        f"expected {100 * fraction:.1f}% of foreground voxels wrong ({wrong_amount:.3g} {unit})"
        if count
        else f"the model labels no foreground; expected {100 * fraction:.1f}% of voxels wrong"
    )
    if kind == "error_likelihood":
        expected += " by the model's error map"
    if constant:
        why = f"nothing to label: {'; '.join(verdict.reasons)}"
    elif level in ("out-of-distribution", "caution"):
        why = f"{level}: {'; '.join(verdict.reasons)}; {expected}"
    elif level == "ok":
        why = f"like the model's training data; {expected}"
    else:
        why = f"training-data check not possible (no profile in the model); {expected}"
    spec = session.spec
    row = {
        "status": "ranked",
        "reason": why,
        "verdict": level,
        "verdict_score": None if verdict is None else verdict.score,
        "expected_wrong_fraction": fraction,
        "expected_wrong": wrong_amount,
        "unit": unit,
        "foreground_voxels": count,
        "model": spec.name,
        "model_sha256": getattr(session, "sha256", None),
    }
    return _Measured(case, path, group, fraction, row)


def ranking_csv(ranks: Sequence[CaseRank]) -> str:
    """The ranking as CSV text: a header of :data:`CSV_COLUMNS`, one row per case in rank order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in ranks:
        percent = None if r.expected_wrong_fraction is None else round(100 * r.expected_wrong_fraction, 3)
        row = [
            r.rank,
            r.case,
            str(r.path),
            r.status,
            r.verdict,
            r.verdict_score,
            percent,
            None if r.expected_wrong is None else f"{r.expected_wrong:.6g}",
            r.unit,
            r.foreground_voxels,
            r.reason,
            r.model,
            r.model_sha256,
        ]
        writer.writerow(["" if v is None else v for v in row])
    return out.getvalue()


def write_ranking(ranks: Sequence[CaseRank], path: str | Path) -> Path:
    """Write :func:`ranking_csv` to ``path`` atomically (replaced whole, or left as it was)."""
    from napari_medcl.atomic import write_text_atomic

    return write_text_atomic(path, ranking_csv(ranks))
