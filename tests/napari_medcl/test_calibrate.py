"""medcl-calibrate end to end: a tiny ONNX model and a tiny dataset folder, without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import napari_medcl
from export.calibrate import main
from napari_medcl.onnx_session import load_model
from napari_medcl.volume import Volume
from tests.dataset_factory import make_msd_dataset
from tests.onnx_models import make_spec, pointwise_model, save

ROOT = Path(__file__).parents[2]
ZSCORE = {"kind": "zscore", "use_nonzero_mask": True}


@pytest.fixture
def model_and_data(tmp_path):
    proto = pointwise_model(spec=make_spec(spacing=(2.0, 1.0, 1.2), normalization=ZSCORE))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "author", "someone"  # other metadata must survive
    model = save(proto, tmp_path / "model.onnx")
    data = make_msd_dataset(tmp_path / "tiny", n_cases=5, shape=(12, 20, 18), modality="MRI")
    return model, data


def test_calibrate_writes_the_profile_and_keeps_the_graph(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    out = tmp_path / "calibrated.onnx"
    assert main([str(model), str(data), "-o", str(out), "--cases", "case_000", "case_002"]) == 0
    printed = capsys.readouterr().out
    assert "training-data profile of 2 case(s)" in printed and "graph and weights unchanged" in printed

    loaded = load_model(out, device="cpu")  # the product loads it
    profile = loaded.spec.training_profile
    assert profile["cases"] == 2 and profile["source"].endswith("case_000, case_002")
    assert profile["normalization"] == ZSCORE and profile["spacing_mm"]["min"] == [2.0, 1.0, 1.2]
    assert profile["labelled_fraction"] is not None and profile["modality"] == "MR"
    before, after = onnx.load(str(model)), onnx.load(str(out))
    assert after.graph.SerializeToString() == before.graph.SerializeToString()
    assert {p.key: p.value for p in after.metadata_props}["author"] == "someone"
    spec_before = json.loads({p.key: p.value for p in before.metadata_props}["medcl.spec"])
    spec_after = json.loads({p.key: p.value for p in after.metadata_props}["medcl.spec"])
    assert {k: v for k, v in spec_after.items() if k != "training_profile"} == spec_before

    case = napari_medcl.read_image(data / "imagesTr" / "case_004_0000.nii.gz")
    prediction = napari_medcl.predict(case, out, device="cpu")
    assert prediction.verdict.level in ("ok", "caution") and prediction.verdict.score is not None
    assert napari_medcl.predict(case, model, device="cpu").verdict.level == "unknown"
    blank = Volume(np.zeros((12, 20, 18), np.float32), case.spacing, case.origin, case.direction)
    assert napari_medcl.predict(blank, out, device="cpu").verdict.level == "out-of-distribution"


def test_calibrate_takes_the_training_part_of_a_fold(model_and_data, tmp_path):
    from training.data.layouts import discover
    from training.data.preprocessing import split_cases

    model, data = model_and_data
    out = tmp_path / "fold.onnx"
    assert main([str(model), str(data), "-o", str(out), "--fold", "1"]) == 0
    train, _ = split_cases(
        list(discover("msd", data).cases), fold=1, num_folds=5, val_fraction=None, split_seed=12345
    )
    profile = load_model(out, device="cpu").spec.training_profile
    assert profile["cases"] == len(train) == 4
    assert profile["source"].endswith(", ".join(c.case_id for c in train))


def test_calibrate_errors_are_one_line_and_write_nothing(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    out = tmp_path / "never.onnx"
    assert main([str(model), str(data), "-o", str(out), "--cases", "case_999"]) == 1
    assert "no case case_999" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.onnx"), str(data), "-o", str(out)]) == 1
    assert "model file not found" in capsys.readouterr().err
    assert not out.exists()


def test_calibrate_runs_without_torch(model_and_data, tmp_path):
    model, data = model_and_data
    out = tmp_path / "torchless.onnx"
    code = (
        "import sys\n"
        "from export.calibrate import main\n"
        f"assert main([{str(model)!r}, {str(data)!r}, '-o', {str(out)!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert load_model(out, device="cpu").spec.training_profile["cases"] == 5


def test_help_says_where_the_calibrated_error_map_will_live(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training-data profile" in text and "calibrated error map" in text
