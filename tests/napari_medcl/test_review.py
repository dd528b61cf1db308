"""Review ranking: pure numpy, no Qt."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medcl.review import rank_slices, region_center, uncertain_mask


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """(6, 8, 8): foreground block in slices 1..4; slice 3 is the most uncertain inside it."""
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[1:5, 2:6, 2:6] = 1
    u = np.zeros((6, 8, 8), np.float32)
    u[1:5, 2:6, 2:6] = [[[0.1]], [[0.2]], [[0.8]], [[0.4]]]
    # slice 5 has no foreground but a big uncertain background patch
    u[5, :, :] = 0.9
    return u, labels


def test_mean_in_foreground_orders_by_mean_and_skips_empty_slices():
    u, labels = _volume()
    ranked = rank_slices(u, labels, axis=0)
    assert [s.index for s in ranked] == [3, 4, 2, 1]
    top = ranked[0]
    assert top.score == pytest.approx(0.8)
    assert top.mean_in_foreground == pytest.approx(0.8)
    assert top.foreground_voxels == 16
    assert top.uncertain_voxels == 16  # 0.8 > 0.5


def test_volume_above_counts_all_voxels_of_the_slice_and_scales_by_spacing():
    u, labels = _volume()
    ranked = rank_slices(u, labels, axis=0, mode="volume_above", threshold=0.5, spacing=(2.0, 0.5, 0.5))
    assert [s.index for s in ranked] == [5, 3]
    assert ranked[0].uncertain_voxels == 64
    assert ranked[0].uncertain_mm == pytest.approx(64 * 0.5)
    assert np.isnan(ranked[0].mean_in_foreground)
    # a higher threshold drops slice 3
    assert [s.index for s in rank_slices(u, labels, mode="volume_above", threshold=0.85)] == [5]


def test_other_axis_and_limit():
    u, labels = _volume()
    # along x (axis 2) every foreground column 2..5 has the same mean
    ranked = rank_slices(u, labels, axis=2)
    assert [s.index for s in ranked] == [2, 3, 4, 5]  # ties keep slice order
    assert rank_slices(u, labels, axis=-1, limit=2) == ranked[:2]


def test_min_foreground_filters_stray_voxels():
    u, labels = _volume()
    labels[0, 0, 0] = 1
    u[0, 0, 0] = 1.0
    assert rank_slices(u, labels, min_foreground=1)[0].index == 0
    # the default floor is 1% of the largest slice foreground (16 voxels -> 1): the stray voxel still counts
    assert rank_slices(u, labels)[0].index == 0
    assert 0 not in [s.index for s in rank_slices(u, labels, min_foreground=2)]


def test_2d_map_is_one_slice():
    u = np.zeros((10, 12), np.float32)
    labels = np.zeros((10, 12), np.uint8)
    labels[2:5, 3:9] = 2
    u[2:5, 3:9] = 0.3
    ranked = rank_slices(u, labels, axis=1)
    assert len(ranked) == 1 and ranked[0].index == 0
    assert ranked[0].score == pytest.approx(0.3)
    assert region_center(u, labels, axis=0, index=0) == pytest.approx((3.0, 5.5))


def test_region_center_prefers_uncertain_voxels_then_foreground():
    u, labels = _volume()
    u[3, 2, 2] = 1.0  # one very uncertain corner voxel in slice 3
    assert region_center(u, labels, 0, 3, threshold=0.9) == pytest.approx((3.0, 2.0, 2.0))
    # without a threshold: centroid of the foreground, weighted by uncertainty (pulled toward the corner)
    z, y, x = region_center(u, labels, 0, 3)
    assert z == 3.0 and 2.0 < y < 3.5 and 2.0 < x < 3.5
    # a slice with neither foreground nor uncertainty: its geometric centre
    assert region_center(np.zeros_like(u), np.zeros_like(labels), 1, 4) == pytest.approx((2.5, 4.0, 3.5))


def test_uncertain_mask_and_errors():
    u, labels = _volume()
    mask = uncertain_mask(u, 0.5)
    assert mask.dtype == np.uint8 and mask.sum() == 16 + 64
    with pytest.raises(ValueError, match="mode"):
        rank_slices(u, labels, mode="max")
    with pytest.raises(ValueError, match="shape"):
        rank_slices(u, labels[:, :4])
    with pytest.raises(ValueError, match="axis 3"):
        rank_slices(u, labels, axis=3)
    with pytest.raises(ValueError, match="threshold"):
        uncertain_mask(u, 1.5)
    with pytest.raises(ValueError, match="slice index 9"):
        region_center(u, labels, 0, 9)


def test_expected_errors_ranks_by_the_sum_not_the_mean():
    from napari_medcl.review import rank_slices

    error = np.zeros((3, 10, 10), np.float32)
    labels = np.zeros((3, 10, 10), np.uint8)
    labels[0, 0, 0] = 1
    error[0, 0, 0] = 0.9  # a single doubtful voxel: the highest mean, few expected errors
    labels[1, :5] = 1
    error[1, :5] = 0.3  # 50 voxels at 0.3: 15 expected wrong voxels
    labels[2] = 1
    error[2] = 0.05  # 100 voxels at 0.05: 5
    ranked = rank_slices(error, labels, mode="expected_errors", spacing=(2.0, 0.5, 0.5))
    assert [s.index for s in ranked] == [1, 2, 0]
    assert ranked[0].expected_wrong_mm == pytest.approx(15 * 0.5)  # voxels of 0.5 mm^3
    assert ranked[0].labelled_mm == pytest.approx(50 * 0.25)  # in-plane area of 50 pixels
    assert [s.index for s in rank_slices(error, labels, min_foreground=1)][0] == 0  # the mean's choice


def test_rank_regions_by_expected_errors_with_boxes():
    from napari_medcl.review import rank_regions

    error = np.zeros((4, 12, 12), np.float32)
    labels = np.ones((4, 12, 12), np.uint8)
    error[1:3, 1:3, 1:3] = 0.95  # small and sure to be wrong: 8 voxels, 7.6 expected
    error[0:4, 6:11, 6:9] = 0.6  # large, moderate: 60 voxels, 36 expected
    error[3, 0, 11] = 0.55  # one voxel
    ranked = rank_regions(error, labels, threshold=0.5, spacing=(1.0, 1.0, 2.0))
    assert [r.voxels for r in ranked] == [60, 8, 1]
    assert ranked[0].box == (slice(0, 4), slice(6, 11), slice(6, 9))
    assert ranked[0].center == pytest.approx((1.5, 8.0, 7.0))
    assert ranked[0].expected_wrong_mm == pytest.approx(36 * 2.0)
    assert ranked[1].score == pytest.approx(8 * 0.95) and ranked[1].labelled_voxels == 8
    assert rank_regions(error, labels, threshold=0.96) == []
    assert len(rank_regions(error, labels, threshold=0.5, limit=2)) == 2
    with pytest.raises(ValueError, match="shape"):
        rank_regions(error, labels[:2])
