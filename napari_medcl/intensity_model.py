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
    labels found on them compete; outside ``eligible`` the result is 1 (the label is not in doubt)."""
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
    sigma = tuple(sigma_mm / max(float(s), 1e-6) if n > 1 else 0.0 for s, n in zip(spacing, labels.shape))

    def smooth(plane: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(plane, sigma, mode="constant", truncate=3.0)

    channels = image.astype(np.float64)
    floors = [_VARIANCE_FLOOR * float(c[where].var()) + 1e-12 for c in channels]
    # log prior + log likelihood of each competing label; the voxel's own label's term kept aside
    log_sum = np.full(labels.shape, -np.inf)
    own = np.zeros(labels.shape)
    for value in classes:
        member = ((labels == value) & where).astype(np.float64)
        share = smooth(member)
        present = share > _MIN_SHARE
        term = np.where(present, np.log(np.maximum(share, _MIN_SHARE)), -np.inf)
        for channel, floor in zip(channels, floors):
            mean = smooth(member * channel)
            second = smooth(member * channel * channel)
            safe = np.where(present, share, 1.0)
            mean /= safe
            variance = np.maximum(second / safe - mean * mean, floor)
            term += -0.5 * (channel - mean) ** 2 / variance - 0.5 * np.log(variance)
        log_sum = np.logaddexp(log_sum, term)
        mine = labels == value
        own[mine] = term[mine]
    with np.errstate(invalid="ignore"):  # -inf - -inf where no label is present nearby: left as 1
        probability = np.exp(own[where] - log_sum[where])
    result[where] = np.nan_to_num(probability, nan=1.0)
    return np.clip(result, 0.0, 1.0)
