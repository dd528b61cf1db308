"""How unlike its training windows the network finds a scan: a distance in the network's own feature space.

A model calibrated with features (``medcl-calibrate``, ``export.feature_output``) has a third graph output,
``features`` (N, F): for every window, each channel of the network's deepest encoder activation (the
bottleneck, the input of its first upsampling) averaged over the window. ``FeatureStats`` holds, from the
windows of the model's training cases as the product's own sliding window cuts them, each channel's mean and
variance: a window's distance is the root mean square of its channels' z-scores (a Mahalanobis distance with a
diagonal covariance, divided by sqrt(F) so that a typical training window is near 1 whatever F is). A case's
distance is the median over its windows, so a few windows of background or of an odd corner do not decide it;
it is compared with the training cases' own medians by the verdict's ``features`` check
(``napari_medcl.verdict.with_feature_distance``).

Why the image checks are not enough: a scan can match the training images in every statistic the profile
holds (intensities, spacing, field of view, a zero border) and still show the network anatomy it never saw,
for example a volume whose axes were permuted without updating its header. The network's features see that.

numpy only; never torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FEATURES_OUTPUT", "FEATURES_VERSION", "FeatureStats", "FeatureStatsError"]

FEATURES_OUTPUT = "features"
FEATURES_VERSION = 1
# Variances below this (a channel constant over the training windows, e.g. a dead ReLU channel) would turn any
# change of that channel into an enormous z-score.
MIN_VARIANCE = 1e-6


class FeatureStatsError(ValueError):
    """A features description in a model's spec that cannot be used (one plain line)."""


@dataclass(frozen=True)
class FeatureStats:
    """The spec's ``features``: which graph tensor is pooled (``tensor``) into how many ``channels``, and, once
    measured on training cases, each channel's ``mean`` and ``variance`` over their windows, the training
    windows' distance percentiles (``window_percentiles``: "50", "95", "99") and each training case's median
    window distance (``case_medians``, in the order of ``cases``). Without measurements (``measured`` False)
    the graph only exposes the features; nothing is judged."""

    tensor: str
    channels: int
    mean: tuple[float, ...] = ()
    variance: tuple[float, ...] = ()
    window_percentiles: Mapping[str, float] | None = None
    case_medians: tuple[float, ...] = ()
    cases: tuple[str, ...] = ()
    version: int = FEATURES_VERSION

    def __post_init__(self) -> None:
        _check(isinstance(self.tensor, str) and self.tensor, "features.tensor must be a non-empty string")
        _check(
            isinstance(self.channels, int) and self.channels >= 1,
            f"features.channels must be a positive integer, got {self.channels!r}",
        )
        _check(
            isinstance(self.version, int) and 1 <= self.version <= FEATURES_VERSION,
            f"features.version {self.version!r} is not one this napari-medcl reads (1..{FEATURES_VERSION})",
        )
        mean = tuple(float(v) for v in self.mean)
        variance = tuple(float(v) for v in self.variance)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "variance", variance)
        object.__setattr__(self, "case_medians", tuple(float(v) for v in self.case_medians))
        object.__setattr__(self, "cases", tuple(str(c) for c in self.cases))
        if not (mean or variance or self.window_percentiles or self.case_medians):
            return
        _check(
            len(mean) == len(variance) == self.channels,
            f"features.mean and features.variance must have {self.channels} values each, "
            f"got {len(mean)} and {len(variance)}",
        )
        _check(
            all(math.isfinite(v) for v in mean) and all(math.isfinite(v) and v >= 0 for v in variance),
            "features.mean must be finite and features.variance finite and >= 0",
        )
        percentiles = dict(self.window_percentiles or {})
        _check(
            set(percentiles) == {"50", "95", "99"}
            and all(math.isfinite(float(v)) and float(v) >= 0 for v in percentiles.values()),
            "features.window_percentiles must give '50', '95' and '99' as numbers >= 0",
        )
        object.__setattr__(self, "window_percentiles", {k: float(v) for k, v in percentiles.items()})
        _check(
            len(self.case_medians) >= 1 and all(math.isfinite(v) and v > 0 for v in self.case_medians),
            "features.case_medians must hold one positive number per training case",
        )
        _check(
            not self.cases or len(self.cases) == len(self.case_medians),
            f"features.cases names {len(self.cases)} case(s) for {len(self.case_medians)} median(s)",
        )

    @property
    def measured(self) -> bool:
        """Whether training statistics are present (else the features are exposed but not judged)."""
        return bool(self.mean)

    @property
    def reference(self) -> float:
        """The largest median window distance among the training cases: what a training-like scan reaches."""
        return max(self.case_medians)

    def window_distances(self, features: np.ndarray) -> np.ndarray:
        """features (N, F) float -> (N,) float64: each window's RMS z-score against the training windows."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.channels:
            raise FeatureStatsError(
                f"window features of shape {features.shape}; expected (N, {self.channels})"
            )
        if not self.measured:
            raise FeatureStatsError("this model's features carry no training statistics")
        return _distances(features, np.asarray(self.mean), np.asarray(self.variance))

    def case_distance(self, features: np.ndarray) -> float:
        """features (N, F) of one case's windows -> the median of their distances (N >= 1)."""
        distances = self.window_distances(features)
        if distances.size == 0:
            raise FeatureStatsError("no window features to measure")
        return float(np.median(distances))

    @classmethod
    def fit(cls, tensor: str, per_case: Mapping[str, np.ndarray]) -> FeatureStats:
        """The statistics of the training cases' windows: ``per_case`` maps a case id to its windows'
        features (N_i, F). Each case's median distance is measured against statistics that include it (as
        every training case is part of what the network learned)."""
        if not per_case:
            raise FeatureStatsError("no training cases to measure features on")
        arrays = [np.asarray(a, dtype=np.float64) for a in per_case.values()]
        channels = {a.shape[1] if a.ndim == 2 else None for a in arrays}
        if len(channels) != 1 or None in channels:
            raise FeatureStatsError(
                f"window features must be (N, F) with one F, got {[a.shape for a in arrays]}"
            )
        stacked = np.concatenate(arrays)
        mean, variance = stacked.mean(axis=0), stacked.var(axis=0)
        distances = _distances(stacked, mean, variance)
        return cls(
            tensor,
            stacked.shape[1],
            tuple(mean),
            tuple(variance),
            {str(q): float(np.percentile(distances, q)) for q in (50, 95, 99)},
            tuple(float(np.median(_distances(a, mean, variance))) for a in arrays),
            tuple(per_case),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureStats:
        if not isinstance(data, Mapping):
            raise FeatureStatsError(f"features must be an object, got {type(data).__name__}")
        known = {
            "tensor", "channels", "mean", "variance", "window_percentiles", "case_medians", "cases", "version",
        }  # fmt: skip
        unknown = sorted(set(data) - known)
        _check(not unknown, f"features has unknown field(s) {unknown}")
        _check("tensor" in data and "channels" in data, "features needs 'tensor' and 'channels'")
        return cls(**{key: data[key] for key in known if key in data})

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": self.version, "tensor": self.tensor, "channels": self.channels}
        if self.measured:
            data |= {
                "mean": list(self.mean),
                "variance": list(self.variance),
                "window_percentiles": dict(self.window_percentiles or {}),
                "case_medians": list(self.case_medians),
                "cases": list(self.cases),
            }
        return data

    def summary(self) -> str:
        """One line for the model summary."""
        if not self.measured:
            return f"network features: {self.channels} channels of {self.tensor} (no training statistics)"
        medians = ", ".join(f"{v:.2f}" for v in self.case_medians)
        return (
            f"network features: {self.channels} channels, measured on {len(self.case_medians)} training "
            f"case(s) (median window distance {medians}; training windows' 95th percentile "
            f"{self.window_percentiles['95']:.2f})"
        )


def _distances(features: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """(N, F) -> (N,): the root mean square over channels of (feature - mean) / sd."""
    return np.sqrt(np.mean((features - mean) ** 2 / np.maximum(variance, MIN_VARIANCE), axis=1))


def _check(condition: Any, message: str) -> None:
    if not condition:
        raise FeatureStatsError(message)
