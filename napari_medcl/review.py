"""Where should a reviewer look first? Rank slices by UAFR uncertainty and locate uncertain regions.

Pure numpy, no napari: the review panel of the widget calls these functions and only moves the viewer.
A 3D map is ranked slice by slice along a chosen axis; a 2D map is a single slice (index 0), in keeping with
the product's "2D is depth-1 3D" rule, so the panel still offers it and centres the view on its uncertain region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MODES = ("expected_errors", "mean_in_foreground", "volume_above")


@dataclass(frozen=True)
class SliceScore:
    """One slice's review priority.

    ``score`` is what the ranking sorts by: the sum of the map over the slice (``expected_errors``: with an
    error likelihood, the expected number of wrong voxels), the mean inside the predicted foreground
    (``mean_in_foreground``) or the number of voxels above the threshold (``volume_above``).
    ``uncertain_mm`` is ``uncertain_voxels`` times the voxel size in mm^3 (3D) or mm^2 (2D);
    ``expected_wrong_mm`` the sum of the map times the voxel size; ``labelled_mm`` the slice's labelled area
    (mm^2: foreground voxels times the in-plane pixel area; for a 2D image its voxel size).
    """

    index: int
    score: float
    mean_in_foreground: float
    foreground_voxels: int
    uncertain_voxels: int
    uncertain_mm: float
    expected_wrong_mm: float = 0.0
    labelled_mm: float = 0.0


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
    ``expected_errors`` ranks every slice with a non-zero sum of the map, most first: with a map that is a
    probability of error, the slices where the most wrong voxels are expected (a slice with a few voxels of
    label cannot top the list for a high mean, as it can with ``mean_in_foreground``).
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
    total = u.sum(axis=1, dtype=np.float64)
    if spacing is not None and len(spacing) != uncertainty.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {uncertainty.ndim}D map")
    voxel_size = float(np.prod(spacing)) if spacing is not None else 1.0
    in_plane = voxel_size
    if spacing is not None and uncertainty.ndim == 3:
        in_plane = float(np.prod([v for a, v in enumerate(spacing) if a != axis]))

    if mode == "expected_errors":
        keep = np.flatnonzero(total > 0)
        scores = total[keep]
    elif mode == "mean_in_foreground":
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
    by_mode = {"expected_errors": total, "mean_in_foreground": fg_mean, "volume_above": above}[mode]
    return [
        SliceScore(
            index=int(i),
            score=float(by_mode[i]),
            mean_in_foreground=float(fg_mean[i]),
            foreground_voxels=int(fg_count[i]),
            uncertain_voxels=int(above[i]),
            uncertain_mm=float(above[i]) * voxel_size,
            expected_wrong_mm=float(total[i]) * voxel_size,
            labelled_mm=float(fg_count[i]) * in_plane,
        )
        for i in order
    ]


@dataclass(frozen=True)
class RegionScore:
    """One connected region of the map above a threshold, as a review entry.

    ``box``: its bounding box (index slices, array order); ``center``: the map-weighted centroid (indices);
    ``expected_wrong_mm``: the sum of the map over the region times the voxel size (mm^3, or mm^2 in 2D);
    ``voxels``: its size; ``labelled_voxels``: how many of them carry a label.
    """

    box: tuple[slice, ...]
    center: tuple[float, ...]
    score: float
    expected_wrong_mm: float
    voxels: int
    labelled_voxels: int


def rank_regions(
    uncertainty: np.ndarray,
    labels: np.ndarray,
    *,
    threshold: float = 0.5,
    spacing: tuple[float, ...] | None = None,
    limit: int | None = None,
) -> list[RegionScore]:
    """Connected regions (faces touching, 2D or 3D) of ``uncertainty > threshold``, most expected errors first.

    uncertainty (*S) float in [0, 1], labels (*S) int, as in ``rank_slices``. A region's score is the sum of
    the map over it (with an error likelihood: the number of wrong voxels expected there), so a large region
    of moderate doubt can come before a small one of high doubt, as it holds more mistakes. Ties keep the
    order of the regions' first voxels. ``limit`` keeps only the first entries.
    """
    import SimpleITK as sitk

    uncertainty, labels = _check_maps(uncertainty, labels)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if spacing is not None and len(spacing) != uncertainty.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {uncertainty.ndim}D map")
    voxel_size = float(np.prod(spacing)) if spacing is not None else 1.0
    mask = sitk.GetImageFromArray((uncertainty > threshold).astype(np.uint8))
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(mask, False)).astype(np.int64)
    count = int(components.max())
    if count == 0:
        return []
    flat = components.ravel()
    weights = np.asarray(uncertainty, dtype=np.float64).ravel()
    sums = np.bincount(flat, weights=weights, minlength=count + 1)
    sizes = np.bincount(flat, minlength=count + 1)
    labelled = np.bincount(flat, weights=(np.asarray(labels).ravel() > 0), minlength=count + 1)
    grids = np.indices(uncertainty.shape, dtype=np.float64).reshape(uncertainty.ndim, -1)
    centroids = [np.bincount(flat, weights=g * weights, minlength=count + 1) for g in grids]
    lows = [np.full(count + 1, np.iinfo(np.int64).max) for _ in range(uncertainty.ndim)]
    highs = [np.full(count + 1, -1) for _ in range(uncertainty.ndim)]
    inside = flat > 0
    for axis in range(uncertainty.ndim):
        coordinate = grids[axis][inside].astype(np.int64)
        np.minimum.at(lows[axis], flat[inside], coordinate)
        np.maximum.at(highs[axis], flat[inside], coordinate)
    order = 1 + np.argsort(-sums[1:], kind="stable")
    if limit is not None:
        order = order[: max(0, int(limit))]
    return [
        RegionScore(
            box=tuple(slice(int(lows[a][k]), int(highs[a][k]) + 1) for a in range(uncertainty.ndim)),
            center=tuple(float(centroids[a][k] / sums[k]) for a in range(uncertainty.ndim)),
            score=float(sums[k]),
            expected_wrong_mm=float(sums[k]) * voxel_size,
            voxels=int(sizes[k]),
            labelled_voxels=int(labelled[k]),
        )
        for k in order
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
