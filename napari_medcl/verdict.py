"""The per-case verdict: does this scan look like the images the model was trained on? (pure numpy)

``assess(volume, spec)`` compares a scan with the model's training-data profile
(``ModelSpec.training_profile``, see ``napari_medcl.training_profile``) and returns a ``Verdict``:

- ``ok``: nothing measured is far from the training images;
- ``caution``: something differs enough to check the result with more care (each reason says what);
- ``out-of-distribution``: the scan differs from every training image in a way that is known to break
  segmentation models (not skull-stripped for a model trained on skull-stripped scans, slices far thicker,
  inverted contrast, an empty or constant image...);
- ``unknown``: the model file carries no training-data profile, so nothing can be said.

A verdict never stops a prediction: it is information for the person reviewing the result.

Each check turns one measurement into a *severity*: 0 when the scan is typical, 1 at the caution threshold,
2 at the out-of-distribution threshold, growing linearly beyond (``_severity``). The level comes from the
largest severity; ``score`` (the sum over the checks of their severities, each check counted once at its
worst axis or channel, the noise check left out; larger = less like training) ranks cases for
benchmarks (``benchmarks/verdict.py``). All thresholds are in ``THRESHOLDS``, with the reason for each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from napari_medcl.training_profile import PERCENTILES, PROFILE_VERSION, case_statistics

__all__ = ["LEVELS", "NO_PROFILE", "THRESHOLDS", "Verdict", "assess", "with_feature_distance"]

LEVELS = ("ok", "caution", "out-of-distribution", "unknown")
NO_PROFILE = "this model file carries no training-data profile"

# (caution, out-of-distribution) per check. Each is applied to a measurement that is 0 inside the range of
# the training cases and grows with the distance outside it.
THRESHOLDS: dict[str, tuple[float, float]] = {
    # Border ring non-zero fraction above the training cases' largest, for a model trained on scans that are
    # zero outside the object (skull-stripped). 10 points: a crop touching the anatomy here and there;
    # 50 points: the scan is not masked, and a model that labels every non-zero voxel as tissue
    # (nonzero_is_foreground) labels the skull, the scalp and the background too.
    "border": (0.10, 0.50),
    # Spacing outside the training range, as log2 of the ratio. x2.5 (2 mm -> 1 mm is routine): beyond it
    # resampling invents most voxels along that axis; x4: structures thinner than a slice (cortex, 2-4 mm)
    # are lost before the model sees them, or (finer spacing) the model sees texture it never saw.
    "spacing": (math.log2(2.5), 2.0),
    # In-plane field of view outside the training range, log2 of the ratio. x2: another body region or zoom
    # is likely; x4: the anatomy's size in voxels is far from anything seen. The slice axis is not checked:
    # training volumes are often slabs, and a sliding-window model runs on any number of slices.
    "fov": (1.0, 2.0),
    # Intensities after the model's normalisation: how far the scan's foreground percentiles fall outside
    # the per-case range of the training cases, as a fraction of the training intensity span (pooled
    # p99 - p1). 0.2: a tissue mix or scanner unlike training; 0.35: another contrast (inverted, another
    # sequence) or a broken normalisation. The held-out training-like block of the bundled models is at 0.14.
    "intensity": (0.20, 0.35),
    # Non-zero (foreground) fraction outside the training range, log2 of the ratio. x2.5: a much smaller or
    # larger object than in training. It never makes a scan out-of-distribution alone (a tight crop
    # changes it a lot), so its severity is capped below 2.
    "foreground": (math.log2(2.5), math.log2(6.0)),
    # The network's own features (napari_medcl.feature_distance): the scan's median window distance above
    # the training cases' largest, log2 of the ratio. x1.5: the network sees windows unlike any training
    # case's typical window (a scanner or protocol shift moves it this far); x3: most windows are as far
    # out as the rarest 1% of training windows or beyond: anatomy, orientation or content it never saw.
    "features": (math.log2(1.5), math.log2(3.0)),
    # Voxel-scale noise (training_profile._noise_fraction) above the training cases' noisiest, in points of
    # the intensity span (p99 - p1). 0.015: well above how much the estimate varies between scans of one kind
    # (the bundled models' four training blocks 0.0045-0.0062, their held-out block 0.0057, the same template
    # at 2 mm 0.0092), and below the mildest synthetic scanner of the benchmarks (0.034 and up): noise the
    # model, and the intensity model behind its error likelihood, never saw. 0.10: every few voxels
    # cross into the next tissue's range. Noise alone never makes a scan out-of-distribution (the anatomy and
    # contrast can still be right), so its severity is capped below 2.
    "noise": (0.015, 0.10),
}
# Fixed severities of yes/no findings.
SEVERITY_CONSTANT = 3.0  # an empty or constant image: nothing to segment
SEVERITY_AXIS_ORDER = 1.2  # slices along another anatomical axis: caution (models often cope, not always)
FOREGROUND_CAP = 1.9
NOISE_CAP = 1.9
_SEVERITY_CAP = 10.0


@dataclass(frozen=True)
class Verdict:
    """How a scan compares with the model's training data.

    ``level``: one of ``LEVELS``. ``reasons``: one plain sentence per finding, worst first (empty for ``ok``).
    ``score``: the sum of the checks' severities but the noise check's, larger = less like training in kind
    (None for ``unknown``).
    ``details``: the measurements and each check's severity, plain JSON types.
    """

    level: str
    reasons: tuple[str, ...] = ()
    score: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"verdict level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        object.__setattr__(self, "reasons", tuple(self.reasons))

    @property
    def text(self) -> str:
        """One line: the level, then the reasons in brackets."""
        return self.level if not self.reasons else f"{self.level} ({'; '.join(self.reasons)})"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """The Verdict whose ``to_dict()`` is ``data``."""
        return cls(
            data["level"], tuple(data.get("reasons", ())), data.get("score"), dict(data.get("details", {}))
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "reasons": list(self.reasons),
            "score": self.score,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class _Finding:
    check: str
    severity: float
    reason: str | None  # None: nothing worth saying (severity < 1)


def assess(volume: Any, spec: Any, *, profile: Mapping[str, Any] | None = None) -> Verdict:
    """The verdict on ``volume`` (a ``Volume``, the whole scan as read) for the model ``spec`` describes.

    ``profile``: the training-data profile to compare with (default: ``spec.training_profile``). The model's
    normalisation and spacing come from ``spec``. A model without a profile gets ``unknown``."""
    profile = getattr(spec, "training_profile", None) if profile is None else profile
    if not profile:
        return Verdict("unknown", (NO_PROFILE,))
    version = profile.get("version")
    if not isinstance(version, int) or version > PROFILE_VERSION:
        return Verdict(
            "unknown",
            (
                f"this model's training-data profile has format {version}; this napari-medcl reads up to "
                f"{PROFILE_VERSION}",
            ),
        )
    normalization = getattr(spec, "normalization", None)
    stats = case_statistics(volume, normalization)
    findings = [
        _constant(stats),
        _border(stats, profile),
        *_spacing(stats, profile, getattr(spec, "spacing", None)),
        _fov(stats, profile),
        _intensity(stats, profile, normalization),
        _foreground(stats, profile),
        _axis_order(stats, profile),
        _noise(stats, profile),
    ]
    findings = [f for f in findings if f is not None]
    if stats["constant"] is not None:  # the other measurements of a constant image mean nothing
        findings = [f for f in findings if f.check in ("constant", "spacing", "fov", "axis_order")]
    level = _level(max((f.severity for f in findings), default=0.0))
    reasons = tuple(
        f.reason
        for f in sorted(findings, key=lambda f: -f.severity)
        if f.reason is not None and f.severity >= 1.0
    )
    severities: dict[str, float] = {}
    for f in findings:
        severities[f.check] = round(max(severities.get(f.check, 0.0), f.severity), 4)
    details = {
        "severity": severities,
        "measured": {
            key: stats[key]
            for key in (
                "shape",
                "spacing",
                "fov_mm",
                "axis_order",
                "foreground_fraction",
                "border_zero_fraction",
                "constant",
                "percentiles",
                "noise",
            )
        },
        "profile_cases": profile.get("cases"),
    }
    return Verdict(level, reasons, _score(severities), details)


def with_feature_distance(verdict: Verdict, distance: float, stats: Any) -> Verdict:
    """``verdict`` with the ``features`` check added: the scan's median window distance in the network's
    feature space (``FeatureStats.case_distance``) against ``stats.reference``, the training cases' largest.
    Its severity joins the others (level from the largest, score the sum, the reason in severity order). An
    ``unknown`` verdict (no training-data profile) stays unknown: the features alone judge nothing here."""
    if verdict.level == "unknown":
        return verdict
    reference = float(stats.reference)
    severity = _severity(math.log2(max(distance, 1e-12) / reference), "features")
    reason = None
    if severity >= 1.0:
        reason = (
            f"the network's features are unlike its training images': median window distance "
            f"{distance:.2f}, training cases at most {reference:.2f}"
        )
    details = dict(verdict.details)
    severities = dict(details.get("severity", {}))
    severities["features"] = round(severity, 4)
    details["severity"] = severities
    details["features"] = {"distance": round(float(distance), 4), "training_max": round(reference, 4)}
    level = _level(max(severities.values(), default=0.0))
    reasons = list(verdict.reasons)
    if reason is not None:
        # Reasons are worst first: the feature reason goes before those of checks with a lower severity.
        ordered = sorted((v for k, v in severities.items() if k != "features" and v >= 1.0), reverse=True)
        reasons.insert(sum(1 for v in ordered if v > severity), reason)
    return Verdict(level, tuple(reasons), _score(severities), details)


# ------------------------------------------------------------------------------------------------ checks


def _score(severities: Mapping[str, float]) -> float:
    """The verdict's score: each check once (its worst axis or channel), but not the noise check. The score
    says how unlike the training images a scan is in kind (another contrast, anatomy, protocol); noise is the
    image's quality, which sets the level (never above caution) without making a noisy scan of the right kind
    rank among the out-of-distribution ones."""
    return round(float(sum(v for k, v in severities.items() if k != "noise")), 4)


def _level(worst: float) -> str:
    """The verdict's level from its largest severity: 2 and above out-of-distribution, 1 and above caution."""
    return "out-of-distribution" if worst >= 2.0 else "caution" if worst >= 1.0 else "ok"


def _severity(measure: float, check: str) -> float:
    """0 at 0, 1 at the caution threshold, 2 at the out-of-distribution one, linear in between and beyond."""
    caution, ood = THRESHOLDS[check]
    measure = max(0.0, float(measure))
    value = measure / caution if measure <= caution else 1.0 + (measure - caution) / (ood - caution)
    return min(value, _SEVERITY_CAP)


def _constant(stats: Mapping[str, Any]) -> _Finding | None:
    value = stats["constant"]
    if value is None:
        return None
    if stats["foreground_fraction"] == 0:
        return _Finding("constant", SEVERITY_CONSTANT, "the image is empty: every voxel is 0")
    where = "every voxel" if stats["foreground_fraction"] >= 1 else "every non-zero voxel"
    return _Finding("constant", SEVERITY_CONSTANT, f"the image is constant: {where} is {value:g}")


def _border(stats: Mapping[str, Any], profile: Mapping[str, Any]) -> _Finding | None:
    if not profile.get("zero_outside_object"):
        return None  # trained on unmasked scans: a non-zero border is what it saw
    trained = 1.0 - float(profile["border_zero_fraction"]["min"])
    nonzero = 1.0 - float(stats["border_zero_fraction"])
    severity = _severity(nonzero - trained, "border")
    return _Finding(
        "border",
        severity,
        f"not skull-stripped or masked: {_percent(nonzero)} of the border ring is non-zero; this model was "
        f"trained on images that are zero outside the object (border ring at most {_percent(trained)} "
        "non-zero)",
    )


def _spacing(stats: Mapping[str, Any], profile: Mapping[str, Any], model_spacing: Any) -> list[_Finding]:
    from napari_medcl.preprocess import full_target, resampled_shape

    low, high = _trailing(profile, "spacing_mm", stats)
    spacing = stats["spacing"][-len(low) :] if low else []
    shape = stats["shape"][-len(low) :] if low else []
    dims = len(stats["spacing"])
    target = full_target(tuple(stats["spacing"]), model_spacing)
    out = []
    for i, (s, lo, hi) in enumerate(zip(spacing, low, high)):
        ratio = s / hi if s > hi else lo / s if s < lo else 1.0
        severity = _severity(math.log2(ratio), "spacing")
        axis = dims - len(spacing) + i
        what = _axis_words(axis, dims)
        trained = _mm_range(lo, hi)
        if target is None:
            how = "the model runs at the image's own spacing"
        else:
            before, after = (
                shape[i],
                resampled_shape((shape[i],), (stats["spacing"][axis],), (target[axis],))[0],
            )
            how = f"resampled {before} → {after} {what['plural']}" if before != after else "not resampled"
        if what["slice"]:
            text = f"slices {s:.3g} mm thick, model trained at {trained}: {how}"
        else:
            text = f"{what['plural']} {s:.3g} mm apart, model trained at {trained}: {how}"
        out.append(_Finding("spacing", severity, text))
    return out


def _fov(stats: Mapping[str, Any], profile: Mapping[str, Any]) -> _Finding | None:
    low, high = _trailing(profile, "fov_mm", stats)
    if len(low) < 2:
        return None
    fov = stats["fov_mm"][-2:]
    worst, text = 0.0, None
    for f, lo, hi in zip(fov, low[-2:], high[-2:]):
        ratio = f / hi if f > hi else lo / f if f < lo else 1.0
        severity = _severity(math.log2(max(ratio, 1.0)), "fov")
        if severity > worst:
            worst = severity
            size = "larger" if f > hi else "smaller"
            text = (
                f"field of view {fov[0]:.0f} x {fov[1]:.0f} mm in-plane, far {size} than in training "
                f"({_span(low[-2], high[-2])} x {_span(low[-1], high[-1])} mm): another body region "
                "or zoom?"
            )
    return _Finding("fov", worst, text)


def _intensity(stats: Mapping[str, Any], profile: Mapping[str, Any], normalization: Any) -> _Finding | None:
    channels = profile.get("intensity") or []
    measured = stats["percentiles"]
    if not channels or measured is None or len(measured) != len(channels):
        return None  # a channel-count mismatch is an error of its own, before inference
    trained_with = profile.get("normalization")
    if trained_with is not None and normalization is not None and dict(trained_with) != dict(normalization):
        return None  # the profile was measured under another normalisation: not comparable
    q25, q50, q75 = (PERCENTILES.index(p) for p in (25, 50, 75))
    worst, text = 0.0, None
    for ch, (entry, values) in enumerate(zip(channels, measured)):
        low, high, pooled = entry["case_min"], entry["case_max"], entry["pooled"]
        span = max(float(pooled[-1]) - float(pooled[0]), 1e-6)
        distance = max((max(lo - v, v - hi, 0.0) for v, lo, hi in zip(values, low, high)), default=0.0) / span
        severity = _severity(distance, "intensity")
        if severity > worst:
            worst = severity
            name = _channel_name(channels, ch)
            text = (
                f"intensities unlike the training images{name} after the model's normalisation: median "
                f"{values[q50]:.2f} (training cases {low[q50]:.2f}–{high[q50]:.2f}), quartiles "
                f"{values[q25]:.2f} and {values[q75]:.2f} (training {low[q25]:.2f}–{high[q25]:.2f} and "
                f"{low[q75]:.2f}–{high[q75]:.2f}); another sequence, inverted contrast or another scanner?"
            )
    return _Finding("intensity", worst, text)


def _foreground(stats: Mapping[str, Any], profile: Mapping[str, Any]) -> _Finding | None:
    trained = profile.get("foreground_fraction")
    fraction = float(stats["foreground_fraction"])
    if not trained or fraction <= 0:
        return None
    lo, hi = float(trained["min"]), float(trained["max"])
    ratio = fraction / hi if fraction > hi else lo / fraction if fraction < lo else 1.0
    severity = min(_severity(math.log2(ratio), "foreground"), FOREGROUND_CAP)
    return _Finding(
        "foreground",
        severity,
        f"{_percent(fraction)} of the image is non-zero, training images {_percent(lo)}–{_percent(hi)}",
    )


def _noise(stats: Mapping[str, Any], profile: Mapping[str, Any]) -> _Finding | None:
    trained = profile.get("noise_fraction") or []
    measured = stats.get("noise") or []
    if len(trained) != len(measured):
        return None  # a channel-count mismatch is an error of its own, before inference
    worst, text = 0.0, None
    for ch, (spread, value) in enumerate(zip(trained, measured)):
        if spread is None or value is None:
            continue
        severity = min(_severity(float(value) - float(spread["max"]), "noise"), NOISE_CAP)
        if severity > worst:
            worst = severity
            name = _channel_name(profile.get("intensity") or [], ch)
            text = (
                f"noisier than the training images{name}: voxel-to-voxel noise {100 * value:.1f}% of the "
                f"intensity range (training images at most {100 * float(spread['max']):.1f}%); another "
                "scanner or a faster sequence? Labels and the error map are less reliable in noise"
            )
    return _Finding("noise", worst, text)


def _axis_order(stats: Mapping[str, Any], profile: Mapping[str, Any]) -> _Finding | None:
    orders = profile.get("axis_orders") or []
    order = stats["axis_order"]
    if not orders or any(len(o) != len(order) for o in orders) or order in orders:
        return None
    plane = {"z": "axial", "y": "coronal", "x": "sagittal"}
    return _Finding(
        "axis_order",
        SEVERITY_AXIS_ORDER,
        f"{plane[order[0]]} slices (array axes run {'/'.join(order)}); the model was trained on "
        f"{' or '.join(plane[o[0]] for o in orders)} slices ({', '.join('/'.join(o) for o in orders)})",
    )


# ----------------------------------------------------------------------------------------------- helpers


def _trailing(
    profile: Mapping[str, Any], key: str, stats: Mapping[str, Any]
) -> tuple[list[float], list[float]]:
    """The profile's per-axis (min, max) for the axes the scan and the profile share (trailing axes)."""
    entry = profile.get(key) or {}
    low, high = list(entry.get("min") or []), list(entry.get("max") or [])
    n = min(len(low), len(stats["spacing"]))
    return [float(v) for v in low[len(low) - n :]], [float(v) for v in high[len(high) - n :]]


def _axis_words(axis: int, dims: int) -> dict[str, Any]:
    if dims == 3 and axis == 0:
        return {"slice": True, "plural": "slices"}
    return {"slice": False, "plural": "rows" if axis == dims - 2 else "columns"}


def _channel_name(entries: list[Any], channel: int) -> str:
    """`` (T1)``: the channel's name from the profile's intensity entries, for a reason about one channel of
    several; empty for a single-channel profile."""
    if len(entries) < 2 or channel >= len(entries):
        return ""
    return f" ({entries[channel].get('channel')})"


def _mm_range(low: float, high: float) -> str:
    return f"{low:.3g} mm" if math.isclose(low, high, rel_tol=1e-3) else f"{low:.3g}–{high:.3g} mm"


def _span(low: float, high: float) -> str:
    return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}–{high:.0f}"


def _percent(fraction: float) -> str:
    value = 100.0 * fraction
    return f"{value:.0f}%" if value >= 1 or value == 0 else f"{value:.1g}%"
