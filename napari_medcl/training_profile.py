"""The training-data profile: what a model's training images looked like, in numbers (pure numpy).

``profile_cases`` summarises a model's training cases into a plain JSON-able dict, stored in the model file as
``ModelSpec.training_profile`` (by ``medcl-train`` / ``medcl-export`` for new models, by ``medcl-calibrate``
for existing ones); ``napari_medcl.verdict.assess`` compares a scan with it. ``case_statistics`` measures one
image the same way, so the profile and the check at prediction time can never measure different things.

What is measured, per case (``case_statistics``):

- intensity percentiles ``PERCENTILES`` of the *foreground* (voxels non-zero in some channel; every voxel when
  none is zero) after the model's own normalisation (``napari_medcl.preprocess.normalize``, what inference
  applies), per channel;
- the fraction of the *border ring* that is zero: the voxels within ``BORDER_MM`` of the image's in-plane edges
  (the last two axes; at least one voxel, at most a quarter of the axis), over all slices. The slice axis is
  left out: training volumes are often slabs cut through the anatomy along it. A skull-stripped scan has a
  border ring that is entirely zero;
- spacing (mm per axis, array order), field of view (mm per axis), the non-zero (foreground) fraction, the
  labelled fraction when a label is given, and the axis order (which anatomical axis each array axis runs
  along: ``zyx`` for axial slices stacked along z);
- whether the foreground is constant;
- the *noise* at the voxel scale, per channel: a robust estimate of the standard deviation of the noise in the
  foreground (``_noise_fraction``), as a fraction of the foreground's normalised intensity span (99th - 1st
  percentile), so that a scan noisier than every training image can be told apart from one that only looks
  brighter or darker.

Large images are measured on a regular subsample of at most ``SAMPLE_VOXELS`` voxels (the border ring on
every voxel of its slices), so a profile or a verdict costs a fraction of a second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from napari_medcl.preprocess import normalize

__all__ = [
    "BORDER_MM",
    "PERCENTILES",
    "PROFILE_VERSION",
    "case_statistics",
    "profile_cases",
    "profile_summary",
]

PROFILE_VERSION = 1
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
# Width of the border ring: a few mm is outside the head in any skull-stripped brain scan, and inside the
# field of view's air (or the table) in any unmasked one.
BORDER_MM = 5.0
# Voxels measured per image at most (a regular subsample above): percentiles of 2 M values are stable to
# well under 1% of the intensity range, and take ~50 ms.
SAMPLE_VOXELS = 1 << 21
# Foreground values pooled per training case for the pooled percentiles.
POOLED_PER_CASE = 200_000
# A case counts as zero outside the object (skull-stripped) when at most this fraction of its border ring
# is non-zero: a skull-stripped scan's ring is all zero, but a crop may touch the anatomy at one spot.
ZERO_OUTSIDE_MAX_NONZERO = 0.05
# Foreground voxels with a whole 3x3 in-plane neighbourhood in the foreground needed to estimate the noise,
# and voxels read for it at most (whole planes): a median of half a million values is stable to about 0.1%.
NOISE_MIN_VOXELS = 500
NOISE_VOXELS = 1 << 19
_AXIS_LETTERS = ("z", "y", "x")  # physical axes in array order (napari_medcl.volume)


def case_statistics(volume: Any, normalization: Mapping[str, Any] | None) -> dict[str, Any]:
    """The measurements of one image (a ``Volume``; see the module docstring), as plain JSON types.

    ``normalization``: a ModelSpec normalisation dict (None: values as they are). Keys: ``spatial_dims``,
    ``shape``, ``spacing``, ``fov_mm``, ``axis_order``, ``channels``, ``foreground_fraction``,
    ``border_zero_fraction``, ``constant`` (None, or the value of a constant foreground), ``percentiles``
    (one list per channel, ``PERCENTILES`` order; None when no voxel is finite), ``noise`` (one fraction of
    the intensity span per channel, None where it cannot be estimated)."""
    stats, _ = _measure(volume, normalization, pooled=0)
    return stats


def profile_cases(
    volumes: Iterable[Any],
    normalization: Any,
    *,
    channel_names: Iterable[str] | None = None,
    modality: str | None = None,
    total_cases: int | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """The training-data profile of ``volumes``: ``Volume`` objects or ``(Volume, label array or None)`` pairs
    (the label gives the labelled fraction), read one at a time when ``volumes`` is an iterator.

    ``normalization``: the model's (a ModelSpec normalisation dict, or a ModelSpec). ``channel_names``,
    ``modality``: as known (modality is guessed from the channel names when not given). ``total_cases``: how
    many training cases there were when ``volumes`` is a subset of them; ``source``: a note on where the
    cases came from (dataset and split). Returns a dict of plain JSON types (see ``profile_summary``)."""
    normalization = getattr(normalization, "normalization", normalization)
    normalization = None if normalization is None else dict(normalization)
    cases: list[dict[str, Any]] = []
    pooled: list[list[np.ndarray]] = []
    labelled: list[float] = []
    for i, item in enumerate(volumes):
        volume, label = item if isinstance(item, tuple) else (item, None)
        stats, values = _measure(volume, normalization, pooled=POOLED_PER_CASE, seed=i)
        cases.append(stats)
        pooled.append(values)
        if label is not None:
            labelled.append(float(np.count_nonzero(label)) / max(1, np.asarray(label).size))
    if not cases:
        raise ValueError("a training-data profile needs at least one case")
    channels = {c["channels"] for c in cases}
    if len(channels) != 1:
        raise ValueError(f"the cases have different channel counts: {sorted(channels)}")
    n_channels = channels.pop()
    dims = min(c["spatial_dims"] for c in cases)
    names = None if channel_names is None else [str(n) for n in channel_names]
    if modality is None and names:
        modality = guess_modality(names)
    spacing = np.array([c["spacing"][-dims:] for c in cases])
    fov = np.array([c["fov_mm"][-dims:] for c in cases])
    border = [c["border_zero_fraction"] for c in cases]
    intensity = []
    for ch in range(n_channels):
        per_case = np.array(
            [c["percentiles"][ch] for c in cases if c["percentiles"] is not None], dtype=np.float64
        )
        values = np.concatenate([p[ch] for p in pooled if len(p) > ch])
        if per_case.size == 0 or values.size == 0:
            continue
        q25, q50, q75 = (PERCENTILES.index(p) for p in (25, 50, 75))
        iqr = per_case[:, q75] - per_case[:, q25]
        intensity.append(
            {
                "channel": names[ch] if names and ch < len(names) else f"channel {ch}",
                "pooled": _round(np.percentile(values, PERCENTILES)),
                "case_min": _round(per_case.min(axis=0)),
                "case_max": _round(per_case.max(axis=0)),
                "case_median_range": _round([per_case[:, q50].min(), per_case[:, q50].max()]),
                "case_iqr_range": _round([iqr.min(), iqr.max()]),
            }
        )
    return {
        "version": PROFILE_VERSION,
        "cases": len(cases),
        "total_cases": int(total_cases) if total_cases is not None else len(cases),
        "source": source,
        "modality": modality,
        "channel_names": names,
        "channels": n_channels,
        "spatial_dims": dims,
        "normalization": normalization,
        "percentiles": list(PERCENTILES),
        "foreground": "voxels non-zero in some channel (every voxel when none is zero)",
        "intensity": intensity,
        "zero_outside_object": bool(max(1.0 - b for b in border) <= ZERO_OUTSIDE_MAX_NONZERO),
        "border_ring": f"the outermost {BORDER_MM:g} mm of the last two axes (at least 1 voxel), all slices",
        "border_zero_fraction": _spread(border),
        "spacing_mm": {"min": _round(spacing.min(axis=0)), "max": _round(spacing.max(axis=0))},
        "slice_thickness_mm": _spread([c["spacing"][0] for c in cases]) if dims == 3 else None,
        "fov_mm": {"min": _round(fov.min(axis=0)), "max": _round(fov.max(axis=0))},
        "foreground_fraction": _spread([c["foreground_fraction"] for c in cases]),
        "labelled_fraction": _spread(labelled) if labelled else None,
        "axis_orders": sorted({c["axis_order"] for c in cases}),
        "noise_fraction": [
            _spread(known)
            if (known := [c["noise"][ch] for c in cases if c["noise"][ch] is not None])
            else None
            for ch in range(n_channels)
        ],
        "constant_cases": sum(c["constant"] is not None for c in cases),
    }


def profile_summary(profile: Mapping[str, Any] | None) -> str:
    """One line describing a profile, for logs and --help-like output."""
    if not profile:
        return "no training-data profile"
    spacing = profile.get("spacing_mm") or {}
    low, high = spacing.get("min"), spacing.get("max")
    mm = "?" if not low else " x ".join(_range_text(a, b) for a, b in zip(low, high)) + " mm"
    ring = profile.get("border_zero_fraction") or {}
    stripped = "zero outside the object" if profile.get("zero_outside_object") else "not masked"
    return (
        f"training-data profile of {profile.get('cases')} case(s)"
        + (f" ({profile['modality']})" if profile.get("modality") else "")
        + f": spacing {mm}, {stripped} (border ring {100 * (1 - ring.get('min', 1)):.0f}% non-zero at most)"
    )


def guess_modality(channel_names: Iterable[str]) -> str | None:
    """ "CT" or "MR" from dataset channel names (nnU-Net / MSD conventions), None when they do not say."""
    mr = {"t1", "t1w", "t2", "t2w", "flair", "pd", "adc", "dwi", "mr", "mri", "t1gd", "t1ce", "cine", "lge"}
    kinds = set()
    for name in channel_names:
        key = name.strip().lower().replace("-", "").replace("_", "")
        if key == "ct":
            kinds.add("CT")
        elif key in mr or key.startswith(("t1", "t2")):
            kinds.add("MR")
    return kinds.pop() if len(kinds) == 1 else None


# --------------------------------------------------------------------------------------------- measuring


def _measure(
    volume: Any, normalization: Mapping[str, Any] | None, *, pooled: int, seed: int = 0
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(case statistics, per channel up to ``pooled`` normalised foreground values)."""
    array = volume.channels
    spatial = tuple(array.shape[1:])
    dims = len(spatial)
    spacing = tuple(float(s) for s in volume.spacing)
    step = max(1, math.ceil((math.prod(spatial) / SAMPLE_VOXELS) ** (1.0 / dims)))
    sample, nonzero, foreground = _finite_foreground(array[(slice(None), *(slice(None, None, step),) * dims)])
    raw = sample[:, foreground]  # (C, N)
    constant = None
    if raw.size and float(raw.min()) == float(raw.max()):
        constant = float(raw.flat[0])
    data = sample.astype(np.float32) if normalization is None else normalize(sample, dict(normalization))
    values = data[:, foreground]  # (C, N) normalised foreground
    percentiles = [_round(np.percentile(channel, PERCENTILES)) for channel in values] if values.size else None
    chosen: list[np.ndarray] = []
    if pooled and values.size:
        rng = np.random.default_rng(seed)
        take = rng.choice(values.shape[1], size=min(pooled, values.shape[1]), replace=False)
        chosen = [channel[take] for channel in values]
    stats = {
        "spatial_dims": dims,
        "shape": list(spatial),
        "spacing": list(spacing),
        "fov_mm": _round([n * s for n, s in zip(spatial, spacing)]),
        "axis_order": axis_order(volume.direction),
        "channels": int(array.shape[0]),
        "foreground_fraction": round(float(nonzero.mean()), 6),
        "border_zero_fraction": round(_border_zero_fraction(array, spacing, step), 6),
        "constant": constant,
        "percentiles": percentiles,
        "noise": _noise_fraction(array, normalization),
    }
    return stats, chosen


def _finite_foreground(array: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``array`` (C, *S) read, with NaN/Inf as 0 (inference refuses them anyway); its non-zero mask (*S) (a
    voxel non-zero in some channel); and the foreground: that mask, or every voxel when none is non-zero."""
    data = np.asarray(array)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        data = np.where(np.isfinite(data), data, 0)
    nonzero = np.any(data != 0, axis=0)
    return data, nonzero, nonzero if nonzero.any() else np.ones_like(nonzero)


def _noise_fraction(array: Any, normalization: Mapping[str, Any] | None) -> list[float | None]:
    """Per channel: the noise's standard deviation over the foreground's normalised p99 - p1 span (None where
    fewer than ``NOISE_MIN_VOXELS`` foreground voxels have a whole in-plane neighbourhood in the foreground).

    The noise is estimated in-plane (slices may be thick, or a 2D image is one plane), on whole slices at full
    resolution (evenly spread slices up to ``NOISE_VOXELS`` voxels; a central crop of a larger plane), with
    Immerkaer's 3x3 operator, which cancels intensity ramps and most of the curvature of smooth anatomy: its
    response to white noise of sd s has sd 6 s, and its median absolute value over the foreground's interior
    (1.4826 x the median for a Gaussian) keeps tissue edges, a minority of the voxels, from counting."""
    from scipy import ndimage

    spatial = tuple(array.shape[1:])
    plane = spatial[-2:]
    if len(spatial) == 2:
        picked = np.asarray(array)[:, None]
    else:
        per_slice = max(1, math.prod(plane))
        count = max(1, min(spatial[0], NOISE_VOXELS // per_slice))
        index = np.unique(np.linspace(0, spatial[0] - 1, count).round().astype(int))
        picked = np.asarray(array[:, index])
    crop = []
    for n in picked.shape[-2:]:  # a plane larger than the budget: its central part
        keep = min(n, max(3, int(math.sqrt(NOISE_VOXELS))))
        crop.append(slice((n - keep) // 2, (n - keep) // 2 + keep))
    picked, _, foreground = _finite_foreground(picked[(slice(None), slice(None), *crop)])
    interior = ndimage.binary_erosion(foreground, structure=np.ones((1, 3, 3), dtype=bool), border_value=0)
    if int(interior.sum()) < NOISE_MIN_VOXELS:
        return [None] * int(picked.shape[0])
    data = picked.astype(np.float32) if normalization is None else normalize(picked, dict(normalization))
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)[None]
    fractions: list[float | None] = []
    for channel in data:
        low, high = np.percentile(channel[foreground], (1, 99))
        response = ndimage.convolve(channel, kernel, mode="nearest")[interior]
        sigma = 1.4826 * float(np.median(np.abs(response))) / 6.0
        fractions.append(round(sigma / float(high - low), 6) if high > low else None)
    return fractions


def border_ring(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """(Y, X) bool: the in-plane border ring of an image of spatial ``shape`` (last two axes)."""
    ring = np.zeros(shape[-2:], dtype=bool)
    for axis, (n, s) in enumerate(zip(shape[-2:], spacing[-2:])):
        width = int(min(max(1, round(BORDER_MM / s)), max(1, n // 4)))
        index = [slice(None), slice(None)]
        index[axis] = slice(0, width)
        ring[tuple(index)] = True
        index[axis] = slice(n - width, n)
        ring[tuple(index)] = True
    return ring


def _border_zero_fraction(array: np.ndarray, spacing: tuple[float, ...], step: int) -> float:
    """Fraction of the border ring's voxels that are zero in every channel (slices subsampled by ``step``)."""
    ring = border_ring(tuple(array.shape[1:]), spacing)
    # (C, Z, Y, X): every ``step``-th slice -> (C, Z', N); (C, Y, X) -> (C, N)
    values = array[:, ::step][:, :, ring] if array.ndim == 4 else array[:, ring]
    return float(np.mean(~np.any(values != 0, axis=0))) if values.size else 1.0


def axis_order(direction: Any) -> str:
    """Which physical axis each array axis runs along, as letters: ``zyx`` for the usual axial stack.

    Column j of ``direction`` is array axis j's unit vector in physical (z, y, x) coordinates (array order,
    ``napari_medcl.volume``); its largest component names the axis."""
    direction = np.asarray(direction, dtype=np.float64)
    n = direction.shape[0]
    letters = _AXIS_LETTERS[-n:]
    return "".join(letters[int(np.argmax(np.abs(direction[:, j])))] for j in range(n))


def _spread(values: Iterable[float]) -> dict[str, float]:
    array = np.asarray(list(values), dtype=np.float64)
    return {
        "min": round(float(array.min()), 6),
        "median": round(float(np.median(array)), 6),
        "max": round(float(array.max()), 6),
    }


def _round(values: Any) -> list[float]:
    return [round(float(v), 6) for v in np.ravel(values)]


def _range_text(low: float, high: float) -> str:
    return f"{low:g}" if abs(low - high) < 1e-9 else f"{low:g}-{high:g}"
