"""Training patches: nnU-Net's foreground oversampling, padding of small cases, 2D slices of 3D volumes.

Sample ``i`` of epoch ``e`` is a pure function of (seed, e, i): its random generator is seeded with exactly
that triple, so DataLoader workers need no shared random state, a resumed run draws the same patches, and
under DDP every rank draws different samples because the DistributedSampler gives it different indices.

Per sample: pick a case uniformly; with probability ``foreground_fraction`` pick a foreground class present
in it, then one of its voxels (from up to 10,000 remembered per class, as nnU-Net) and place the patch so that
the voxel is at its centre, shifted only as much as needed to keep the patch inside the case; otherwise place
the patch uniformly. A case smaller than the patch is padded with zeros (background labels). For a 2D model on
3D cases the patch is a slice along axis 0: the foreground voxel's slice, or a uniformly drawn one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from training.data.augmentation import Augmenter, spatial_margin
from training.data.config import AugmentationConfig
from training.data.preprocessing import PreparedCase, class_locations

__all__ = ["PatchDataset", "PatchPlan", "crop_padded"]


@dataclass(frozen=True)
class PatchPlan:
    """Where sample ``i`` comes from: ``case`` index, ``slice_index`` along axis 0 (2D from 3D, else None),
    ``start`` of the patch in the case (or slice) grid, and whether it was placed on a ``foreground`` voxel
    (``voxel``, in the case grid)."""

    case: int
    slice_index: int | None
    start: tuple[int, ...]
    foreground: bool
    voxel: tuple[int, ...] | None


def crop_padded(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[..., start:start+size]`` over the trailing ``len(size)`` axes, zero where it leaves the array.

    Leading axes (channels) are kept whole. Returns a new contiguous array of ``array``'s dtype."""
    lead = array.ndim - len(size)
    out = np.zeros((*array.shape[:lead], *size), dtype=array.dtype)
    src, dst = [], []
    for s, n, length in zip(start, size, array.shape[lead:]):
        lo, hi = max(s, 0), min(s + n, length)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


class PatchDataset(torch.utils.data.Dataset):
    """``samples_per_epoch`` random training patches per epoch from ``cases``.

    ``patch_size``: ``spatial_dims`` ints. ``augmentation`` None (or ``enabled: false``): patches as sampled.
    ``__getitem__(i)`` -> ``{"image": (C, *P) float32, "label": (*P) int64}``, deterministic per
    (seed, epoch, i). Call :meth:`set_epoch` before each epoch; workers must be re-created per epoch to see
    it (the DataLoader default ``persistent_workers=False`` does that).
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        patch_size: Sequence[int],
        *,
        spatial_dims: int,
        samples_per_epoch: int,
        foreground_fraction: float,
        augmentation: AugmentationConfig | None,
        seed: int,
    ):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if not cases:
            raise ValueError("PatchDataset needs at least one case")
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != spatial_dims or any(p < 1 for p in patch):
            raise ValueError(f"patch_size must be {spatial_dims} positive integers, got {list(patch_size)}")
        for case in cases:
            if not (case.label.ndim == spatial_dims or (spatial_dims == 2 and case.label.ndim == 3)):
                raise ValueError(
                    f"case {case.case_id}: a {case.label.ndim}D case cannot give {spatial_dims}D patches"
                )
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch!r}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction!r}")
        self.cases = list(cases)
        self.patch_size = patch
        self.spatial_dims = spatial_dims
        self.samples_per_epoch = int(samples_per_epoch)
        self.foreground_fraction = float(foreground_fraction)
        self.augmenter = (
            Augmenter(augmentation, spatial_dims)
            if augmentation is not None and augmentation.enabled
            else None
        )
        self.seed = int(seed) % 2**63  # numpy seed sequences take non-negative integers
        self.epoch = 0
        # Per case {class: voxel positions}: prepared (and cached) with the case, else found here once.
        self.locations = [
            case.locations if case.locations is not None else class_locations(case.label, case.case_id)
            for case in self.cases
        ]

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _generator(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"sample index {index} out of range 0..{self.samples_per_epoch - 1}")
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def plan(self, index: int) -> PatchPlan:
        """Where sample ``index`` of the current epoch comes from (what ``__getitem__`` uses)."""
        return self._plan(self._generator(index))

    def _plan(self, rng: np.random.Generator) -> PatchPlan:
        k = int(rng.integers(len(self.cases)))
        case, locations = self.cases[k], self.locations[k]
        slices = case.label.ndim == self.spatial_dims + 1  # 2D patches from a 3D case
        grid = case.label.shape[1:] if slices else case.label.shape
        voxel = None
        if rng.random() < self.foreground_fraction and locations:
            classes = sorted(locations)
            found = locations[classes[int(rng.integers(len(classes)))]]
            voxel = tuple(int(v) for v in found[int(rng.integers(len(found)))])
        if voxel is not None:
            centre = voxel[1:] if slices else voxel
            slice_index = voxel[0] if slices else None
            start = tuple(
                int(np.clip(c - p // 2, min(0, n - p), max(0, n - p)))
                for c, p, n in zip(centre, self.patch_size, grid)
            )
        else:
            slice_index = int(rng.integers(case.label.shape[0])) if slices else None
            start = tuple(
                int(rng.integers(min(0, n - p), max(0, n - p) + 1)) for p, n in zip(self.patch_size, grid)
            )
        return PatchPlan(k, slice_index, start, voxel is not None, voxel)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._generator(index)
        plan = self._plan(rng)
        case = self.cases[plan.case]
        image, label = case.image, case.label
        spacing = tuple(case.spacing)
        if plan.slice_index is not None:
            image, label = image[:, plan.slice_index], label[plan.slice_index]  # (C, Y, X), (Y, X)
            spacing = spacing[1:]
        aug = self.augmenter
        params = aug.spatial_params(rng, self.patch_size, spacing) if aug is not None else None
        margin = spatial_margin(params, self.patch_size)
        start = [s - m for s, m in zip(plan.start, margin)]
        size = [p + 2 * m for p, m in zip(self.patch_size, margin)]
        image_region = crop_padded(image, start, size)  # (C, *R)
        label_region = crop_padded(label, start, size)  # (*R)
        if aug is None:
            return {
                "image": torch.from_numpy(image_region.astype(np.float32, copy=False)),
                "label": torch.from_numpy(label_region.astype(np.int64)),
            }
        if params is not None:
            image_t, label_t = aug.warp(image_region, label_region, params, self.patch_size)
        else:
            image_t = torch.from_numpy(image_region.astype(np.float32, copy=False))
            label_t = torch.from_numpy(label_region.astype(np.int64))
        image_t, label_t = aug.flip(rng, image_t, label_t)
        image_t = aug.intensity(image_t, seed=int(rng.integers(2**31 - 1)))
        return {"image": image_t.contiguous(), "label": label_t.contiguous()}
