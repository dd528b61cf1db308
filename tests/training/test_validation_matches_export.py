"""Training validates through the product's predictor: the validation Dice a run records for a checkpoint is
what medcl-evaluate gives on that checkpoint's ONNX export, and the torch and ONNX sessions give the same
labels through the one inference path."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from napari_medcl.io import read_image
from napari_medcl.onnx_session import load_model
from napari_medcl.prediction import predict
from tests.dataset_factory import make_msd_dataset
from training.cli import evaluate_main, train_main
from training.torch_session import load_checkpoint_session

pytestmark = [pytest.mark.torch, pytest.mark.slow]
VAL_CASE = "case_003"


@pytest.fixture(scope="module")
def resampled_run(tmp_path_factory):
    """A tiny 3D run whose cases have other spacings than the model (so validation resamples there and back)
    and zeros around the anatomy (so it crops to the non-zero box), with one fixed validation case."""
    base = tmp_path_factory.mktemp("val")
    spacings = [(2.0, 1.0, 1.2), (2.4, 0.9, 1.0), (1.8, 1.1, 1.3), (2.2, 1.2, 0.8)]
    root = make_msd_dataset(base / "Task98_Val", n_cases=4, shape=(12, 20, 18), spacings=spacings)
    config = base / "run.yaml"
    config.write_text(
        f"data: {{root: {root}, val_cases: [{VAL_CASE}], num_workers: 0, augmentation: {{enabled: false}}}}\n"
        "model:\n  features: [8, 16]\n  uafr: {enabled: true}\n"
        "train: {patch_size: [8, 16, 16], device: cpu, epochs: 2, iterations_per_epoch: 3, batch_size: 2}\n"
        f"output: {{dir: {base / 'out'}}}\n"
    )
    assert train_main([str(config)]) == 0
    return root, base / "out"


def test_validation_dice_equals_medcl_evaluate_on_the_export(resampled_run, tmp_path, capsys):
    from export import to_onnx

    root, out = resampled_run
    onnx_path = tmp_path / "model.onnx"
    to_onnx(out / "checkpoint_last.pt", onnx_path)
    only_val = tmp_path / "val"
    for folder in ("imagesTr", "labelsTr"):
        (only_val / folder).mkdir(parents=True)
        for file in (root / folder).glob(f"{VAL_CASE}*"):
            shutil.copy(file, only_val / folder / file.name)
    shutil.copy(root / "dataset.json", only_val / "dataset.json")
    csv_path = tmp_path / "scores.csv"
    code = evaluate_main(
        [str(onnx_path), str(only_val), "--split", "all", "--device", "cpu", "--no-hd95", "-o", str(csv_path)]
    )
    assert code == 0, capsys.readouterr().err
    rows = {r["class"]: float(r["dice"]) for r in csv.DictReader(csv_path.open()) if r["case"] == "mean"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    validation = records[-1]["val"]
    assert validation["cases"] == 1
    for name, dice in validation["dice"].items():
        assert rows[name] == pytest.approx(dice, abs=1e-3), name
    print(f"\nvalidation Dice {validation['dice']}, medcl-evaluate on the ONNX export {rows}")


def test_torch_and_onnx_sessions_give_the_same_labels(resampled_run, tmp_path):
    from export import to_onnx

    root, out = resampled_run
    onnx_path = tmp_path / "model.onnx"
    to_onnx(out / "checkpoint_last.pt", onnx_path)
    torch_session, _ = load_checkpoint_session(out / "checkpoint_last.pt", "cpu", uncertainty_maps=True)
    onnx_session = load_model(onnx_path, device="cpu", backend="onnxruntime")  # fp32, as torch
    volume = read_image(root / "imagesTr" / f"{VAL_CASE}_0000.nii.gz")
    by_torch = predict(volume, torch_session)
    by_onnx = predict(volume, onnx_session)
    np.testing.assert_array_equal(by_torch.labels.array, by_onnx.labels.array)
    np.testing.assert_allclose(by_torch.entropy.array, by_onnx.entropy.array, atol=1e-4)
    assert list(by_torch.uncertainty_maps) == list(by_onnx.uncertainty_maps)
    np.testing.assert_allclose(by_torch.uafr_uncertainty.array, by_onnx.uafr_uncertainty.array, atol=1e-4)
    assert by_torch.provenance["execution_provider"] == "torch (cpu)"
