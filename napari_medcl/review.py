"""Where should a reviewer look first? Rank slices by UAFR uncertainty and locate uncertain regions.

Pure numpy, no napari: the review panel of the widget calls these functions and only moves the viewer.
A 3D map is ranked slice by slice along a chosen axis; a 2D map is a single slice (index 0), in keeping with
the product's "2D is depth-1 3D" rule, so the panel still offers it and centres the view on its uncertain region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MODES = ("mean_in_foreground", "volume_above")


@dataclass(frozen=True)
class SliceScore:
    """One slice's review priority.

    ``score`` is what the ranking sorts by: the mean uncertainty inside the predicted foreground
    (``mean_in_foreground``) or the number of voxels above the threshold (``volume_above``).
    ``uncertain_mm`` is ``uncertain_voxels`` times the voxel size in mm^3 (3D) or mm^2 (2D).
    """

    index: int
    score: float
    mean_in_foreground: float
    foreground_voxels: int
    uncertain_voxels: int
    uncertain_mm: float


def rank_slices(
    uncertainty: np.ndarray,
    labels: np.ndarray,
    axis: int = 0,
    *,
    mode: str = "mean_in_foreground",
    threshold: float = 0.5,
    spacing: tuple[float, ...] | None = None,
    min_foreground: int | None = None,
    limit: int | None = None,
) -> list[SliceScore]:
    """Slices ordered from most to least worth reviewing.

    uncertainty (*S) float in [0, 1], labels (*S) int (0 = background), S = (Z, Y, X) or (Y, X).
    ``axis`` is the slicing axis for 3D maps (ignored for 2D, which is one slice).
    ``mean_in_foreground`` skips slices whose foreground has fewer than ``min_foreground`` voxels; by default
    1% of the largest slice foreground (at least 1), so that a few stray voxels at the edge of an organ do not
    top the list. ``volume_above`` ranks every slice that has at least one voxel above ``threshold``.
    Ties keep slice order. ``limit`` keeps only the first entries.
    """
    uncertainty, labels = _check_maps(uncertainty, labels)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    axis = _check_axis(uncertainty.ndim, axis)

    # (n_slices, voxels_per_slice); a 2D map is one slice
    u = _as_slices(uncertainty, axis).astype(np.float32, copy=False)
    fg = _as_slices(labels, axis) > 0
    fg_count = fg.sum(axis=1)
    fg_sum = np.where(fg, u, 0.0).sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        fg_mean = np.where(fg_count > 0, fg_sum / np.maximum(fg_count, 1), np.nan)
    above = (u > threshold).sum(axis=1)
    voxel_size = float(np.prod(spacing)) if spacing is not None else 1.0
    if spacing is not None and len(spacing) != uncertainty.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {uncertainty.ndim}D map")

    if mode == "mean_in_foreground":
        floor = max(1, int(0.01 * fg_count.max())) if min_foreground is None else max(1, int(min_foreground))
        keep = np.flatnonzero(fg_count >= floor)
        scores = fg_mean[keep]
    else:
        keep = np.flatnonzero(above > 0)
        scores = above[keep].astype(np.float64)
    # stable sort on -score keeps slice order among ties
    order = keep[np.argsort(-scores, kind="stable")]
    if limit is not None:
        order = order[: max(0, int(limit))]
    return [
        SliceScore(
            index=int(i),
            score=float(fg_mean[i] if mode == "mean_in_foreground" else above[i]),
            mean_in_foreground=float(fg_mean[i]),
            foreground_voxels=int(fg_count[i]),
            uncertain_voxels=int(above[i]),
            uncertain_mm=float(above[i]) * voxel_size,
        )
        for i in order
    ]


def region_center(
    uncertainty: np.ndarray,
    labels: np.ndarray,
    axis: int,
    index: int,
    *,
    threshold: float | None = None,
) -> tuple[float, ...]:
    """The point of slice ``index`` (along ``axis``) a reviewer should look at, in data index coordinates.

    uncertainty, labels (*S) as in ``rank_slices``; returns len(S) floats, with ``index`` on ``axis`` for 3D.
    The point is the uncertainty-weighted centroid of the voxels above ``threshold`` when given and present,
    else of the predicted foreground, else of the whole slice (then weighted by uncertainty, or the slice centre
    if the slice carries no uncertainty at all).
    """
    uncertainty, labels = _check_maps(uncertainty, labels)
    if uncertainty.ndim == 3:
        axis = _check_axis(3, axis)
        if not 0 <= index < uncertainty.shape[axis]:
            raise ValueError(
                f"slice index {index} is outside 0..{uncertainty.shape[axis] - 1} on axis {axis}"
            )
        u_plane = np.take(uncertainty, index, axis=axis).astype(np.float64)
        l_plane = np.take(labels, index, axis=axis)
    else:
        u_plane = uncertainty.astype(np.float64)
        l_plane = labels

    candidates = []
    if threshold is not None:
        candidates.append(u_plane > threshold)
    candidates += [l_plane > 0, np.ones(u_plane.shape, dtype=bool)]
    mask = next(m for m in candidates if m.any())
    weights = np.where(mask, u_plane, 0.0)
    if weights.sum() <= 0:
        weights = mask.astype(np.float64)
    grids = np.indices(u_plane.shape, dtype=np.float64)
    total = weights.sum()
    center = [float((g * weights).sum() / total) for g in grids]
    if uncertainty.ndim == 3:
        center.insert(axis, float(index))
    return tuple(center)


def uncertain_mask(uncertainty: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 mask (*S) of the voxels whose uncertainty is above ``threshold``: the review overlay."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return (np.asarray(uncertainty) > threshold).astype(np.uint8)


def _check_axis(ndim: int, axis: int) -> int:
    if ndim == 2:
        return 0
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} does not exist in a {ndim}D map")
    return axis % ndim


def _as_slices(array: np.ndarray, axis: int) -> np.ndarray:
    """(*S) -> (n_slices, voxels_per_slice); a 2D array is one slice."""
    if array.ndim == 2:
        return array.reshape(1, -1)
    return np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)


def _check_maps(uncertainty: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """The two maps as arrays; ValueError unless they share one 2D or 3D shape."""
    uncertainty, labels = np.asarray(uncertainty), np.asarray(labels)
    if uncertainty.shape != labels.shape:
        raise ValueError(f"uncertainty shape {uncertainty.shape} differs from labels shape {labels.shape}")
    if uncertainty.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D map, got shape {uncertainty.shape}")
    return uncertainty, labels
