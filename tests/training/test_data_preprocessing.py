"""Preprocessing: target spacing, resampling, normalisation, crop, cache, splits and label fractions."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import napari_medcl.io
from napari_medcl.io import read_image
from napari_medcl.preprocess import resampled_shape
from tests.dataset_factory import make_acdc_dataset, make_msd_dataset
from training.data import DataConfig, DatasetError, prepare_dataset
from training.data.layouts import CaseFiles
from training.data.preprocessing import split_cases, subsample_cases

SPACINGS = [(2.0, 1.0, 1.2), (2.4, 1.0, 1.2), (1.6, 1.2, 1.2), (2.0, 0.8, 1.5), (3.0, 1.0, 1.2)]


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "msd"
    return make_msd_dataset(root, n_cases=5, shape=(8, 14, 12), spacings=SPACINGS, num_classes=3)


def _cfg(root: Path, tmp_path: Path, **changes) -> DataConfig:
    changes.setdefault("num_folds", 5)
    return DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), **changes)


def _count_reads(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    original = napari_medcl.io.read_image

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(napari_medcl.io, "read_image", counting)
    return calls


def test_median_spacing_and_resampled_shapes(msd, tmp_path):
    info, train, val = prepare_dataset(_cfg(msd, tmp_path, crop_nonzero=False), spatial_dims=3, seed=0)
    median = tuple(np.median(np.array(SPACINGS), axis=0))
    assert info.spacing == pytest.approx(median, rel=1e-6)
    assert (info.num_classes, info.in_channels, info.class_names) == (
        3,
        1,
        ["background", "class1", "class2"],
    )
    assert len(train) == 4 and len(val) == 1
    for case in [*train, *val]:
        k = int(case.case_id[-3:])
        assert case.image.shape == (1, *resampled_shape((8, 14, 12), SPACINGS[k], median))
        assert case.label.shape == case.image.shape[1:]
        assert case.spacing == pytest.approx(median, rel=1e-6)
        assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
        assert set(np.unique(case.label)) <= {0, 1, 2}
        assert case.source["original_spacing"] == pytest.approx(SPACINGS[k], rel=1e-6)
    assert info.median_shape == tuple(
        int(v) for v in np.median([c.label.shape for c in [*train, *val]], axis=0)
    )


def test_labels_survive_resampling(msd, tmp_path):
    """Nearest-neighbour labels: same class set, and the class volumes stay close in mm^3."""
    _, train, val = prepare_dataset(
        _cfg(msd, tmp_path, crop_nonzero=False, target_spacing=(1.0, 0.7, 0.9)), spatial_dims=3, seed=0
    )
    for case in [*train, *val]:
        original = read_image(Path(case.source["label"]))
        assert set(np.unique(case.label)) == set(np.unique(original.array))
        for cls in (1, 2):
            before = (original.array == cls).sum() * np.prod(original.spacing)
            after = (case.label == cls).sum() * np.prod(case.spacing)
            assert after == pytest.approx(before, rel=0.3)


def test_zscore_over_the_nonzero_mask_and_crop(msd, tmp_path):
    _, train, val = prepare_dataset(_cfg(msd, tmp_path, target_spacing=None), spatial_dims=3, seed=0)
    for case in [*train, *val]:
        original = read_image(Path(case.source["images"][0])).array
        label = read_image(Path(case.source["label"])).array
        keep = np.argwhere((original != 0) | (label > 0))  # the factory leaves a zero border around the body
        box = tuple(slice(lo, hi + 1) for lo, hi in zip(keep.min(0), keep.max(0)))
        assert case.source["crop_box"] == [[s.start, s.stop] for s in box]
        assert case.image.shape[1:] == original[box].shape != original.shape
        values = case.image[0][original[box] != 0]
        assert abs(values.mean()) < 1e-4 and values.std() == pytest.approx(1.0, abs=1e-4)


def test_ct_clips_to_training_foreground_percentiles(tmp_path):
    root = make_msd_dataset(tmp_path / "ct", n_cases=4, shape=(10, 32, 32), modality="CT", num_classes=2)
    info, train, val = prepare_dataset(
        _cfg(root, tmp_path, num_folds=4, target_spacing=None), spatial_dims=3, seed=0
    )
    norm = info.normalization
    assert norm["kind"] == "ct"
    foreground = []
    for case in train:  # the statistics come from the training cases only (few voxels: all of them are used)
        image = read_image(Path(case.source["images"][0])).array
        foreground.append(image[read_image(Path(case.source["label"])).array > 0])
    foreground = np.concatenate(foreground).astype(np.float64)
    assert norm["clip_low"] == pytest.approx(np.percentile(foreground, 0.5), rel=1e-5)
    assert norm["clip_high"] == pytest.approx(np.percentile(foreground, 99.5), rel=1e-5)
    assert norm["mean"] == pytest.approx(foreground.mean(), rel=1e-5)
    assert norm["std"] == pytest.approx(foreground.std(), rel=1e-5)
    assert norm["clip_high"] < 3000  # the 0.25% metal voxels are clipped
    top = (norm["clip_high"] - norm["mean"]) / norm["std"]
    bottom = (norm["clip_low"] - norm["mean"]) / norm["std"]
    for case in [*train, *val]:
        assert case.image.max() == pytest.approx(top, rel=1e-4)
        assert case.image.min() == pytest.approx(bottom, rel=1e-4)  # air at -1000 HU is clipped too


def test_mixed_channel_kinds_give_per_channel_normalisation(tmp_path):
    root = make_msd_dataset(tmp_path / "mix", n_cases=2, shape=(5, 8, 8), modality="CT", channels=2)
    info, _, _ = prepare_dataset(_cfg(root, tmp_path, val_fraction=0.5), spatial_dims=3, seed=0)
    assert info.normalization["kind"] == "per_channel"
    assert [c["kind"] for c in info.normalization["channels"]] == ["ct", "zscore"]


def test_rescale_normalisation_and_named_validation_cases(msd, tmp_path):
    cfg = _cfg(msd, tmp_path, normalization="rescale", val_cases=("case_001",))
    info, train, val = prepare_dataset(cfg, spatial_dims=3, seed=0)
    assert info.normalization == {"kind": "rescale", "low": 0.5, "high": 99.5, "use_nonzero_mask": True}
    assert [c.case_id for c in val] == ["case_001"] and len(train) == 4
    inside = train[0].image[0][train[0].image[0] != train[0].image[0].min()]
    assert -0.1 < np.percentile(inside, 50) < 1.1  # percentiles mapped to 0 and 1, not a z-score


def test_cache_hit_reads_no_image(msd, tmp_path, monkeypatch):
    calls = _count_reads(monkeypatch)
    cfg = _cfg(msd, tmp_path)
    _, train1, val1 = prepare_dataset(cfg, spatial_dims=3, seed=0)
    assert len(calls) == 2 * 2 * 5  # check pass + preprocessing pass, image + label, 5 cases
    calls.clear()
    _, train2, val2 = prepare_dataset(cfg, spatial_dims=3, seed=0)
    assert calls == []
    for a, b in zip([*train1, *val1], [*train2, *val2]):
        assert a.case_id == b.case_id
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert isinstance(b.image, np.memmap)  # loaded memory-mapped, shared by DataLoader workers
        assert sorted(b.locations) == sorted(a.locations) == [1, 2]  # foreground positions for sampling
        for cls, where in b.locations.items():
            np.testing.assert_array_equal(where, a.locations[cls])
            assert (b.label[tuple(where.T)] == cls).all()
    pickle.loads(pickle.dumps(train2[0]))  # spawn-started workers can still receive cases

    prepare_dataset(_cfg(msd, tmp_path, crop_nonzero=False), spatial_dims=3, seed=0)
    assert len(calls) == 2 * 5  # other settings: preprocessing again, the check pass still cached
    calls.clear()
    label = msd / "labelsTr" / "case_002.nii.gz"
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    prepare_dataset(cfg, spatial_dims=3, seed=0)
    assert sorted({p.name for p in calls}) == ["case_002.nii.gz", "case_002_0000.nii.gz"]


def test_unwritable_cache_goes_on_in_memory(msd, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    _, train, _ = prepare_dataset(
        DataConfig(root=str(msd), cache_dir=str(blocker / "cache")), spatial_dims=3, seed=0
    )
    assert len(train) == 4 and not isinstance(train[0].image, np.memmap)


def _cases(n: int, per_subject: int = 1) -> list[CaseFiles]:
    return [
        CaseFiles(
            f"s{k // per_subject:03d}_c{k % per_subject}", (Path("x"),), Path("y"), f"s{k // per_subject:03d}"
        )
        for k in range(n)
    ]


def test_folds_are_disjoint_and_cover_every_subject():
    cases = _cases(23, per_subject=2)
    seen: list[str] = []
    for fold in range(5):
        train, val = split_cases(cases, fold=fold, num_folds=5, val_fraction=None, split_seed=12345)
        assert {c.case_id for c in train}.isdisjoint({c.case_id for c in val})
        assert len(train) + len(val) == len(cases)
        assert {c.subject for c in train}.isdisjoint({c.subject for c in val})  # frames stay together
        seen += [c.case_id for c in val]
    assert sorted(seen) == sorted(c.case_id for c in cases)
    again = split_cases(cases, fold=2, num_folds=5, val_fraction=None, split_seed=12345)[1]
    assert again == split_cases(cases, fold=2, num_folds=5, val_fraction=None, split_seed=12345)[1]
    with pytest.raises(DatasetError, match="3 subject"):
        split_cases(_cases(3), fold=0, num_folds=5, val_fraction=None, split_seed=0)


def test_val_cases_name_the_validation_set():
    cases = _cases(6, per_subject=2)
    train, val = split_cases(
        cases, fold=0, num_folds=5, val_fraction=None, split_seed=1, val_cases=["s001_c0", "s002"]
    )
    assert [c.case_id for c in val] == ["s001_c0", "s001_c1", "s002_c0", "s002_c1"]  # frames stay together
    assert [c.case_id for c in train] == ["s000_c0", "s000_c1"]
    with pytest.raises(DatasetError, match="s009"):
        split_cases(cases, fold=0, num_folds=5, val_fraction=None, split_seed=1, val_cases=["s009"])
    with pytest.raises(DatasetError, match="nothing is left"):
        split_cases(
            cases, fold=0, num_folds=5, val_fraction=None, split_seed=1, val_cases=["s000", "s001", "s002"]
        )
    with pytest.raises(ValueError, match="val_cases"):
        DataConfig(root="x", val_cases="s000")


def test_val_fraction_split():
    train, val = split_cases(_cases(20), fold=0, num_folds=5, val_fraction=0.25, split_seed=1)
    assert len(val) == 5 and len(train) == 15
    assert split_cases(_cases(2), fold=0, num_folds=5, val_fraction=0.01, split_seed=1)[1] != []


def test_fraction_subsampling_is_seeded_nested_and_keeps_one():
    cases = _cases(40)
    half = subsample_cases(cases, 0.5, seed=3)
    tenth = subsample_cases(cases, 0.1, seed=3)
    assert len(half) == 20 and len(tenth) == 4
    assert {c.case_id for c in tenth} <= {c.case_id for c in half}
    assert half == subsample_cases(cases, 0.5, seed=3)
    assert half != subsample_cases(cases, 0.5, seed=4)
    assert len(subsample_cases(cases, 0.001, seed=3)) == 1
    assert subsample_cases(cases, 1.0, seed=3) == cases


def test_fraction_applies_to_training_cases_only(msd, tmp_path):
    _, train, val = prepare_dataset(_cfg(msd, tmp_path, fraction=0.5), spatial_dims=3, seed=0)
    assert (len(train), len(val)) == (2, 1)


def test_2d_model_on_3d_volumes_resamples_in_plane(tmp_path):
    spacing = (8.0, 1.25, 1.25)
    root = make_acdc_dataset(tmp_path / "acdc", n_patients=2, shape=(4, 16, 14), spacing=spacing)
    cfg = DataConfig(root=str(root), layout="acdc", val_fraction=0.5, target_spacing=(1.0, 1.0))
    info, train, val = prepare_dataset(cfg, spatial_dims=2, seed=0, cache_dir=tmp_path / "cache")
    assert info.spacing == (1.0, 1.0)
    assert info.median_shape == (20, 18)
    for case in [*train, *val]:
        assert case.image.shape == (1, 4, 20, 18)  # z untouched, y and x at 1 mm
        assert case.spacing == pytest.approx((8.0, 1.0, 1.0))
    with pytest.raises(DatasetError, match="a 2D model takes 2"):
        prepare_dataset(
            DataConfig(root=str(root), layout="acdc", val_fraction=0.5, target_spacing=(8.0, 1.0, 1.0)),
            spatial_dims=2,
            seed=0,
            cache_dir=tmp_path / "cache",
        )


def test_labels_fill_nonzero_needs_both_regions_and_an_exact_match():
    from napari_medcl.volume import Volume
    from training.data.preprocessing import labels_fill_nonzero

    image = np.zeros((2, 4, 5), np.float32)
    image[0, 1:3, 1:4] = 5.0
    image[1, 3, 4] = -1.0  # non-zero in the second channel only still counts
    nonzero = Volume(image, (1.0, 1.0), (0.0, 0.0), np.eye(2), channel_axis=True).nonzero_mask()
    label = np.zeros((4, 5), np.uint8)
    label[1:3, 1:4] = 2
    label[3, 4] = 1
    np.testing.assert_array_equal(nonzero, label != 0)
    assert labels_fill_nonzero(nonzero, label)
    label[1, 1] = 0  # a background voxel inside the mask
    assert not labels_fill_nonzero(nonzero, label)
    assert not labels_fill_nonzero(np.ones((4, 5), bool), np.ones((4, 5), np.uint8))  # no zeros
    assert not labels_fill_nonzero(np.zeros((4, 5), bool), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="do not share a grid"):
        labels_fill_nonzero(nonzero, label[:3])


def test_dataset_info_says_whether_labels_fill_the_nonzero_mask(tmp_path):
    """Skull-stripped tissue labels (background exactly where the scan is zero) are detected on the
    original files of every case; one case that breaks the rule turns the flag off."""
    from napari_medcl.io import write_image

    root = make_msd_dataset(tmp_path / "tissue", n_cases=4, shape=(8, 14, 12), num_classes=3)
    info, _, _ = prepare_dataset(_cfg(root, tmp_path, num_folds=2), spatial_dims=3, seed=0)
    assert not info.nonzero_is_foreground  # the factory's body holds background voxels
    labels = sorted((root / "labelsTr").glob("*.nii.gz"))
    for path in labels:
        case = path.name.removesuffix(".nii.gz")
        scan = read_image(root / "imagesTr" / f"{case}_0000.nii.gz")
        label = read_image(path)
        filled = np.where(scan.array != 0, np.maximum(label.array, 1), 0).astype(np.uint8)
        write_image(label.with_array(filled), path)
    info, train, val = prepare_dataset(_cfg(root, tmp_path / "b", num_folds=2), spatial_dims=3, seed=0)
    assert info.nonzero_is_foreground and all(c.source["nonzero_is_foreground"] for c in [*train, *val])
    label = read_image(labels[-1])
    broken = label.array.copy()
    broken[np.argwhere(broken > 0)[0].tolist()[0], ...] = 0  # background inside the body on one slice
    write_image(label.with_array(broken), labels[-1])
    info, _, _ = prepare_dataset(_cfg(root, tmp_path / "c", num_folds=2), spatial_dims=3, seed=0)
    assert not info.nonzero_is_foreground
