"""Metrics against hand-computed values: Dice, Jaccard, accuracy, HD95 with anisotropic spacing, empty cases."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from training.metrics import (
    dice,
    evaluate_case,
    format_table,
    hd95,
    jaccard,
    pixel_accuracy,
    summarize,
    write_csv,
)


def test_dice_jaccard_accuracy_hand_values():
    pred = np.zeros((4, 5), dtype=np.uint8)
    ref = np.zeros((4, 5), dtype=np.uint8)
    pred[0, 0:4] = 1  # 4 pixels
    ref[0, 2:5] = 1  # 3 pixels, overlap 2
    assert dice(pred == 1, ref == 1) == pytest.approx(2 * 2 / 7)
    assert jaccard(pred == 1, ref == 1) == pytest.approx(2 / 5)
    # 20 pixels, disagreement at (0,0), (0,1), (0,4)
    assert pixel_accuracy(pred, ref) == pytest.approx(17 / 20)


def test_empty_conventions():
    empty = np.zeros((6, 6), dtype=bool)
    full = empty.copy()
    full[2:4, 2:4] = True
    assert dice(empty, empty) == 1.0 and jaccard(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(full, empty) == 0.0 and jaccard(empty, full) == 0.0
    assert math.isinf(hd95(full, empty)) and math.isinf(hd95(empty, full))


@pytest.mark.parametrize("spacing", [(2.0, 0.7), (0.5, 3.0)])
def test_hd95_parallel_lines_anisotropic(spacing):
    # two full-width rows three rows apart: every surface pixel is exactly 3 rows from the other line
    a = np.zeros((10, 8), dtype=bool)
    b = a.copy()
    a[2, :] = True
    b[5, :] = True
    assert hd95(a, b, spacing) == pytest.approx(3 * spacing[0])
    # the same along columns measures the column spacing
    assert hd95(a.T.copy(), b.T.copy(), spacing[::-1]) == pytest.approx(3 * spacing[0])
    assert hd95(a.T.copy(), b.T.copy(), spacing) == pytest.approx(3 * spacing[1])


def test_hd95_planes_3d_and_single_voxels():
    a = np.zeros((9, 6, 7), dtype=bool)
    b = a.copy()
    a[2] = True
    b[6] = True
    assert hd95(a, b, (2.5, 0.8, 0.8)) == pytest.approx(4 * 2.5)
    p = np.zeros((5, 5, 5), dtype=bool)
    q = p.copy()
    p[1, 2, 3] = True
    q[3, 2, 4] = True  # offset (2, 0, 1) voxels
    assert hd95(p, q, (1.5, 1.0, 2.0)) == pytest.approx(math.hypot(2 * 1.5, 1 * 2.0))


def _brute_force_hd95(a, b, spacing):
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(a.ndim, 1)
    sa = np.argwhere(a & ~ndimage.binary_erosion(a, structure, border_value=0)) * np.asarray(spacing)
    sb = np.argwhere(b & ~ndimage.binary_erosion(b, structure, border_value=0)) * np.asarray(spacing)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_hd95_shifted_box_matches_brute_force():
    a = np.zeros((12, 14, 16), dtype=bool)
    a[3:8, 4:10, 5:12] = True
    b = np.roll(a, 2, axis=2)  # shift by 2 voxels along x
    spacing = (3.0, 1.0, 0.6)
    value = hd95(a, b, spacing)
    assert value == pytest.approx(_brute_force_hd95(a, b, spacing))
    # the shift is the largest distance any surface voxel can have here, and most are at distance 0
    assert 0.0 < value <= 2 * 0.6 + 1e-9


def test_evaluate_case_and_summary():
    ref = np.zeros((8, 8), dtype=np.uint8)
    ref[1:4, 1:4] = 1
    ref[5:7, 5:7] = 2
    pred = ref.copy()
    pred[5:7, 5:7] = 0  # class 2 missed entirely
    case = evaluate_case(pred, ref, ["background", "a", "b"], spacing=(1.0, 1.0), case="c1")
    assert case.dice == {"a": 1.0, "b": 0.0}
    assert case.hd95["a"] == 0.0 and math.isinf(case.hd95["b"])
    assert case.accuracy == pytest.approx(60 / 64)
    other = evaluate_case(ref, ref, ["background", "a", "b"], case="c2")
    summary = summarize([case, other])
    assert summary["dice"]["b"] == pytest.approx(0.5)
    assert summary["dice"]["mean"] == pytest.approx(0.75)
    assert summary["hd95"]["b"] == 0.0 and summary["hd95_inf"]["b"] == 1
    assert "c1" in format_table([case, other])


def test_write_csv(tmp_path):
    ref = np.zeros((4, 4), dtype=np.uint8)
    ref[1:3, 1:3] = 1
    case = evaluate_case(ref, ref, ["bg", "fg"], case="x")
    path = tmp_path / "m.csv"
    write_csv([case], path)
    rows = list(csv.DictReader(path.open()))
    assert rows[0]["case"] == "x" and rows[0]["class"] == "fg" and float(rows[0]["dice"]) == 1.0
    assert rows[-1]["case"] == "mean"


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((2, 2), bool), np.ones((2, 2), bool), (1.0,))


def test_metrics_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, training.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
