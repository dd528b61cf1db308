"""A second opinion on every label from the image alone: how well a voxel's intensity fits its label nearby.

Where tissue classes differ in intensity (brain MR: CSF, grey and white matter), a label is suspicious when
the voxel's intensity looks more like a neighbouring class than like the voxels that carry its own label
around it. The model here is deliberately simple and local: for each label, within a Gaussian neighbourhood
of ``sigma_mm``, the mean and variance of the image over the voxels carrying that label and the share of the
neighbourhood they take (the prior); each voxel's probability of each label is then that prior times the
Gaussian likelihood of its intensity (a product over channels), normalised over the labels. Being local, it
follows a smooth bias field; being fitted to the prediction's own labels, it needs no training data.

The error model (``napari_medcl.error_model``) reads it as the feature ``intensity_error_logit``; its
``consensus`` map multiplies the network's odds that a label is wrong by these odds (a product of two
experts). Measured figures: docs/uncertainty.md ("The intensity consensus").

Arrays are spatial grids ``S`` (2D or 3D); numpy and scipy.ndimage only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_SIGMA_MM = 8.0
# A label's local variance never falls below this share of the image's variance over the eligible voxels:
# a neighbourhood where a label holds a few identical voxels would otherwise claim certainty.
_VARIANCE_FLOOR = 1e-3
# Neighbourhoods where a label holds less than this (Gaussian-weighted) share give it no local estimate.
_MIN_SHARE = 1e-6


def label_probability(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    eligible: np.ndarray | None = None,
    *,
    sigma_mm: float = DEFAULT_SIGMA_MM,
) -> np.ndarray:
    """The local intensity model's probability of each voxel's own label, (S) float32 in [0, 1].

    ``image`` (C, *S) float, ``labels`` (S) int, ``spacing`` mm per axis of ``S``, ``eligible`` (S) bool:
    the voxels whose label can be wrong (None: all). Only eligible voxels inform the model and only the
    labels found on them compete; outside ``eligible`` the result is 1 (the label is not in doubt).

    The neighbourhood sums are taken on a grid coarser by a whole factor per axis (each coarse voxel at most
    half a sigma wide) and brought back by linear interpolation: the local statistics are smooth at that
    scale, and the work and memory stay a few float32 planes of ``S`` per label."""
    from scipy import ndimage

    labels = np.asarray(labels)
    image = np.asarray(image)
    if image.ndim != labels.ndim + 1 or image.shape[1:] != labels.shape:
        raise ValueError(f"image (C, *S) must match labels (S): image {image.shape}, labels {labels.shape}")
    if len(spacing) != labels.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {labels.ndim}D labels array")
    if sigma_mm <= 0:
        raise ValueError(f"sigma_mm must be positive, got {sigma_mm}")
    where = np.ones(labels.shape, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    if where.shape != labels.shape:
        raise ValueError(f"eligible mask {where.shape} does not match labels {labels.shape}")
    result = np.ones(labels.shape, dtype=np.float32)
    classes = np.unique(labels[where])
    if classes.size < 2:
        return result  # one label (or none) to choose from: the image cannot argue for another
    sigma = [sigma_mm / max(float(s), 1e-6) if n > 1 else 0.0 for s, n in zip(spacing, labels.shape)]
    factor = tuple(max(1, int(s // 2)) for s in sigma)
    coarse_sigma = tuple(s / f for s, f in zip(sigma, factor))
    channels = [np.asarray(c, dtype=np.float32) for c in image]
    floors = [_VARIANCE_FLOOR * float(c[where].var()) + 1e-12 for c in channels]

    def local_sum(plane: np.ndarray) -> np.ndarray:
        """Gaussian-weighted neighbourhood sum of ``plane`` (S), on the coarse grid (float64)."""
        pad = [(0, (-n) % f) for n, f in zip(plane.shape, factor)]
        padded = np.pad(plane, pad) if any(after for _, after in pad) else plane
        shape = [v for n, f in zip(padded.shape, factor) for v in (n // f, f)]
        blocks = padded.reshape(shape).sum(axis=tuple(range(1, 2 * plane.ndim, 2)), dtype=np.float64)
        return ndimage.gaussian_filter(blocks, coarse_sigma, mode="constant", truncate=3.0)

    def fine(coarse: np.ndarray) -> np.ndarray:
        """``coarse`` back on the grid of ``S`` (float32), each coarse voxel the centre of its block."""
        if all(f == 1 for f in factor):
            return coarse.astype(np.float32)
        grown = ndimage.zoom(
            coarse.astype(np.float32), factor, order=1, mode="nearest", grid_mode=True, prefilter=False
        )
        return np.ascontiguousarray(grown[tuple(slice(0, n) for n in labels.shape)])

    # log prior + log likelihood of each competing label; the voxel's own label's term kept aside
    log_sum = np.full(labels.shape, -np.inf, dtype=np.float32)  # the first label's term replaces it
    own = np.zeros(labels.shape, dtype=np.float32)
    for value in classes:
        member = (labels == value) & where
        count = local_sum(member.astype(np.float32))
        present = count > _MIN_SHARE * float(np.prod(factor))
        safe = np.where(present, count, 1.0)
        # finite where the label is absent (a prior of e^-69), so that interpolation never meets -inf
        term = fine(np.log(np.maximum(count, 1e-30)))
        for channel, floor in zip(channels, floors):
            inside = np.where(member, channel, 0.0).astype(np.float32)
            mean = local_sum(inside) / safe
            np.multiply(inside, channel, out=inside)
            variance = np.maximum(local_sum(inside) / safe - mean * mean, floor)
            del inside
            mean_fine, log_variance = fine(mean), fine(np.log(variance))
            deviation = channel - mean_fine
            np.square(deviation, out=deviation)
            deviation *= np.exp(-log_variance)
            deviation *= -0.5
            deviation -= 0.5 * log_variance
            term += deviation
            del deviation, mean_fine, log_variance
        np.logaddexp(log_sum, term, out=log_sum)
        mine = labels == value
        own[mine] = term[mine]
        del term
    result[where] = np.exp(own[where] - log_sum[where])
    return np.clip(result, 0.0, 1.0)
