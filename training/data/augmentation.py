"""Training-time augmentation of one patch (MONAI), reproducible from a per-sample seed.

Spatial transforms (rotation, isotropic scaling, elastic deformation) are folded into one sampling grid and
applied once with MONAI's ``Resample``: images linear, labels nearest, outside the case zero (background).
The grid is centred on the patch, so :func:`spatial_margin` says how much larger a region around the patch
must be read for the warped patch to see real voxels instead of padding (nnU-Net reads a larger patch too).
Mirroring follows (numpy, exact), then MONAI's intensity transforms on the image only, in nnU-Net's order:
noise, blur, brightness, contrast, low resolution, inverted gamma, gamma, bias field.

Every random choice comes from the numpy Generator passed in, or from a seed drawn from it for the MONAI
``Compose`` (``set_random_state``), so a sample depends only on its (seed, epoch, index) and not on which
DataLoader worker made it or in what order.

Cases whose spacing is more anisotropic than 3:1 (thick slices) rotate and scale in-plane only, as nnU-Net's
"dummy 2D" augmentation does, because a rotation out of plane would smear the coarse axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.data.config import AugmentationConfig

__all__ = ["Augmenter", "SpatialParams", "spatial_margin"]

ANISOTROPY_IN_PLANE = 3.0


@dataclass(frozen=True, eq=False)
class SpatialParams:
    """One draw of the spatial transforms: ``matrix`` (d, d) maps patch to case voxel offsets from the
    centre; ``displacement`` (d, *P) elastic offsets in voxels, or None."""

    matrix: np.ndarray
    displacement: np.ndarray | None


def spatial_margin(params: SpatialParams | None, patch_size: tuple[int, ...]) -> tuple[int, ...]:
    """Voxels to read beyond each side of the patch so every warped sample point (plus the linear
    interpolation's neighbour) lies inside the region that is read."""
    if params is None:
        return (0,) * len(patch_size)
    slack = 0.0 if params.displacement is None else float(np.abs(params.displacement).max())
    half = np.array([(p - 1) / 2 + slack for p in patch_size])  # (d,)
    reach = np.abs(params.matrix) @ half  # (d,) furthest offset from the centre along each case axis
    return tuple(max(0, math.ceil(r + 1 - (p - 1) / 2)) for r, p in zip(reach, patch_size))


class Augmenter:
    """Augments (image (C, *P), label (*P)) patches for a ``spatial_dims`` model as ``cfg`` says."""

    def __init__(self, cfg: AugmentationConfig, spatial_dims: int):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.cfg = cfg
        self.spatial_dims = spatial_dims
        self._intensity: Any = None  # MONAI Compose, built on first use in each process

    # ------------------------------------------------------------------------------------- spatial

    def spatial_params(
        self, rng: np.random.Generator, patch_size: tuple[int, ...], spacing: tuple[float, ...]
    ) -> SpatialParams | None:
        """Draw rotation, scaling and elastic deformation (each with its probability); None when none fires.

        ``spacing`` is the patch's spacing (one value per patch axis), used to detect thick slices."""
        cfg, d = self.cfg, self.spatial_dims
        rotate = cfg.enabled and rng.random() < cfg.rotation_prob
        scale = cfg.enabled and rng.random() < cfg.scaling_prob
        elastic = cfg.enabled and rng.random() < cfg.elastic_prob
        if not (rotate or scale or elastic):
            return None
        in_plane = d == 3 and max(spacing) / min(spacing) > ANISOTROPY_IN_PLANE
        matrix = np.eye(d)
        if rotate:
            limit = math.radians(
                cfg.rotation_degrees if cfg.rotation_degrees is not None else (180 if d == 2 else 30)
            )
            angles = rng.uniform(-limit, limit, size=1 if d == 2 else 3)
            if in_plane:
                angles[1:] = 0.0  # radians[0] turns within axes (1, 2): around the thick z axis
            matrix = _rotation(d, angles) @ matrix
        if scale:
            factor = rng.uniform(*cfg.scaling_range)
            factors = [1.0, factor, factor] if in_plane else [factor] * d
            matrix = np.diag(factors) @ matrix
        displacement = None
        if elastic:
            sigma = rng.uniform(*cfg.elastic_sigma)
            magnitude = rng.uniform(*cfg.elastic_magnitude)
            noise = rng.uniform(-1.0, 1.0, size=(d, *patch_size)).astype(np.float32)  # (d, *P)
            displacement = _smooth(noise, sigma, d) * np.float32(magnitude)
            if in_plane:
                displacement[0] = 0.0
        return SpatialParams(matrix, displacement)

    def warp(
        self, image: np.ndarray, label: np.ndarray, params: SpatialParams, patch_size: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resample the region (image (C, *R), label (*R), centred on the patch) into (C, *P), (*P)."""
        from monai.transforms import Resample
        from monai.transforms.utils import create_grid

        d = self.spatial_dims
        grid = create_grid(patch_size, homogeneous=True, backend="torch", dtype=torch.float32)  # (d+1, *P)
        coords = grid[:d]
        if params.displacement is not None:
            coords = coords + torch.from_numpy(params.displacement)
        matrix = torch.as_tensor(params.matrix, dtype=torch.float32)
        grid[:d] = torch.einsum("ij,j...->i...", matrix, coords)  # (d, *P) offsets from the region centre
        image_out = Resample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
            torch.from_numpy(np.ascontiguousarray(image)), grid
        )
        label_out = Resample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
            torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None], grid
        )
        return _plain(image_out), _plain(label_out)[0].round().to(torch.int64)

    # ------------------------------------------------------------------------------------- mirror + intensity

    def flip(
        self, rng: np.random.Generator, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mirror each spatial axis with ``flip_prob`` (image (C, *P), label (*P))."""
        if not self.cfg.enabled:
            return image, label
        axes = [a for a in range(self.spatial_dims) if rng.random() < self.cfg.flip_prob]
        if not axes:
            return image, label
        return torch.flip(image, [a + 1 for a in axes]), torch.flip(label, axes)

    def intensity(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """The MONAI intensity chain on image (C, *P), seeded with ``seed``."""
        if not self.cfg.enabled:
            return image
        if self._intensity is None:
            self._intensity = self._build_intensity()
        self._intensity.set_random_state(seed=seed)
        return _plain(self._intensity(image)).to(torch.float32)

    def _build_intensity(self) -> Any:
        from monai.transforms import (
            Compose,
            RandAdjustContrast,
            RandBiasField,
            RandGaussianNoise,
            RandGaussianSmooth,
            RandScaleIntensity,
            RandScaleIntensityFixedMean,
            RandSimulateLowResolution,
        )

        cfg = self.cfg
        blur = tuple(cfg.blur_sigma)
        return Compose(
            [
                RandGaussianNoise(prob=cfg.noise_prob, mean=0.0, std=cfg.noise_std),
                RandGaussianSmooth(sigma_x=blur, sigma_y=blur, sigma_z=blur, prob=cfg.blur_prob),
                RandScaleIntensity(
                    factors=(cfg.brightness_range[0] - 1, cfg.brightness_range[1] - 1),
                    prob=cfg.brightness_prob,
                ),
                RandScaleIntensityFixedMean(
                    factors=(cfg.contrast_range[0] - 1, cfg.contrast_range[1] - 1),
                    fixed_mean=True,
                    preserve_range=True,
                    prob=cfg.contrast_prob,
                ),
                RandSimulateLowResolution(
                    prob=cfg.lowres_prob,
                    zoom_range=tuple(cfg.lowres_zoom),
                    upsample_mode="trilinear" if self.spatial_dims == 3 else "bilinear",
                ),
                RandAdjustContrast(
                    prob=cfg.gamma_inverted_prob,
                    gamma=tuple(cfg.gamma_range),
                    invert_image=True,
                    retain_stats=True,
                ),
                RandAdjustContrast(prob=cfg.gamma_prob, gamma=tuple(cfg.gamma_range), retain_stats=True),
                RandBiasField(prob=cfg.bias_field_prob, coeff_range=tuple(cfg.bias_field_coefficients)),
            ]
        )


def _rotation(d: int, angles: np.ndarray) -> np.ndarray:
    """(d, d) rotation: in 2D by angles[0]; in 3D about axis 0, then 1, then 2 (MONAI's create_rotate)."""
    from monai.transforms.utils import create_rotate

    return np.asarray(create_rotate(d, tuple(float(a) for a in angles)), dtype=np.float64)[:d, :d]


def _smooth(noise: np.ndarray, sigma: float, d: int) -> np.ndarray:
    """Gaussian smoothing of every component of noise (d, *P). scipy rather than a torch convolution,
    whose sums depend on the thread count: a sample must not depend on the worker that made it."""
    from scipy.ndimage import gaussian_filter

    return np.stack([gaussian_filter(component, sigma, mode="constant", cval=0.0) for component in noise])


def _plain(x: Any) -> torch.Tensor:
    """A plain torch.Tensor from MONAI's MetaTensor (or anything tensor-like)."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x)
