"""medcl-evaluate on an ONNX model runs without torch: the ONNX path imports only torch-free modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.dataset_factory import write_volume
from tests.onnx_models import nearest_class_model, save

ROOT = Path(__file__).parents[1]

# Runs the console-script function in a fresh interpreter, then reports what it imported.
PROBE = """
import json, sys
from training.cli import evaluate_main
code = evaluate_main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "torchvision", "monai") if m in sys.modules)
print(json.dumps({"code": code, "loaded": heavy}))
"""


def _dataset(root: Path) -> Path:
    """An MSD-style dataset of two cases whose image intensities are the labels plus noise."""
    rng = np.random.default_rng(0)
    for k in range(2):
        label = np.zeros((6, 14, 12), dtype=np.uint8)
        label[1:4, 2:7, 3:8] = 1
        label[2:5, 8:12, 2:6] = 2
        image = label.astype(np.float32) + rng.uniform(-0.2, 0.2, label.shape).astype(np.float32)
        write_volume(root / "imagesTr" / f"c{k}_0000.nii.gz", image, spacing=(3.0, 1.0, 0.5))
        write_volume(root / "labelsTr" / f"c{k}.nii.gz", label, spacing=(3.0, 1.0, 0.5))
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "MRI"}})
    )
    return root


def _run(*args: str) -> tuple[dict, subprocess.CompletedProcess]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result


def test_evaluate_onnx_model_never_imports_torch(tmp_path):
    root = _dataset(tmp_path / "ds")
    model = save(nearest_class_model(3, maps=(), patch=(4, 8, 8)), tmp_path / "m.onnx")
    report, result = _run(str(model), str(root), "--split", "all", "--device", "cpu", "--no-hd95")
    assert report["code"] == 0, result.stderr
    assert "mean Dice 1.0000" in result.stdout  # it really scored the cases
    assert report["loaded"] == [], report


def test_evaluate_onnx_errors_stay_torch_free(tmp_path):
    """The error path of an ONNX run (a dataset problem) reports one line and still imports no torch."""
    model = save(nearest_class_model(3, maps=(), patch=(4, 8, 8)), tmp_path / "m.onnx")
    (tmp_path / "empty").mkdir()
    report, result = _run(str(model), str(tmp_path / "empty"), "--device", "cpu")
    assert report["code"] == 1
    assert [line for line in result.stderr.splitlines() if "error" in line][0].startswith(
        "medcl-evaluate: error: "
    )
    assert report["loaded"] == [], report
