"""Patch sampling (foreground oversampling, padding, 2D from 3D) and augmentation (seeded, labels intact)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from training.data import AugmentationConfig, PatchDataset, PreparedCase
from training.data.augmentation import Augmenter, spatial_margin
from training.data.sampling import crop_padded

# Every augmentation fires on every sample.
ALWAYS = AugmentationConfig(
    rotation_prob=1.0,
    scaling_prob=1.0,
    elastic_prob=1.0,
    elastic_magnitude=(2.0, 4.0),
    elastic_sigma=(2.0, 3.0),
    flip_prob=0.5,
    gamma_prob=1.0,
    gamma_inverted_prob=1.0,
    brightness_prob=1.0,
    contrast_prob=1.0,
    noise_prob=1.0,
    blur_prob=1.0,
    lowres_prob=1.0,
    bias_field_prob=1.0,
)
NONE = dataclasses.replace(
    ALWAYS,
    **{f.name: 0.0 for f in dataclasses.fields(AugmentationConfig) if f.name.endswith("_prob")},
)


def _case(shape, *, seed=0, classes=3, blob=3, name="c", spacing=None) -> PreparedCase:
    """A case whose image is 100 x label (plus nothing else), with one small cube per foreground class."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for cls in range(1, classes):
        corner = [int(rng.integers(0, max(1, n - blob))) for n in shape]
        label[tuple(slice(c, c + blob) for c in corner)] = cls
    image = (label.astype(np.float32) * 100.0)[None]
    return PreparedCase(name, image, label, tuple(spacing or (1.0,) * len(shape)), {})


def _dataset(cases, patch, *, augmentation=None, fg=0.33, n=64, seed=0, dims=None):
    return PatchDataset(
        cases,
        patch,
        spatial_dims=dims or len(patch),
        samples_per_epoch=n,
        foreground_fraction=fg,
        augmentation=augmentation,
        seed=seed,
    )


def test_crop_padded_pads_with_zeros():
    array = np.arange(2 * 4 * 5).reshape(2, 4, 5)
    out = crop_padded(array, (-1, 3), (3, 4))
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out[:, 1:, :2], array[:, :2, 3:])
    assert (out[:, 0] == 0).all() and (out[:, :, 2:] == 0).all()
    assert (crop_padded(array, (10, 10), (2, 2)) == 0).all()


def test_a_third_of_patches_centre_on_foreground():
    cases = [_case((20, 30, 30), seed=k, name=f"c{k}") for k in range(3)]
    ds = _dataset(cases, (8, 8, 8), n=3000)
    plans = [ds.plan(i) for i in range(len(ds))]
    share = np.mean([p.foreground for p in plans])
    assert 0.30 < share < 0.37
    for plan in plans[:300]:
        if plan.foreground:  # the chosen voxel is foreground and inside the patch
            label = cases[plan.case].label
            assert label[plan.voxel] > 0
            assert all(s <= v < s + 8 for s, v in zip(plan.start, plan.voxel))
    # Both foreground classes are drawn about equally often (class first, then voxel: nnU-Net).
    drawn = [cases[p.case].label[p.voxel] for p in plans if p.foreground]
    assert 0.4 < np.mean(np.array(drawn) == 1) < 0.6
    # Uniform patches rarely see the small cubes; foreground ones always do.
    contains = [bool((ds[i]["label"] > 0).any()) for i in range(200)]
    with_fg = [c for c, p in zip(contains, plans) if p.foreground]
    assert all(with_fg) and np.mean(contains) < 0.6


def test_samples_are_deterministic_per_seed_epoch_index():
    cases = [_case((12, 16, 16), seed=k, name=f"c{k}") for k in range(2)]
    ds = _dataset(cases, (8, 8, 8), augmentation=AugmentationConfig(), n=6)
    first = [ds[i] for i in range(6)]
    backwards = [ds[i] for i in reversed(range(6))][::-1]
    other = _dataset(cases, (8, 8, 8), augmentation=AugmentationConfig(), n=6)
    for a, b, c in zip(first, backwards, [other[i] for i in range(6)]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["image"], c["image"]) and torch.equal(a["label"], c["label"])
    ds.set_epoch(1)
    assert not all(torch.equal(a["image"], ds[i]["image"]) for i, a in enumerate(first))
    ds.set_epoch(0)
    assert torch.equal(first[3]["image"], ds[3]["image"])
    reseeded = _dataset(cases, (8, 8, 8), augmentation=AugmentationConfig(), n=6, seed=1)
    assert not all(torch.equal(a["image"], reseeded[i]["image"]) for i, a in enumerate(first))


def test_dataloader_workers_give_the_same_batches():
    cases = [_case((12, 16, 16), seed=k, name=f"c{k}") for k in range(2)]
    ds = _dataset(cases, (8, 8, 8), augmentation=ALWAYS, n=8)
    ds.set_epoch(2)
    serial = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0))
    parallel = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2))
    for a, b in zip(serial, parallel):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("augmentation", [None, ALWAYS])
def test_patch_shape_when_the_case_is_smaller(augmentation):
    ds = _dataset([_case((3, 5, 4), blob=2)], (8, 12, 6), augmentation=augmentation, n=8)
    for i in range(8):
        sample = ds[i]
        assert sample["image"].shape == (1, 8, 12, 6) and sample["image"].dtype == torch.float32
        assert sample["label"].shape == (8, 12, 6) and sample["label"].dtype == torch.int64
    plain = _dataset([_case((3, 5, 4), blob=2)], (8, 12, 6), n=8)
    sample = plain[0]
    start = plain.plan(0).start
    assert all(min(0, n - p) <= s <= 0 for s, n, p in zip(start, (3, 5, 4), (8, 12, 6)))
    assert (sample["label"] > 0).sum() == (plain.cases[0].label > 0).sum()  # the whole case, padded around


def test_2d_patches_from_3d_cases_are_slices():
    case = _case((5, 20, 18), classes=2, blob=2)
    ds = _dataset([case], (16, 16), n=400, dims=2)
    for i in range(40):
        plan, sample = ds.plan(i), ds[i]
        assert sample["image"].shape == (1, 16, 16) and sample["label"].shape == (16, 16)
        expected = crop_padded(case.label[plan.slice_index], plan.start, (16, 16))
        np.testing.assert_array_equal(sample["label"].numpy(), expected)
        if plan.foreground:
            assert plan.voxel[0] == plan.slice_index and case.label[plan.voxel] == 1
    assert len({ds.plan(i).slice_index for i in range(400)}) == 5
    with pytest.raises(ValueError, match="cannot give 3D patches"):
        _dataset([_case((20, 18))], (8, 8, 8))


@pytest.mark.parametrize("shape", [(24, 28), (12, 20, 20)])
def test_augmentation_changes_the_image_and_keeps_labels(shape):
    case = _case(shape, classes=3, blob=6)
    patch = tuple(min(16, n) for n in shape)
    ds = _dataset([case], patch, augmentation=ALWAYS, fg=1.0, n=12)
    plain = _dataset([case], patch, augmentation=None, fg=1.0, n=12)
    changed = 0
    for i in range(12):
        sample, raw = ds[i], plain[i]
        assert sample["image"].shape == raw["image"].shape and sample["label"].shape == raw["label"].shape
        assert torch.isfinite(sample["image"]).all()
        assert set(sample["label"].unique().tolist()) <= {0, 1, 2}
        changed += not torch.allclose(sample["image"], raw["image"])
    assert changed == 12


@pytest.mark.parametrize("dims", [2, 3])
def test_spatial_transform_moves_image_and_label_together(dims):
    """Rotation + scaling + elastic only: the warped image (100 x label, linear) still matches the warped
    label (nearest) away from blob edges."""
    shape = (30, 30) if dims == 2 else (16, 24, 24)
    case = _case(shape, classes=3, blob=8 if dims == 2 else 6)
    spatial = dataclasses.replace(NONE, rotation_prob=1.0, scaling_prob=1.0, elastic_prob=1.0)
    ds = _dataset([case], (16,) * dims, augmentation=spatial, fg=1.0, n=10)
    agree = []
    for i in range(10):
        sample = ds[i]
        agree.append((torch.round(sample["image"][0] / 100) == sample["label"]).float().mean().item())
    assert np.mean(agree) > 0.93
    assert ds.augmenter is not None
    assert not all(
        torch.equal(ds[i]["label"], _dataset([case], (16,) * dims, fg=1.0, n=10)[i]["label"])
        for i in range(10)
    )


def test_thick_slices_rotate_in_plane_only():
    augmenter = Augmenter(dataclasses.replace(NONE, rotation_prob=1.0, scaling_prob=1.0), 3)
    rng = np.random.default_rng(0)
    params = augmenter.spatial_params(rng, (8, 16, 16), (10.0, 1.0, 1.0))
    np.testing.assert_allclose(params.matrix[0], [1, 0, 0])
    np.testing.assert_allclose(params.matrix[:, 0], [1, 0, 0])
    iso = augmenter.spatial_params(rng, (8, 16, 16), (1.0, 1.0, 1.0))
    assert abs(iso.matrix[0, 1]) + abs(iso.matrix[0, 2]) > 0
    margin = spatial_margin(iso, (8, 16, 16))
    assert all(m > 0 for m in margin)


def test_disabled_augmentation_returns_the_plain_crop():
    case = _case((10, 12, 12))
    off = dataclasses.replace(ALWAYS, enabled=False)
    ds, plain = _dataset([case], (8, 8, 8), augmentation=off, n=4), _dataset([case], (8, 8, 8), n=4)
    for i in range(4):
        assert torch.equal(ds[i]["image"], plain[i]["image"])
        assert torch.equal(ds[i]["label"], plain[i]["label"])
