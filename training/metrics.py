"""Segmentation metrics in numpy: Dice, Jaccard, pixel accuracy and HD95 in physical units.

Torch-free on purpose, so that ``medcl-evaluate`` can score an ONNX model without torch, and the training
validation Dice is the very same code the evaluation reports.

Conventions (they matter for classes that are absent from a case):

- Dice and Jaccard of a class absent from both prediction and reference are **1.0** (nothing to find,
  nothing predicted: a perfect answer); absent from one side only, they are **0.0**.
- HD95 of a class absent from both is **0.0**; absent from one side only it is **inf** (no surface to
  measure against). :func:`summarize` averages HD95 over the cases where it is finite and reports how
  many were infinite, so one missed structure does not turn a whole column into inf.
- HD95 is the 95th percentile of the pooled symmetric surface distances (both directions together, as
  medpy's ``hd95``), measured in the units of ``spacing`` (mm) between surface voxels: voxels of the mask
  with at least one face-neighbour outside it (image borders count as outside).
- Pixel accuracy is the fraction of voxels whose label equals the reference, over all classes.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CaseMetrics",
    "dice",
    "evaluate_case",
    "format_table",
    "hd95",
    "jaccard",
    "pixel_accuracy",
    "summarize",
    "write_csv",
]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape; 1.0 when both are empty."""
    pred, ref = _pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard (IoU) of two boolean masks of the same shape; 1.0 when both are empty."""
    pred, ref = _pair(pred, ref)
    union = int(np.logical_or(pred, ref).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, ref).sum()) / union


def pixel_accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of voxels where the label maps ``pred`` and ``ref`` (same shape, integer) agree."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if pred.size == 0:
        raise ValueError("cannot score an empty image")
    return float(np.mean(pred == ref))


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile Hausdorff distance between the surfaces of two boolean masks, in spacing units.

    pred, ref (*S) bool; spacing: one positive number per axis of S (None: 1 per axis).
    Both empty -> 0.0; exactly one empty -> inf.
    """
    pred, ref = _pair(pred, ref)
    spacing = _spacing(spacing, pred.ndim)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if not has_pred or not has_ref:
        return math.inf
    # Every surface voxel lies in the bounding box of the two masks; computing in that box (plus one voxel
    # so erosion sees the outside) gives the same distances at a fraction of the cost on large volumes.
    box = _bounding_box(np.logical_or(pred, ref), margin=1)
    pred, ref = pred[box], ref[box]
    surface_pred, surface_ref = _surface(pred), _surface(ref)
    distances = np.concatenate(
        [_distances_to(surface_ref, surface_pred, spacing), _distances_to(surface_pred, surface_ref, spacing)]
    )
    return float(np.percentile(distances, 95))


@dataclass(frozen=True)
class CaseMetrics:
    """The scores of one case; per-class dicts are keyed by class name (foreground classes only)."""

    case: str
    dice: dict[str, float]
    jaccard: dict[str, float]
    hd95: dict[str, float]
    accuracy: float

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values())))


def evaluate_case(
    pred: np.ndarray,
    ref: np.ndarray,
    class_names: Sequence[str],
    spacing: Sequence[float] | None = None,
    *,
    case: str = "",
    compute_hd95: bool = True,
) -> CaseMetrics:
    """Per-class Dice, Jaccard and HD95 (foreground classes 1..K-1) and pixel accuracy of one case.

    pred, ref (*S) integer label maps with values in [0, K); class_names has K entries, index 0 background.
    With ``compute_hd95=False`` (fast validation) the HD95 dict is empty.
    """
    if pred.shape != ref.shape:
        raise ValueError(
            f"{case or 'case'}: prediction shape {pred.shape} differs from reference {ref.shape}"
        )
    if len(class_names) < 2:
        raise ValueError(f"need at least 2 class names (background + one), got {list(class_names)}")
    spacing = _spacing(spacing, pred.ndim)
    scores: dict[str, dict[str, float]] = {"dice": {}, "jaccard": {}, "hd95": {}}
    for index, name in enumerate(class_names):
        if index == 0:
            continue
        p, r = pred == index, ref == index
        scores["dice"][name] = dice(p, r)
        scores["jaccard"][name] = jaccard(p, r)
        if compute_hd95:
            scores["hd95"][name] = hd95(p, r, spacing)
    return CaseMetrics(case, scores["dice"], scores["jaccard"], scores["hd95"], pixel_accuracy(pred, ref))


def summarize(cases: Sequence[CaseMetrics]) -> dict[str, dict[str, float]]:
    """Mean over cases per class and overall: ``{"dice": {class: v, ..., "mean": v}, "jaccard": ...,
    "hd95": {...}, "hd95_inf": {class: count}, "accuracy": {"mean": v}}``.

    HD95 means use finite values only (NaN when none is finite); ``hd95_inf`` counts the infinite ones.
    """
    if not cases:
        raise ValueError("no cases to summarize")
    out: dict[str, dict[str, float]] = {}
    for metric in ("dice", "jaccard", "hd95"):
        names = list(getattr(cases[0], metric))
        per_class: dict[str, float] = {}
        for name in names:
            values = np.array([getattr(c, metric)[name] for c in cases], dtype=float)
            if metric == "hd95":
                finite = values[np.isfinite(values)]
                per_class[name] = float(finite.mean()) if finite.size else math.nan
                out.setdefault("hd95_inf", {})[name] = int((~np.isfinite(values)).sum())
            else:
                per_class[name] = float(values.mean())
        if per_class:
            valid = [v for v in per_class.values() if not math.isnan(v)]
            per_class["mean"] = float(np.mean(valid)) if valid else math.nan
        out[metric] = per_class
    out["accuracy"] = {"mean": float(np.mean([c.accuracy for c in cases]))}
    return out


def write_csv(cases: Sequence[CaseMetrics], path: str | Path) -> None:
    """One row per case and class (plus a ``mean`` row per class): case, class, dice, jaccard, hd95, accuracy."""
    from napari_medcl.atomic import atomic_path

    rows = _rows(cases)
    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "class", "dice", "jaccard", "hd95", "accuracy"])
        writer.writerows(rows)


def format_table(cases: Sequence[CaseMetrics]) -> str:
    """A fixed-width text table: per case and class, then the per-class means over cases."""
    rows = [["case", "class", "dice", "jaccard", "hd95", "accuracy"], *_rows(cases)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _rows(cases: Sequence[CaseMetrics]) -> list[list[str]]:
    rows = []
    for c in cases:
        for name in c.dice:
            rows.append(
                [
                    c.case,
                    name,
                    _fmt(c.dice[name]),
                    _fmt(c.jaccard[name]),
                    _fmt(c.hd95.get(name)),
                    _fmt(c.accuracy),
                ]
            )
    summary = summarize(cases)
    for name in cases[0].dice if cases else ():
        rows.append(
            [
                "mean",
                name,
                _fmt(summary["dice"][name]),
                _fmt(summary["jaccard"][name]),
                _fmt(summary["hd95"].get(name)),
                _fmt(summary["accuracy"]["mean"]),
            ]
        )
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if math.isinf(value):
        return "inf"
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}"


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {list(spacing)}")
    return spacing


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (outside the image counts as outside)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _distances_to(target: np.ndarray, points: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Physical distance from every True voxel of ``points`` to the nearest True voxel of ``target``."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(~target, sampling=spacing)[points]
