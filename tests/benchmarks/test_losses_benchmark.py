"""benchmarks/losses.py: its precision comparison runs (tiny networks, one step) and its recipe cases are the
bundled default recipes'."""

from __future__ import annotations

import pytest

from tests.benchmark_modules import benchmark_module
from training.config import load_config

TINY = [
    "--device", "cpu", "--threads", "1", "--steps", "1", "--warmup", "0", "--uafr",
    "--features-2d", "4", "8", "8", "8", "--size-2d", "32", "--batch-2d", "2",
    "--features-3d", "4", "8", "8", "8", "--size-3d", "16", "--batch-3d", "1",
]  # fmt: skip


@pytest.mark.slow
def test_precision_comparison_on_cpu(capsys):
    with benchmark_module("losses") as losses:
        losses.main([*TINY, "--precision", "fp32,bf16", "--configs", "CE+Dice,+ CCDC"])
    out = capsys.readouterr().out
    assert "precision fp32, bf16" in out and "load average" in out
    # step table: every configuration in both precisions, for both networks
    for case in ("2D U-Net+UAFR, 2 x 32x32", "3D U-Net+UAFR, 1 x 16x16x16"):
        for config in ("CE+Dice", "+ CCDC"):
            for precision in ("fp32", "bf16"):
                assert f"| {case} | (4, 8, 8, 8) | {config} | {precision} |" in out
    # precision table: bf16 against fp32 with the step-time ratio and finite losses from the same batch
    # (case, losses, precision, fp32 ms, ms, ratio, CPU-time ratio, peak RSS, loss fp32, loss, difference)
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")
    ]
    rows = [cells for cells in rows if len(cells) == 11 and cells[2] == "bf16"]
    assert len(rows) == 4
    for cells in rows:
        ratio, loss32, loss16 = float(cells[5]), float(cells[8]), float(cells[9])
        assert ratio > 0 and 0 < loss32 < 100
        assert loss16 == pytest.approx(loss32, rel=0.05)


def test_fp16_is_refused_on_cpu(capsys):
    with benchmark_module("losses") as losses, pytest.raises(SystemExit):
        losses.main([*TINY, "--precision", "fp32,fp16"])
    assert "CUDA only" in capsys.readouterr().err


@pytest.mark.parametrize("dims", [2, 3])
def test_recipe_cases_are_the_bundled_recipes(dims):
    with benchmark_module("losses") as losses:
        case = losses.recipe_case(dims)
        cfg = load_config(losses.RECIPES[dims])
    assert case.model == cfg.model and case.model.uafr.enabled
    assert case.shape == tuple(cfg.train.patch_size) and case.batch == cfg.train.batch_size
    assert case.label.startswith(f"default-brain-tissue-{dims}d: {dims}D U-Net+UAFR")
