"""Fit a model's calibrated error map out of fold (``medcl-calibrate --error-case``), without torch.

Each error case is a fold model (an .onnx file trained without the case) and a labelled case of a dataset.
The fold model predicts the case through the product's own ``predict`` (ONNX Runtime, fp32), the error
features of ``napari_medcl.error_model`` are computed from that Prediction, and every voxel whose label can
be wrong becomes a sample: features, and whether the label differs from the ground truth. A logistic
regression (scikit-learn, on standardised features) is fitted on a seeded random subsample of each case's
voxels; the standardisation is folded into the coefficients, so the product applies it with numpy alone.

The figures it records are measured on these out-of-fold cases: each signal's AUROC alone, the fitted
map's AUROC and expected calibration error (15 equal-width bins) in sample, and, with two or more fold
models, the same for the map fitted without each fold model's cases and scored on them.

``measure_consensus`` takes the same samples for the intensity consensus map
(``ErrorModel.consensus``), which has nothing to fit: it only records the figures measured on them, each
case's voxels weighed as the product weighs them, by the verdict the predicting model gave that case.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ErrorCase",
    "ErrorSamples",
    "collect_samples",
    "consensus_signals",
    "fit_error_model",
    "measure_consensus",
    "parse_error_case",
]

ECE_BINS = 15
DEFAULT_VOXELS_PER_CASE = 200_000
REGULARISATION_C = 1.0


@dataclass(frozen=True)
class ErrorCase:
    """A fold model and one case of a dataset it did not train on."""

    model: str
    dataset: Path
    case: str

    def label(self) -> str:
        return f"{Path(self.model).name}: {self.dataset.name}/{self.case}"


def parse_error_case(values: Sequence[str]) -> ErrorCase:
    """``[FOLD_MODEL, DATASET, CASE]`` from the command line."""
    model, dataset, case = values
    return ErrorCase(model=model, dataset=Path(dataset), case=case)


@dataclass
class ErrorSamples:
    """Sampled voxels: ``features`` (N, F) float32, ``wrong`` (N,) bool, ``group`` (N,) int (the index of
    the fold model that predicted them), ``verdict`` (N,) int8 (the index in ``napari_medcl.verdict.LEVELS``
    of their case's verdict), with per-case counts for the report."""

    features: np.ndarray
    wrong: np.ndarray
    group: np.ndarray
    per_case: list[dict[str, Any]]
    verdict: np.ndarray | None = None

    def verdict_levels(self) -> np.ndarray:
        """(N,) str: each sample's verdict level (``unknown`` when none was recorded)."""
        from napari_medcl.verdict import LEVELS

        codes = np.full(self.wrong.shape, LEVELS.index("unknown")) if self.verdict is None else self.verdict
        return np.asarray(LEVELS)[codes]


def _check_compatible(spec: Any, fold_spec: Any, model_name: str) -> None:
    from napari_medcl.errors import ModelError

    for attribute in ("class_names", "uncertainty_maps", "spatial_dims", "in_channels", "normalization"):
        if getattr(spec, attribute) != getattr(fold_spec, attribute):
            raise ModelError(
                model_name,
                f"differs from the calibrated model in {attribute} ({getattr(fold_spec, attribute)!r} vs "
                f"{getattr(spec, attribute)!r}); a fold model must be the same network trained on other cases",
            )


def collect_samples(
    spec: Any,
    cases: Sequence[ErrorCase],
    *,
    layout: str = "msd",
    voxels_per_case: int = DEFAULT_VOXELS_PER_CASE,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
    names: Sequence[str] | None = None,
) -> tuple[tuple[str, ...], ErrorSamples]:
    """The feature names (``names``, or every one of ``napari_medcl.error_model.feature_names`` of
    ``spec``) and the samples of every case. Raises ModelError (unusable or incompatible fold model),
    DatasetError (unknown case, unreadable files, a case without labels)."""
    from napari_medcl.error_model import eligible_voxels, feature_names, feature_planes
    from napari_medcl.onnx_session import open_session
    from napari_medcl.prediction import normalises_over_mask, predict
    from napari_medcl.verdict import LEVELS
    from training.data.check import read_case
    from training.data.layouts import DatasetError, discover

    names = tuple(feature_names(spec.uncertainty_maps) if names is None else names)
    rng = np.random.default_rng(seed)
    groups = {model: i for i, model in enumerate(dict.fromkeys(c.model for c in cases))}
    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    per_case = []
    layouts: dict[Path, Any] = {}
    sessions: dict[str, Any] = {}
    for number, case in enumerate(cases, 1):
        if case.model not in sessions:  # a fold model predicts several cases (its block's shifted copies)
            sessions[case.model] = open_session(
                case.model, device="cpu", backend="onnxruntime", precision="fp32"
            )
            _check_compatible(spec, sessions[case.model].spec, case.model)
        session = sessions[case.model]
        if case.dataset not in layouts:
            found = discover(layout, case.dataset)
            if found.problems:
                raise DatasetError(list(found.problems), root=found.root)
            layouts[case.dataset] = found
        found = layouts[case.dataset]
        by_id = {c.case_id: c for c in found.cases}
        if case.case not in by_id:
            raise DatasetError([f"the dataset holds no case {case.case}"], root=found.root)
        image, truth, problems = read_case(by_id[case.case], found)
        if problems or image is None or truth is None:
            raise DatasetError(problems or [f"case {case.case}: cannot be read"], root=found.root)
        progress(f"[{number}/{len(cases)}] {case.label()}: predicting")
        prediction = predict(image, session, device="cpu", backend="onnxruntime", precision="fp32")
        labels = prediction.labels.array
        eligible = eligible_voxels(image, normalises_over_mask(session.spec))
        where = np.ones(labels.shape, dtype=bool) if eligible is None else eligible
        wrong = (labels != truth)[where]
        count = int(where.sum())
        take = np.sort(rng.choice(count, size=min(count, voxels_per_case), replace=False))
        columns = np.empty((take.size, len(names)), dtype=np.float32)
        maps = {name: m.array for name, m in prediction.uncertainty_maps.items()}
        planes = feature_planes(
            names,
            labels,
            prediction.top_class_error.array,
            prediction.entropy.array,
            maps,
            prediction.labels.spacing,
            image.channels,
            eligible,
        )
        for j, (_, plane) in enumerate(planes):
            columns[:, j] = plane[where][take]
        level = "unknown" if prediction.verdict is None else prediction.verdict.level
        blocks.append(
            (
                columns,
                wrong[take],
                np.full(take.size, groups[case.model], dtype=np.int32),
                np.full(take.size, LEVELS.index(level), dtype=np.int8),
            )
        )
        per_case.append(
            {
                "case": case.label(),
                "voxels": count,
                "sampled": int(take.size),
                "error_rate": round(float(wrong.mean()) if wrong.size else 0.0, 5),
                "verdict": level,
            }
        )
        progress(f"[{number}/{len(cases)}] {case.label()}: {count} voxels, {wrong.mean():.2%} wrong")
    features = np.concatenate([b[0] for b in blocks])
    return names, ErrorSamples(
        features=features,
        wrong=np.concatenate([b[1] for b in blocks]),
        group=np.concatenate([b[2] for b in blocks]),
        per_case=per_case,
        verdict=np.concatenate([b[3] for b in blocks]),
    )


def expected_calibration_error(probability: np.ndarray, wrong: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins of ``probability`` (N,) against ``wrong``
    (N,) bool: the voxel-weighted mean |mean probability - error rate| per bin."""
    probability = np.asarray(probability, dtype=np.float64)
    index = np.minimum((probability * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.sum() * abs(probability[inside].mean() - wrong[inside].mean())
    return float(total / max(probability.size, 1))


def _fit(features: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, float]:
    """(coefficients on the raw features, intercept) of an L2 logistic regression on standardised ones."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:  # pragma: no cover - scikit-learn comes with the export extra
        from napari_medcl.errors import UsageError

        raise UsageError(
            "fitting an error map needs scikit-learn: pip install 'napari-medcl[export]'"
        ) from None
    mean = features.mean(axis=0, dtype=np.float64)
    scale = features.std(axis=0, dtype=np.float64)
    scale[scale < 1e-12] = 1.0  # a constant feature: its coefficient stays 0
    standard = (features - mean) / scale
    model = LogisticRegression(C=REGULARISATION_C, max_iter=2000)
    model.fit(standard, wrong)
    coefficients = model.coef_[0] / scale
    intercept = float(model.intercept_[0] - np.sum(model.coef_[0] * mean / scale))
    return coefficients, intercept


def _probability(features: np.ndarray, coefficients: np.ndarray, intercept: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(features.astype(np.float64) @ coefficients + intercept, -60, 60)))


def _check_both_kinds(wrong: np.ndarray) -> None:
    from napari_medcl.errors import UsageError

    if wrong.all() or not wrong.any():
        raise UsageError(
            "the error cases hold no wrong voxel (or no right one): there is nothing to measure an error map "
            "on; use cases the predicting model did not train on"
        )


def _figures(
    names: Sequence[str], samples: ErrorSamples, cases: Sequence[ErrorCase], probability: np.ndarray, fit: str
) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    wrong = samples.wrong
    return {
        "cases": [c.label() for c in cases],
        "per_case": samples.per_case,
        "samples": int(wrong.size),
        "error_rate": round(float(wrong.mean()), 5),
        "signals": {
            name: round(float(roc_auc_score(wrong, samples.features[:, j])), 4)
            for j, name in enumerate(names)
        },
        "auroc": round(float(roc_auc_score(wrong, probability)), 4),
        "ece": round(expected_calibration_error(probability, wrong), 4),
        "fit": fit,
    }


def consensus_signals(spec: Any) -> tuple[str, ...]:
    """What a consensus is measured on: its own two features, then each of ``spec``'s UAFR maps (their AUROC
    alone goes into the figures, so the model summary gives every UAFR map its own figure)."""
    from napari_medcl.error_model import CONSENSUS_FEATURES, MAP_PREFIX

    return (*CONSENSUS_FEATURES, *(f"{MAP_PREFIX}{name}" for name in spec.uncertainty_maps))


def measure_consensus(
    names: Sequence[str],
    samples: ErrorSamples,
    cases: Sequence[ErrorCase],
    intensity_weight: float = 1.0,
    verdict_weights: Mapping[str, float] | None = None,
) -> Any:
    """The intensity consensus ErrorModel (its intensity model's log-odds times ``intensity_weight``, or
    ``verdict_weights``' weight on a case of that verdict) with the figures measured on ``samples``
    (collected with ``names`` starting with ``CONSENSUS_FEATURES``; the features after them, e.g. the UAFR
    maps of ``consensus_signals``, are only measured alone, as each signal's AUROC)."""
    from napari_medcl.error_model import CONSENSUS_FEATURES, ErrorModel

    if tuple(names[: len(CONSENSUS_FEATURES)]) != CONSENSUS_FEATURES:
        raise ValueError(f"the consensus is measured on {CONSENSUS_FEATURES} first, got {tuple(names)}")
    _check_both_kinds(samples.wrong)
    consensus = ErrorModel.consensus(intensity_weight=intensity_weight, verdict_weights=verdict_weights)
    levels = samples.verdict_levels()
    probability = np.empty(samples.wrong.shape, dtype=np.float64)
    for level in np.unique(levels):
        at = levels == level
        coefficients = np.asarray(consensus.coefficients_for(str(level)))
        own = samples.features[at][:, : len(CONSENSUS_FEATURES)]
        probability[at] = _probability(own, coefficients, consensus.intercept)
    fit = "none: the network's odds of error times the local intensity model's"
    if consensus.verdict_weights:
        fit += f" ({consensus.verdict_weights_text()})"
    elif intensity_weight != 1.0:
        fit += f" raised to {intensity_weight:g}"
    figures = _figures(names, samples, cases, probability, fit)
    # the map it replaces as the default, 1 - p(label), measured on the same voxels
    network = _probability(samples.features[:, :1], np.ones(1), 0.0)
    figures["ece_network_alone"] = round(expected_calibration_error(network, samples.wrong), 4)
    return consensus.with_figures(figures)


def fit_error_model(names: Sequence[str], samples: ErrorSamples, cases: Sequence[ErrorCase]) -> Any:
    """The ErrorModel fitted on ``samples`` with its out-of-fold figures (see the module docstring)."""
    from sklearn.metrics import roc_auc_score

    from napari_medcl.error_model import ErrorModel

    wrong = samples.wrong
    _check_both_kinds(wrong)
    coefficients, intercept = _fit(samples.features, wrong)
    fitted = _probability(samples.features, coefficients, intercept)
    fit = f"scikit-learn LogisticRegression (L2, C={REGULARISATION_C}) on standardised features"
    figures = _figures(names, samples, cases, fitted, fit)
    groups = np.unique(samples.group)
    if groups.size >= 2:
        held = np.empty_like(fitted)
        for g in groups:
            out = samples.group == g
            if wrong[~out].all() or not wrong[~out].any():
                break
            c, b = _fit(samples.features[~out], wrong[~out])
            held[out] = _probability(samples.features[out], c, b)
        else:
            figures["auroc_other_folds"] = round(float(roc_auc_score(wrong, held)), 4)
            figures["ece_other_folds"] = round(expected_calibration_error(held, wrong), 4)
    return ErrorModel(
        features=tuple(names),
        coefficients=tuple(float(c) for c in coefficients),
        intercept=intercept,
        figures=figures,
    )
