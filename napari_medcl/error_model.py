"""The error map: the probability that each voxel's label is wrong, learned out of fold or a fixed consensus.

A model's own signals (the top-class error ``1 - p(label)``, the predictive entropy, the UAFR maps) rank
voxels by doubt but are not probabilities of error, and they miss context a reviewer uses: a voxel whose
neighbours are all uncertain, or one on the border between two labels, is more often wrong. The error model
is a logistic regression over a fixed list of per-voxel features computed from a Prediction (the signals,
their local means and maxima in millimetres, and the distance structure of the labels' borders). It is fitted
after training by ``medcl-calibrate --error-case`` on predictions of cases the predicting network never
trained on (fold models' held-out cases), and travels in the model's spec (``ModelSpec.error_model``) with the
figures measured on those cases. Applying it needs numpy and scipy only: ``predict`` adds the map to every
Prediction of such a model as ``Prediction.error_likelihood``. ``ErrorModel.consensus`` is the same logistic form
with nothing fitted: the network's log-odds of error plus those of a local intensity model of the scan
(``napari_medcl.intensity_model``), which makes it the one error map that reads the image itself. How much
the intensity model counts can depend on the scan's verdict (``napari_medcl.verdict``): a scanner shift that
makes a scan less like the training images fools the intensity model in the same places as the network, so a
consensus may temper it, or leave it out, on scans judged ``caution`` or ``out-of-distribution``.

Memory: the linear predictor is summed one feature plane at a time, so the map costs a few float32 planes on
the prediction's grid whatever the number of features.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_medcl.verdict import LEVELS

__all__ = [
    "BASE_FEATURES",
    "VERSION",
    "WEIGHTED_LEVELS",
    "ErrorModel",
    "ErrorModelError",
    "eligible_voxels",
    "feature_names",
    "feature_planes",
]

# The newest format this module reads. Version 2 added the intensity weight per verdict level; a file
# without one is still written as version 1, so that older readers keep reading it.
VERSION = 2
# Verdict levels a consensus may weigh its intensity model by: all but ``unknown``, which keeps the base
# weight (without a training-data profile nothing was judged).
WEIGHTED_LEVELS = tuple(level for level in LEVELS if level != "unknown")
MAP_PREFIX = "map:"
# Natural-log odds are clipped here: a probability of error closer to 0 or 1 than 1e-4 says nothing more.
_LOGIT_FLOOR = 1e-4

# name -> what it is; the order is the order of the design matrix's columns.
BASE_FEATURES: dict[str, str] = {
    "top_error": "1 - p(label), the model's own probability that the label is wrong",
    "top_error_logit": "log-odds of top_error",
    "entropy": "normalised predictive entropy",
    "top_error_mean_2mm": "top_error averaged with a Gaussian of sigma 2 mm",
    "top_error_max_3": "the largest top_error in the voxel's 3-voxel neighbourhood",
    "border": "1 where a face neighbour has another label",
    "border_near_2mm": "the share of border voxels nearby (Gaussian of sigma 2 mm)",
    "intensity_error_logit": "log-odds that the label is wrong under the local intensity model "
    "(napari_medcl.intensity_model: each label's intensities within 8 mm); needs the image",
}
# Features computed from the image itself, not only from the prediction.
IMAGE_FEATURES = frozenset({"intensity_error_logit"})
# The consensus map: log-odds of error = the network's + the local intensity model's (times its weight), nothing
# fitted.
CONSENSUS_FEATURES = ("top_error_logit", "intensity_error_logit")


class ErrorModelError(ValueError):
    """An error model that cannot be read or applied (named in the message)."""


def verdict_weights_problem(weights: Mapping[str, float]) -> str | None:
    """Why ``weights`` (verdict level -> intensity weight) cannot weigh a consensus (one line), or None."""
    for level, weight in weights.items():
        if level not in WEIGHTED_LEVELS:
            return f"unknown verdict level {level!r} (one of {', '.join(WEIGHTED_LEVELS)})"
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            return f"the intensity weight on {level} must be a number >= 0, got {weight!r}"
    return None


def feature_names(uncertainty_maps: Sequence[str]) -> tuple[str, ...]:
    """Every feature available for a model with these UAFR map names: the base features, then one
    ``map:<name>`` per map."""
    return (*BASE_FEATURES, *(f"{MAP_PREFIX}{name}" for name in uncertainty_maps))


def eligible_voxels(image: Any, nonzero_rule: bool) -> np.ndarray | None:
    """Voxels whose label can be wrong (spatial bool), or None for all of them: with the non-zero rule (a
    model normalising over the non-zero mask, or trained with ``nonzero_is_foreground``) every zero voxel
    is background by construction, so only the non-zero voxels of ``image`` (a Volume) are eligible."""
    return image.nonzero_mask() if nonzero_rule else None


def _mm_sigma(sigma_mm: float, spacing: Sequence[float]) -> tuple[float, ...]:
    return tuple(sigma_mm / max(float(s), 1e-6) for s in spacing)


def feature_planes(
    names: Sequence[str],
    labels: np.ndarray,
    top_error: np.ndarray,
    entropy: np.ndarray,
    maps: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    image: np.ndarray | None = None,
    eligible: np.ndarray | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, plane)`` for each feature in ``names``, in order: float32 arrays of the labels'
    spatial shape ``S``. ``labels`` (S) int, ``top_error`` and ``entropy`` (S) float in [0, 1], ``maps``
    UAFR map name -> (S) float, ``spacing`` in mm per axis of ``S``; ``image`` (C, *S) float, the scan on
    the same grid, needed by ``IMAGE_FEATURES`` only; ``eligible`` (S) bool, the voxels whose label can be
    wrong (None: all). Each plane is new and may be modified; only one is alive at a time when the caller
    drops it before the next."""
    from scipy import ndimage

    shapes = {np.shape(labels), np.shape(top_error), np.shape(entropy), *(np.shape(m) for m in maps.values())}
    if len(shapes) != 1:
        raise ValueError(f"labels, top_error, entropy and maps must share one shape, got {sorted(shapes)}")
    if len(spacing) != np.ndim(labels):
        raise ValueError(f"spacing {tuple(spacing)} does not match a {np.ndim(labels)}D labels array")
    top_error = np.asarray(top_error, dtype=np.float32)
    border: np.ndarray | None = None

    def border_plane() -> np.ndarray:
        nonlocal border
        if border is None:
            border = np.zeros(np.shape(labels), dtype=bool)
            for axis in range(np.ndim(labels)):
                if np.shape(labels)[axis] < 2:
                    continue
                a = [slice(None)] * np.ndim(labels)
                b = [slice(None)] * np.ndim(labels)
                a[axis], b[axis] = slice(1, None), slice(None, -1)
                differs = labels[tuple(a)] != labels[tuple(b)]
                border[tuple(a)] |= differs
                border[tuple(b)] |= differs
        return border

    for name in names:
        if name == "top_error":
            plane = top_error.copy()
        elif name == "top_error_logit":
            plane = np.clip(top_error, _LOGIT_FLOOR, 1.0 - _LOGIT_FLOOR)
            np.divide(plane, 1.0 - plane, out=plane)
            np.log(plane, out=plane)
        elif name == "entropy":
            plane = np.asarray(entropy, dtype=np.float32).copy()
        elif name == "top_error_mean_2mm":
            plane = ndimage.gaussian_filter(top_error, _mm_sigma(2.0, spacing), mode="nearest", truncate=3.0)
        elif name == "top_error_max_3":
            plane = ndimage.maximum_filter(top_error, size=3, mode="nearest")
        elif name == "border":
            plane = border_plane().astype(np.float32)
        elif name == "border_near_2mm":
            plane = ndimage.gaussian_filter(
                border_plane().astype(np.float32), _mm_sigma(2.0, spacing), mode="nearest", truncate=3.0
            )
        elif name == "intensity_error_logit":
            if image is None:
                raise ErrorModelError(f"error-model feature {name!r} needs the image, and none was given")
            from napari_medcl.intensity_model import label_probability

            right = label_probability(image, labels, spacing, eligible)
            plane = np.clip(right, _LOGIT_FLOOR, 1.0 - _LOGIT_FLOOR)
            # log((1 - p) / p): the odds that the label is wrong
            plane = np.log((1.0 - plane) / plane)
        elif name.startswith(MAP_PREFIX) and name[len(MAP_PREFIX) :] in maps:
            plane = np.asarray(maps[name[len(MAP_PREFIX) :]], dtype=np.float32).copy()
        else:
            raise ErrorModelError(
                f"unknown error-model feature {name!r} (available: {', '.join(BASE_FEATURES)}, map:<name>)"
            )
        yield name, np.asarray(plane, dtype=np.float32)


@dataclass(frozen=True)
class ErrorModel:
    """A logistic error model: P(wrong) = sigmoid(intercept + sum_i coefficients[i] * feature_i).

    ``features``: names from ``feature_names``; ``coefficients``: one per feature, on the raw features (any
    standardisation of the fit is folded in); ``figures``: what was measured on the out-of-fold cases it
    was fitted on (each signal's AUROC, the map's own AUROC and calibration error, the cases), kept as
    plain JSON; ``verdict_weights``: for a consensus only, the intensity model's weight on scans of the named
    verdict levels (``WEIGHTED_LEVELS``; 0 leaves it out), in place of its coefficient, which stays the
    weight on the other levels; ``version``: the format (a newer one than this module reads is refused when
    applied; None: the oldest that holds this model)."""

    features: tuple[str, ...]
    coefficients: tuple[float, ...]
    intercept: float
    figures: dict[str, Any] = field(default_factory=dict)
    verdict_weights: Mapping[str, float] = field(default_factory=dict)
    version: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.verdict_weights, Mapping):
            raise ErrorModelError(
                "error_model.intensity_weight_by_verdict must be an object, got "
                f"{type(self.verdict_weights).__name__}"
            )
        try:
            weights = {str(level): float(w) for level, w in self.verdict_weights.items()}
        except (TypeError, ValueError):
            raise ErrorModelError(
                "error_model.intensity_weight_by_verdict must map levels to numbers, got "
                f"{dict(self.verdict_weights)!r}"
            ) from None
        object.__setattr__(self, "verdict_weights", weights)
        if self.version is None:
            object.__setattr__(self, "version", 2 if weights else 1)
        object.__setattr__(self, "features", tuple(str(f) for f in self.features))
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        object.__setattr__(self, "intercept", float(self.intercept))
        if not self.features:
            raise ErrorModelError("error_model.features is empty")
        if len(self.features) != len(self.coefficients):
            raise ErrorModelError(
                f"error_model has {len(self.features)} features but {len(self.coefficients)} coefficients"
            )
        if len(set(self.features)) != len(self.features):
            raise ErrorModelError(f"error_model.features has duplicates: {list(self.features)}")
        if not all(math.isfinite(c) for c in (*self.coefficients, self.intercept)):
            raise ErrorModelError("error_model coefficients must be finite numbers")
        for name in self.features:
            if name not in BASE_FEATURES and not (
                name.startswith(MAP_PREFIX) and len(name) > len(MAP_PREFIX)
            ):
                raise ErrorModelError(f"unknown error-model feature {name!r}")
        try:
            json.dumps(self.figures, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ErrorModelError(f"error_model.figures must hold plain JSON values ({error})") from None
        if weights:
            if self.features != CONSENSUS_FEATURES:
                raise ErrorModelError("only an intensity consensus can weigh its intensity model by verdict")
            if problem := verdict_weights_problem(weights):
                raise ErrorModelError(f"error_model.intensity_weight_by_verdict: {problem}")
            if self.version < 2:
                raise ErrorModelError(
                    f"error_model version {self.version} has no intensity weight by verdict (version 2 has)"
                )

    @classmethod
    def consensus(
        cls,
        figures: Mapping[str, Any] | None = None,
        intensity_weight: float = 1.0,
        verdict_weights: Mapping[str, float] | None = None,
    ) -> ErrorModel:
        """The intensity consensus: P(wrong) from the network's odds that the label is wrong times the local
        intensity model's (``napari_medcl.intensity_model``) raised to ``intensity_weight``; at 1, as two
        independent experts would combine. Below 1 it tempers the intensity expert, which a scanner shift
        makes agree with the network's own mistakes. ``verdict_weights``: another weight on scans of the
        named verdict levels (e.g. ``{"caution": 0.125, "out-of-distribution": 0}``), where such a shift is
        likely. Nothing is fitted from voxels, so it needs no out-of-fold cases. ``figures``: what it was
        measured at."""
        weight = float(intensity_weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ErrorModelError(f"the intensity weight must be a positive number, got {intensity_weight!r}")
        return cls(
            features=CONSENSUS_FEATURES,
            coefficients=(1.0, weight),
            intercept=0.0,
            figures=dict(figures or {}),
            verdict_weights=dict(verdict_weights or {}),
        )

    def with_figures(self, figures: Mapping[str, Any]) -> ErrorModel:
        """The same map with other figures."""
        return dataclasses.replace(self, figures=dict(figures))

    @property
    def is_consensus(self) -> bool:
        return (
            self.features == CONSENSUS_FEATURES
            and self.coefficients[0] == 1.0
            and self.coefficients[1] > 0
            and self.intercept == 0.0
        )

    @property
    def intensity_weight(self) -> float:
        """The weight of the intensity model's log-odds in a consensus (1 for the plain consensus) on scans
        whose verdict level has no weight of its own in ``verdict_weights``."""
        if not self.is_consensus:
            raise ErrorModelError("only an intensity consensus has an intensity weight")
        return self.coefficients[1]

    def coefficients_for(self, verdict_level: str | None) -> tuple[float, ...]:
        """The coefficients applied to a scan of this verdict level (None: not assessed)."""
        if verdict_level is None or verdict_level not in self.verdict_weights:
            return self.coefficients
        return (self.coefficients[0], self.verdict_weights[verdict_level])

    def verdict_weights_text(self) -> str:
        """How the intensity model's weight depends on the verdict, for a summary ('' when it does not)."""
        if not self.verdict_weights:
            return ""
        parts = [f"{w:g} on {level}" for level, w in self.verdict_weights.items()]
        return f"intensity weight {', '.join(parts)}, {self.intensity_weight:g} otherwise"

    @property
    def needs_image(self) -> bool:
        """Whether ``apply`` needs the scan itself (an image feature such as the intensity model's)."""
        return any(f in IMAGE_FEATURES for f in self.features)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorModel:
        if not isinstance(data, Mapping):
            raise ErrorModelError(f"error_model must be an object, got {type(data).__name__}")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ErrorModelError(f"error_model.version must be a positive integer, got {version!r}")
        if data.get("kind", "logistic") != "logistic":
            raise ErrorModelError(f"error_model.kind {data.get('kind')!r} is not known (expected 'logistic')")
        try:
            return cls(
                features=tuple(data["features"]),
                coefficients=tuple(data["coefficients"]),
                intercept=data["intercept"],
                figures=dict(data.get("figures", {})),
                verdict_weights=data.get("intensity_weight_by_verdict", {}),
                version=version,
            )
        except KeyError as error:
            raise ErrorModelError(f"error_model lacks {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            if isinstance(error, ErrorModelError):
                raise
            raise ErrorModelError(f"error_model is malformed ({error})") from None

    def to_dict(self) -> dict[str, Any]:
        data = {
            "version": self.version,
            "kind": "logistic",
            "features": list(self.features),
            "coefficients": list(self.coefficients),
            "intercept": self.intercept,
            "figures": self.figures,
        }
        if self.verdict_weights:
            data["intensity_weight_by_verdict"] = dict(self.verdict_weights)
        return data

    def check_maps(self, uncertainty_maps: Sequence[str]) -> None:
        """ErrorModelError when a ``map:`` feature names a UAFR map the model does not output."""
        missing = [
            f
            for f in self.features
            if f.startswith(MAP_PREFIX) and f[len(MAP_PREFIX) :] not in uncertainty_maps
        ]
        if missing:
            raise ErrorModelError(
                f"error_model uses map(s) the model does not output: {', '.join(missing)} "
                f"(the model's maps: {', '.join(uncertainty_maps) or 'none'})"
            )

    def apply(
        self,
        labels: np.ndarray,
        top_error: np.ndarray,
        entropy: np.ndarray,
        maps: Mapping[str, np.ndarray],
        spacing: Sequence[float],
        eligible: np.ndarray | None = None,
        cancelled: Callable[[], bool] | None = None,
        image: np.ndarray | None = None,
        verdict_level: str | None = None,
    ) -> np.ndarray:
        """The error likelihood (S) float32 in [0, 1]; 0 outside ``eligible`` (S bool; None: everywhere).
        ``verdict_level``: the scan's verdict (``Verdict.level``; None: not assessed), which sets the
        intensity model's weight of a consensus with ``verdict_weights``. Other arguments as
        ``feature_planes``'s."""
        if self.version > VERSION:
            raise ErrorModelError(
                f"error_model version {self.version} is newer than this napari-medcl reads ({VERSION})"
            )
        logit = np.full(np.shape(labels), self.intercept, dtype=np.float32)
        # a feature weighted 0 (the intensity model left out on such a scan) is not computed at all
        weights = {f: c for f, c in zip(self.features, self.coefficients_for(verdict_level)) if c != 0.0}
        planes = feature_planes(tuple(weights), labels, top_error, entropy, maps, spacing, image, eligible)
        for name, plane in planes:
            plane *= np.float32(weights[name])
            logit += plane
            del plane
        # sigmoid, written to stay finite for any logit
        np.negative(logit, out=logit)
        np.clip(logit, -60.0, 60.0, out=logit)
        np.exp(logit, out=logit)
        logit += 1.0
        np.reciprocal(logit, out=logit)
        if eligible is not None:
            if eligible.shape != logit.shape:
                raise ValueError(f"eligible mask shape {eligible.shape} != labels shape {logit.shape}")
            logit[~eligible] = 0.0
        return logit

    def summary(self) -> str:
        """One line: what the map is and how well it was measured to find errors (out of fold for a fitted
        map; on the cases named for a consensus)."""
        fig = self.figures
        auroc, ece = fig.get("auroc"), fig.get("ece")
        count = len(fig.get("cases", []))
        measured = isinstance(auroc, (int, float)) and isinstance(ece, (int, float))
        if self.is_consensus:
            weight = self.intensity_weight
            by_verdict = self.verdict_weights_text()  # names every weight itself
            expert = "local intensity model"
            if weight != 1.0 and not by_verdict:
                expert += f"^{weight:g}"
            what = f"intensity consensus error map (network x {expert}, nothing fitted"
            what += f"; {by_verdict})" if by_verdict else ")"
            start = fig.get("start_model")
            if not measured and isinstance(start, Mapping):
                there = (
                    f" (there AUROC {start['auroc']:.3f}, ECE {start['ece']:.3f})"
                    if isinstance(start.get("auroc"), (int, float))
                    and isinstance(start.get("ece"), (int, float))
                    else ""
                )
                return f"{what}: not measured on this model; carried from {start.get('name')}{there}"
            if not measured:
                return f"{what}: no figures recorded"
            line = f"{what}: AUROC {auroc:.3f}, ECE {ece:.3f} on the {count} case(s) it was measured on"
            network_ece = fig.get("ece_network_alone")
            if isinstance(network_ece, (int, float)):
                line += f" (1 - p(label) alone: ECE {network_ece:.3f})"
            return line
        n = len(self.features)
        figures = (
            f"AUROC {auroc:.3f}, ECE {ece:.3f} on its {count} error case(s)"
            if measured
            else "no figures recorded"
        )
        return f"calibrated error map ({n} feature{'s' if n != 1 else ''}, logistic): {figures}"
