"""``scripts/bf16_conv_grad_check.py`` (the measurement behind docs/performance.md's broken bf16 gradients):
what it counts as broken, and a run of its loop on a tiny shape."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bf16_conv_grad_check as check


def test_nan_inf_and_huge_gradients_count_as_broken_and_ordinary_ones_do_not():
    assert not check.is_broken(torch.randn(4, 4, 3, 3, 3))
    for value in (float("nan"), float("inf"), 5.99e34):
        grad = torch.randn(4, 4, 3, 3, 3)
        grad[1, 2, 0, 1, 2] = value
        assert check.is_broken(grad)


def test_the_loop_runs_and_reports_each_shape(monkeypatch, capsys, one_torch_thread):
    monkeypatch.setattr(check, "SHAPES", [(4, (2, 4, 4), 3)])
    assert check.main(["--fp32"]) == 0
    out = capsys.readouterr().out
    assert "fp32" in out and "conv3d 4->4, batch 2 x 2x4x4: 0 of 3 broken" in out
