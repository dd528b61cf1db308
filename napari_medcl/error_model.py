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
(``napari_medcl.intensity_model``), which makes it the one error map that reads the image itself.

Memory: the linear predictor is summed one feature plane at a time, so the map costs a few float32 planes on
the prediction's grid whatever the number of features.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BASE_FEATURES",
    "VERSION",
    "ErrorModel",
    "ErrorModelError",
    "eligible_voxels",
    "feature_names",
    "feature_planes",
]

VERSION = 1
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
    plain JSON; ``version``: the format (a newer one than this module reads is refused when applied)."""

    features: tuple[str, ...]
    coefficients: tuple[float, ...]
    intercept: float
    figures: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self) -> None:
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

    @classmethod
    def consensus(cls, figures: Mapping[str, Any] | None = None, intensity_weight: float = 1.0) -> ErrorModel:
        """The intensity consensus: P(wrong) from the network's odds that the label is wrong times the local
        intensity model's (``napari_medcl.intensity_model``) raised to ``intensity_weight``; at 1, as two
        independent experts would combine. Below 1 it tempers the intensity expert, which a scanner shift
        makes agree with the network's own mistakes. Nothing is fitted from voxels, so it needs no
        out-of-fold cases. ``figures``: what it was measured at."""
        weight = float(intensity_weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ErrorModelError(f"the intensity weight must be a positive number, got {intensity_weight!r}")
        return cls(
            features=CONSENSUS_FEATURES,
            coefficients=(1.0, weight),
            intercept=0.0,
            figures=dict(figures or {}),
        )

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
        """The weight of the intensity model's log-odds in a consensus (1 for the plain consensus)."""
        if not self.is_consensus:
            raise ErrorModelError("only an intensity consensus has an intensity weight")
        return self.coefficients[1]

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
                version=version,
            )
        except KeyError as error:
            raise ErrorModelError(f"error_model lacks {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            if isinstance(error, ErrorModelError):
                raise
            raise ErrorModelError(f"error_model is malformed ({error})") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kind": "logistic",
            "features": list(self.features),
            "coefficients": list(self.coefficients),
            "intercept": self.intercept,
            "figures": self.figures,
        }

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
    ) -> np.ndarray:
        """The error likelihood (S) float32 in [0, 1]; 0 outside ``eligible`` (S bool; None: everywhere).
        Arguments as ``feature_planes``'s."""
        if self.version > VERSION:
            raise ErrorModelError(
                f"error_model version {self.version} is newer than this napari-medcl reads ({VERSION})"
            )
        logit = np.full(np.shape(labels), self.intercept, dtype=np.float32)
        weights = dict(zip(self.features, self.coefficients))
        planes = feature_planes(self.features, labels, top_error, entropy, maps, spacing, image, eligible)
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
            expert = "local intensity model" if weight == 1.0 else f"local intensity model^{weight:g}"
            what = f"intensity consensus error map (network x {expert}, nothing fitted)"
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
