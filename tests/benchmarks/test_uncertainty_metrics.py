"""The error-detection benchmark's metrics on hand-made arrays with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tests.benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def unc():
    with benchmark_module("uncertainty") as module:
        yield module


def _brute_auroc(scores, errors) -> float:
    """P(score of an error > score of a correct voxel) + half P(tie), over every pair."""
    pos = [s for s, e in zip(scores, errors) if e]
    neg = [s for s, e in zip(scores, errors) if not e]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_perfect_inverted_constant_and_ties(unc):
    errors = np.array([0, 0, 0, 1, 1], bool)
    assert unc.auroc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), errors) == 1.0
    assert unc.auroc(np.array([0.9, 0.8, 0.7, 0.2, 0.1]), errors) == 0.0
    assert unc.auroc(np.full(5, 0.4), errors) == 0.5
    # one error tied with one of three correct voxels, above the other two: (2 + 0.5) / 3 per error
    assert unc.auroc(np.array([0.1, 0.2, 0.5, 0.5, 0.9]), errors) == pytest.approx((2.5 + 3) / 6)
    assert math.isnan(unc.auroc(np.ones(3), np.zeros(3, bool)))


def test_auroc_matches_brute_force_with_many_ties(unc):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, 60) / 4  # four levels: ties everywhere
    errors = rng.random(60) < 0.3 + 0.4 * scores
    assert unc.auroc(scores, errors) == pytest.approx(_brute_auroc(scores, errors))


def test_auprc_perfect_constant_and_by_hand(unc):
    errors = np.array([0, 0, 0, 1, 1], bool)
    assert unc.auprc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), errors) == 1.0
    assert unc.auprc(np.full(5, 0.5), errors) == pytest.approx(0.4)  # the error rate
    # ranked: error, correct, error -> precision 1 at recall 0.5, 2/3 at recall 1: AP = 0.5 + 0.5 * 2/3
    assert unc.auprc(np.array([0.9, 0.5, 0.1]), np.array([1, 0, 1], bool)) == pytest.approx(0.5 + 1 / 3)


def test_top_share_exact_and_with_ties_at_the_cut(unc):
    scores = np.arange(10, dtype=float)  # 9 is the most uncertain
    errors = np.zeros(10, bool)
    errors[[9, 8, 0]] = True
    assert unc.top_share(scores, errors, 0.2) == pytest.approx(2 / 3)
    assert unc.top_share(scores, errors, 0.1) == pytest.approx(1 / 3)
    assert unc.top_share(scores, errors, 1.0) == 1.0
    assert unc.top_share(np.full(10, 0.3), errors, 0.2) == pytest.approx(0.2)  # constant map: random
    # the top 2 of [5, 5, 5, 1] take 2 of the 3 tied 5s: 2/3 of the one error among them, of 2 errors
    tied = np.array([5.0, 5.0, 5.0, 1.0])
    assert unc.top_share(tied, np.array([1, 0, 0, 1], bool), 0.5) == pytest.approx((2 / 3) / 2)


def test_calibration_ece_by_hand(unc):
    p = np.array([0.05, 0.05, 0.05, 0.05, 0.95, 0.95])
    errors = np.array([0, 0, 0, 1, 1, 1], bool)  # bin 0: predicted 0.05, observed 0.25; last: 0.95 vs 1
    cal = unc.calibration(p, errors, bins=15)
    assert cal.ece == pytest.approx((4 * 0.20 + 2 * 0.05) / 6)
    assert cal.counts[0] == 4 and cal.counts[-1] == 2 and cal.counts.sum() == 6
    assert cal.observed[0] == pytest.approx(0.25) and np.isnan(cal.observed[7])
    assert unc.calibration(np.array([1.0, 0.0]), np.array([1, 0], bool)).ece == 0.0  # 1.0 is in the last bin
    rng = np.random.default_rng(1)
    q = rng.random(200_000)
    assert unc.calibration(q, rng.random(q.size) < q).ece < 0.01  # calibrated by construction


def test_reviewer_curve_oracle_random_and_partial_order(unc):
    errors = np.array([0, 10, 0, 30])
    oracle = unc.reviewer_curve(errors, unc.oracle_order(errors))
    np.testing.assert_allclose(oracle, [0, 30, 40, 40, 40])
    worst = unc.reviewer_curve(errors, [0, 2, 1, 3])
    np.testing.assert_allclose(worst, [0, 0, 0, 10, 40])
    # only slice 1 ranked: the other 30 errors come in equal parts over the 3 remaining slices
    np.testing.assert_allclose(unc.reviewer_curve(errors, [1]), [0, 10, 20, 30, 40])
    with pytest.raises(ValueError):
        unc.reviewer_curve(errors, [1, 1])


def test_reviewer_auc_normalisation(unc):
    errors = np.array([0, 10, 0, 30])
    oracle = unc.reviewer_curve(errors, unc.oracle_order(errors))
    random = unc.reviewer_curve(errors, [])  # expected random: a straight line
    np.testing.assert_allclose(random, [0, 10, 20, 30, 40])
    assert unc.curve_auc(random) == pytest.approx(0.5)
    # oracle: trapezoids of [0, .75, 1, 1, 1] over 4 steps = (0.375 + 0.875 + 1 + 1) / 4
    assert unc.curve_auc(oracle) == pytest.approx(3.25 / 4)
    assert unc.normalised_auc(oracle, oracle) == 1.0
    assert unc.normalised_auc(random, oracle) == pytest.approx(0.0)
    worst = unc.reviewer_curve(errors, [0, 2, 1, 3])  # AUC (0 + 0 + .125 + .625) / 4
    assert unc.normalised_auc(worst, oracle) == pytest.approx((0.75 / 4 - 0.5) / (3.25 / 4 - 0.5))
    assert unc.normalised_auc(worst, oracle) < 0
    assert math.isnan(unc.normalised_auc(random, unc.reviewer_curve(np.array([5, 5]), [0, 1])))


def test_top_slices_ratio(unc):
    errors = np.zeros(20)
    errors[[3, 7]] = [30, 10]
    oracle = unc.reviewer_curve(errors, unc.oracle_order(errors))
    # 10% of 20 slices = 2 slices: all 40 errors, against 40 * 2 / 20 = 4 expected
    assert unc.top_slices_ratio(oracle, 0.10) == pytest.approx(10.0)
    assert unc.top_slices_ratio(unc.reviewer_curve(errors, []), 0.10) == pytest.approx(1.0)
    assert unc.top_slices_ratio(unc.reviewer_curve(errors, [0, 1]), 0.10) == 0.0


def test_mirrored_session_flips_in_and_back(unc):
    class Probe:
        spec = provider = path = sha256 = None

        def run(self, batch):
            self.seen = batch.copy()
            return batch * 1.0, batch[:, :1] * 2.0  # position-wise: mirrored twice = unchanged

    probe = Probe()
    batch = np.arange(2 * 1 * 2 * 3 * 4, dtype=np.float32).reshape(2, 1, 2, 3, 4)
    probs, maps = unc.MirroredSession(probe, (0, 2)).run(batch)
    np.testing.assert_array_equal(probe.seen, batch[:, :, ::-1, :, ::-1])
    np.testing.assert_array_equal(probs, batch)
    np.testing.assert_array_equal(maps, batch[:, :1] * 2)
    assert unc.mirror_axes(3) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert unc.mirror_axes(2) == [(0,), (1,), (0, 1)]


def test_write_between_markers_keeps_the_prose(unc, tmp_path):
    path = tmp_path / "doc.md"
    unc.write_between_markers(path, "first\n")
    path.write_text("intro\n" + path.read_text() + "outro\n")
    unc.write_between_markers(path, "second\n")
    text = path.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "second" in text and "first" not in text


def test_the_case_table_names_each_cases_verdict(unc):
    assert unc.verdict_text({"level": "ok", "score": 0.6931}) == "ok (0.69)"
    assert unc.verdict_text({"level": "unknown", "score": None}) == "unknown"
    assert unc.verdict_text(None) == "-"
