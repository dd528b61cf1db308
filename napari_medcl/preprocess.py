"""The preprocessing that puts an image on a model's grid, for inference and for training (pure numpy).

``to_model_grid`` is the one place that decides what a model sees: normalise each channel as the spec says,
then resample linearly to the model's spacing when the image's differs by more than ``SPACING_RTOL``.
``napari_medcl.prediction`` calls it on every scan; ``training.data.preprocessing`` calls it on every
training case, with the label (resampled nearest on the same grid), so the two can never drift apart.

Both work on channel-first float arrays ``(C, *S)`` with ``S`` two or three spatial axes. Resampling changes
the spacing of axes that share one direction matrix, so it is separable: one 1-D linear interpolation per
axis. Source and target grids are centre-aligned (the middle of the image stays where it is), and positions
past the last voxel centre take the edge value, so resampling to a grid and back returns an array on exactly
the original grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

STD_FLOOR = 1e-8
# Spacings within this relative difference of the model's count as equal: the image is not resampled.
SPACING_RTOL = 1e-3
# Rows of the first axis processed at a time when computing statistics, so temporaries stay small.
_CHUNK_VOXELS = 1 << 22


def normalize(array: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """Normalise each channel of ``array`` (C, *S) as ``normalization`` (a ModelSpec field) says.

    ``zscore``: (x - mean) / std per channel; with ``"use_nonzero_mask": true`` the statistics come from the
    voxels where any channel is non-zero and voxels outside that mask are set to 0 (nnU-Net's convention).
    ``ct``: clip to [clip_low, clip_high], then (x - mean) / std with the spec's fixed mean and std.
    ``percentile``: clip to the image's ``low`` and ``high`` percentiles (0-100), then z-score.
    ``rescale``: map the image's ``low`` and ``high`` percentiles (0-100) to 0 and 1, without clipping (robust
    min-max, for MR whose tissue mix changes the mean and std of a field of view but barely its intensity range);
    with ``"use_nonzero_mask": true`` as for zscore: statistics from the mask, 0 outside it.
    ``none``: a float32 copy. std is floored at 1e-8 everywhere, so constant images give zeros.
    ``per_channel``: ``"channels"`` lists one of the above per channel (e.g. CT + MR inputs); a channel's
    non-zero mask then comes from that channel alone.
    Returns a new float32 array (C, *S).
    """
    kind = normalization.get("kind", "zscore")
    if kind == "per_channel":
        channels = normalization["channels"]
        if len(channels) != array.shape[0]:
            raise ValueError(
                f"per_channel normalisation lists {len(channels)} channels, the image has {array.shape[0]}"
            )
        return np.concatenate([normalize(array[i : i + 1], c) for i, c in enumerate(channels)])
    out = np.array(array, dtype=np.float32, copy=True)
    if kind == "none":
        return out
    mask = None
    if normalization.get("use_nonzero_mask", False):
        mask = np.any(array != 0, axis=0)
        if not mask.any():
            mask = None
    for channel in out:
        if kind == "ct":
            np.clip(channel, float(normalization["clip_low"]), float(normalization["clip_high"]), out=channel)
            mean, std = float(normalization["mean"]), float(normalization["std"])
        elif kind == "percentile":
            values = channel if mask is None else channel[mask]
            low, high = np.percentile(values, [float(normalization["low"]), float(normalization["high"])])
            np.clip(channel, low, high, out=channel)
            mean, std = _mean_std(channel, mask)
        elif kind == "rescale":
            values = channel if mask is None else channel[mask]
            low, high = np.percentile(values, [float(normalization["low"]), float(normalization["high"])])
            mean, std = float(low), float(high - low)
        elif kind == "zscore":
            mean, std = _mean_std(channel, mask)
        else:
            raise ValueError(f"unknown normalization kind {kind!r}")
        channel -= np.float32(mean)
        channel *= np.float32(1.0 / max(std, STD_FLOOR))
        if mask is not None and kind in ("zscore", "rescale"):
            # Outside the mask is what windows are padded with (0), as in training's crops: no third value.
            channel[~mask] = 0
    return out


def full_target(
    spacing: tuple[float, ...], model_spacing: Sequence[float] | None
) -> tuple[float, ...] | None:
    """The per-axis target spacing for an image of ``spacing``: the model's (None: keep the image's); a 2D
    model's two values on a 3D image (a 2D image runs as a depth-1 volume) keep the image's spacing along z."""
    if model_spacing is None:
        return None
    target = tuple(float(t) for t in model_spacing)
    return (*spacing[: len(spacing) - len(target)], *target)


def to_model_grid(
    array: np.ndarray,
    spacing: tuple[float, ...],
    normalization: dict[str, Any],
    target: tuple[float, ...] | None,
    *,
    label: np.ndarray | None = None,
    check_size: Callable[[tuple[int, ...]], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...] | None]:
    """Normalise ``array`` (C, *S) as ``normalization`` (a ModelSpec field) says, then resample it to the
    ``target`` spacing (one value per axis of S, see ``full_target``; None: as is).

    Returns (image (C, *S') float32, the label (*S') resampled nearest on the same grid or None, scales):
    ``scales`` = target / image spacing per axis, None when every axis is within ``SPACING_RTOL`` of the
    target and nothing was resampled. ``check_size(S')`` runs before the resampled image is allocated (to
    refuse a grid over a memory budget)."""
    data = normalize(array, normalization)
    if target is None or all(abs(s / t - 1.0) <= SPACING_RTOL for s, t in zip(spacing, target)):
        return data, label, None
    scales = tuple(t / s for s, t in zip(spacing, target))
    shape = resampled_shape(tuple(array.shape[1:]), spacing, target)
    if check_size is not None:
        check_size(shape)
    data = resample_linear(data, shape, scales)
    label = None if label is None else resample_nearest(label, shape, scales)
    return data, label, scales


def mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels of ``mask`` (*S), one slice per axis; None when there is none."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _mean_std(x: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    """Mean and standard deviation of ``x`` (over ``mask`` when given), in float64, one chunk at a time."""
    rows = max(1, _CHUNK_VOXELS // max(1, math.prod(x.shape[1:])))
    chunks = [slice(i, i + rows) for i in range(0, x.shape[0], rows)]

    def values(chunk: slice) -> np.ndarray:
        return x[chunk] if mask is None else x[chunk][mask[chunk]]

    count = sum(values(c).size for c in chunks)
    if count == 0:
        return 0.0, 0.0
    mean = sum(float(values(c).sum(dtype=np.float64)) for c in chunks) / count
    squares = 0.0
    for c in chunks:
        d = values(c).astype(np.float64).ravel() - mean
        squares += float(np.dot(d, d))
    return mean, math.sqrt(squares / count)


def resampled_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, ...]:
    """Grid size covering the same physical extent as ``shape`` at ``spacing``, at the ``target`` spacing."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def grid_coordinates(n_out: int, n_in: int, scale: float) -> np.ndarray:
    """Continuous source indices of the ``n_out`` centre-aligned target voxels (float64, not clamped).

    ``scale`` = target spacing / source spacing. The two grids share their centre."""
    return (n_in - 1) / 2.0 + (np.arange(n_out, dtype=np.float64) - (n_out - 1) / 2.0) * scale


def resampled_origin(
    origin: tuple[float, ...],
    spacing: tuple[float, ...],
    direction: np.ndarray,
    shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    target: tuple[float, ...],
) -> tuple[float, ...]:
    """Physical position of voxel 0 of the centre-aligned grid ``out_shape`` at ``target`` spacing."""
    first = np.array(
        [grid_coordinates(m, n, t / s)[0] for m, n, s, t in zip(out_shape, shape, spacing, target)]
    )
    return tuple(np.asarray(origin) + np.asarray(direction) @ (np.asarray(spacing) * first))


def resample_linear(
    array: np.ndarray,
    out_shape: tuple[int, ...],
    scales: tuple[float, ...],
    rows: slice | None = None,
) -> np.ndarray:
    """Linear resampling of ``array`` (C, *S_in) to (C, *out_shape) on centre-aligned grids.

    ``scales[i]`` = target spacing / source spacing of spatial axis i. Axes whose size and scale are
    unchanged are skipped; shrinking axes go first so the intermediate arrays stay small. float32 out.
    ``rows``: only these output rows along the first spatial axis, (C, len(rows), *out_shape[1:]); the same
    values as that slab of the whole result (to float32 rounding), computed from the input rows it needs, so
    a caller that works slab by slab never holds a whole-volume temporary.
    """
    spatial = array.shape[1:]
    if len(out_shape) != len(spatial) or len(scales) != len(spatial):
        raise ValueError(f"out_shape {out_shape} and scales {scales} must match the spatial shape {spatial}")
    out = np.asarray(array, dtype=np.float32)
    axes = [
        i
        for i, (n, m, s) in enumerate(zip(spatial, out_shape, scales))
        if not (n == m and abs(s - 1.0) < 1e-12)
    ]
    if rows is not None:
        start, stop, _ = rows.indices(out_shape[0])
        if 0 in axes:
            out = _interp_axis(out, 1, grid_coordinates(out_shape[0], spatial[0], scales[0])[start:stop])
            axes.remove(0)
        else:
            out = out[:, start:stop]
    for i in sorted(axes, key=lambda i: out_shape[i] / spatial[i]):
        out = _interp_axis(out, i + 1, grid_coordinates(out_shape[i], spatial[i], scales[i]))
    return out.copy() if np.may_share_memory(out, array) else out


def _interp_axis(a: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """1-D linear interpolation of ``a`` along ``axis`` at continuous indices ``coords`` (edge-clamped)."""
    n = a.shape[axis]
    c = np.clip(coords, 0.0, n - 1.0)
    lower = np.minimum(np.floor(c).astype(np.intp), max(n - 2, 0))
    upper = np.minimum(lower + 1, n - 1)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = (c - lower).astype(np.float32).reshape(shape)  # (1, .., n_out, .., 1)
    low = np.take(a, lower, axis=axis)
    high = np.take(a, upper, axis=axis)
    low *= 1.0 - w
    high *= w
    low += high
    return low


def resample_nearest(label: np.ndarray, out_shape: tuple[int, ...], scales: tuple[float, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of ``label`` (*S) to ``out_shape`` on the same centre-aligned grids as
    ``resample_linear`` (``scales`` = target / source spacing)."""
    out = label
    for axis, (n_in, n_out, scale) in enumerate(zip(label.shape, out_shape, scales)):
        if n_in == n_out and abs(scale - 1.0) < 1e-12:
            continue
        index = np.clip(np.rint(grid_coordinates(n_out, n_in, scale)), 0, n_in - 1).astype(np.intp)
        out = np.take(out, index, axis=axis)
    return np.ascontiguousarray(out)
