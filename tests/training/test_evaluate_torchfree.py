"""medcl-evaluate on an ONNX model runs without torch: the ONNX path imports only torch-free modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.dataset_factory import make_noisy_label_dataset
from tests.onnx_models import nearest_class_model, save

ROOT = Path(__file__).parents[2]

# Runs the console-script function in a fresh interpreter, then reports what it imported.
PROBE = """
import json, sys
from training.cli import evaluate_main
code = evaluate_main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "torchvision", "monai") if m in sys.modules)
print(json.dumps({"code": code, "loaded": heavy}))
"""


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
    root = make_noisy_label_dataset(tmp_path / "ds")
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
