"""The simulated user of benchmarks/interactive.py: where its clicks land and how it scores."""

from __future__ import annotations

import numpy as np
import pytest

from tests.benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("interactive") as module:
        yield module


def test_the_oracle_clicks_the_centre_of_the_largest_error_region(bench):
    truth = np.zeros((9, 20, 20), dtype=np.uint8)
    labels = truth.copy()
    labels[1:8, 3:10, 3:10] = 1  # 7 x 7 x 7 wrong voxels: the largest error region
    labels[0, 15, 15] = 2  # one stray wrong voxel
    at = bench.deepest_error(labels, truth)
    assert at == (4, 6, 6)
    assert labels[at] != truth[at]


def test_the_oracle_inside_a_box_looks_only_there(bench):
    truth = np.zeros((9, 20, 20), dtype=np.uint8)
    labels = truth.copy()
    labels[2:7, 3:10, 3:10] = 1
    labels[1:4, 14:18, 14:18] = 1
    box = (slice(0, 9), slice(12, 20), slice(12, 20))
    at = bench.deepest_error(labels, truth, box)
    assert 14 <= at[1] < 18 and 14 <= at[2] < 18
    assert bench.deepest_error(truth, truth) is None


def test_mean_dice_and_clicks_to_a_target(bench):
    truth = np.zeros((1, 4, 4), dtype=np.uint8)
    truth[0, :2] = 1
    labels = truth.copy()
    assert bench.mean_dice(labels, truth, 2) == 1.0
    labels[0, 0, 0] = 0
    assert bench.mean_dice(labels, truth, 2) == pytest.approx(2 * 7 / 15)
    assert bench.clicks_to([0.5, 0.85, 0.91, 0.95], 0.90) == 2
    assert bench.clicks_to([0.5, 0.6], 0.90) is None


def test_error_shape_tells_boundary_slivers_from_blobs(bench):
    truth = np.zeros((12, 12, 12), dtype=np.uint8)
    truth[:, :, 6:] = 1
    sliver = truth.copy()
    sliver[:, :, 6] = 0  # the boundary moved by one voxel
    shape = bench.error_shape(sliver, truth)
    assert shape["errors"] == 144 and shape["on_boundary"] == 1.0 and shape["deep"] == 0.0
    blob = truth.copy()
    blob[3:9, 3:9, 0:5] = 1  # a blob deep in class 0
    assert bench.error_shape(blob, truth)["deep"] > 0.2


def test_click_ceiling_finds_the_best_threshold_and_counts_what_it_breaks(bench):
    truth = np.zeros((12, 12, 12), dtype=np.uint8)
    truth[:, :, 6:] = 1
    labels = truth.copy()
    labels[:, :, 6:8] = 0  # class 1 shrunk by two voxels everywhere: 288 wrong voxels
    ramp = np.broadcast_to(np.arange(12, dtype=np.float32) / 12, truth.shape)
    probabilities = np.stack([1.0 - 0.9 * ramp, 0.1 + 0.9 * ramp]).astype(np.float32)
    ceiling = bench.click_ceiling(labels, truth, probabilities, ramp[None], (1.0, 1.0, 1.0), radii=(100.0,))
    assert (ceiling["from"], ceiling["to"]) == (0, 1)
    # both scores rise towards class 1: the best threshold relabels exactly the two wrong columns
    assert [(r["signal"], r["net"], r["flipped"]) for r in ceiling["rows"]] == [
        ("model log-odds", 288, 288),
        ("intensity", 288, 288),
    ]
    # a score that ranks the right voxels first gains nothing at any threshold
    backwards = probabilities[::-1].copy()
    rows = bench.click_ceiling(labels, truth, backwards, -ramp[None], (1.0, 1.0, 1.0), radii=(100.0,))["rows"]
    assert rows[0]["net"] == 0 and rows[0]["flipped"] == 0


def test_local_ceiling_sets_right_what_balls_around_the_clicks_reach(bench):
    truth = np.zeros((5, 40, 40), dtype=np.uint8)
    truth[:, 5:35, 5:35] = 1
    labels = truth.copy()
    labels[2, 10, 10] = 0  # one wrong voxel far from the rest
    labels[1:4, 28:31, 28:31] = 0  # a 27-voxel hole
    wrong = int((labels != truth).sum())
    one = bench.local_ceiling(labels, truth, (1.0, 1.0, 1.0), 2, radius_mm=1.5, clicks=(1, 2, 30))
    assert one["wrong"] == wrong == 28
    # a ball of 1.5 mm holds the voxel and its 18 neighbours at distance <= sqrt(2): 19 of the hole's voxels
    assert one["fullest"] == 19
    assert 0 < one["gains"][1] < one["gains"][2] <= one["gains"][30]
    assert one["gains"][30] == pytest.approx(1.0 - bench.mean_dice(labels, truth, 2))  # all set right at last
    # spacing counts in mm: with 4 mm slices a 1.5 mm ball is one slice thick, 9 voxels
    coarse = bench.local_ceiling(labels, truth, (4.0, 1.0, 1.0), 2, radius_mm=1.5, clicks=(1,))
    assert coarse["fullest"] == 9
