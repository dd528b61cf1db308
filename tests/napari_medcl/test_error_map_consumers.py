"""Every consumer of a prediction's error map prefers the calibrated error likelihood when the model carries
an error model, and behaves as before without one: the case report, the result layers, the interactive
session's next likely mistake, the ranking, the transfer to a remote client, the case writer and its skip
logic, and the model summaries."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import napari_medcl
from napari_medcl import cli
from napari_medcl.case_report import ERROR_LIKELIHOOD_NAME, TOP_CLASS_ERROR_NAME, prediction_report
from napari_medcl.error_model import ErrorModel
from napari_medcl.interactive import open_session as open_interactive
from napari_medcl.io import read_image
from napari_medcl.layer_data import PREDICTION_KEY, image_layer_data, segment_layer
from napari_medcl.onnx_session import load_model
from napari_medcl.ranking import rank_cases
from napari_medcl.transfer import prediction_from_npz, prediction_to_npz
from napari_medcl.volume import Prediction, Volume
from tests.dataset_factory import write_volume
from tests.onnx_models import make_spec, pointwise_model, save

# The map is high on the labels' borders, whatever the model's own confidence: unlike 1 - p(label).
ERROR_MODEL = ErrorModel(
    features=("top_error", "border", "map:decoder1"),
    coefficients=(4.0, 3.0, 0.5),
    intercept=-3.0,
    figures={
        "auroc": 0.81,
        "ece": 0.02,
        "cases": ["f0.onnx: tiny/case_001", "f1.onnx: tiny/case_002"],
        "auroc_other_folds": 0.78,
        "ece_other_folds": 0.03,
        "signals": {"top_error": 0.75, "border": 0.6, "map:decoder1": 0.55},
    },
)
SPACING = (2.0, 1.0, 1.5)


def calibrated_spec(**kwargs) -> napari_medcl.ModelSpec:
    return dataclasses.replace(make_spec(**kwargs), error_model=ERROR_MODEL.to_dict())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("error-map-models")
    return {
        "calibrated": save(pointwise_model(spec=calibrated_spec(), k=3.0), folder / "calibrated.onnx"),
        "plain": save(pointwise_model(spec=make_spec(), k=3.0), folder / "plain.onnx"),
    }


def _image(seed: int = 0, shape=(10, 12, 14)) -> Volume:
    array = np.random.default_rng(seed).random(shape).astype(np.float32)
    return Volume(array, SPACING, (1.0, -2.0, 3.0), np.eye(3))


def test_the_error_map_is_the_calibrated_one_when_the_model_has_one(models):
    calibrated = napari_medcl.predict(_image(), models["calibrated"], device="cpu")
    kind, output = calibrated.error_map
    assert kind == "error_likelihood" and output is calibrated.error_likelihood
    assert not np.allclose(output.array, calibrated.top_class_error.array)
    plain = napari_medcl.predict(_image(), models["plain"], device="cpu")
    assert plain.error_likelihood is None and plain.error_map == ("top_class_error", plain.top_class_error)
    assert Prediction(labels=plain.labels, entropy=plain.entropy).error_map is None


def test_the_case_report_sums_the_calibrated_map_under_its_own_name(models):
    voxel_ml = float(np.prod(SPACING)) / 1000
    calibrated = napari_medcl.predict(_image(), models["calibrated"], device="cpu")
    report = prediction_report(calibrated)
    assert report.error_likelihood == ERROR_LIKELIHOOD_NAME == "error likelihood"
    expected = calibrated.error_likelihood.array.sum(dtype=np.float64) * voxel_ml
    assert report.expected_wrong_total == pytest.approx(expected, rel=1e-5)
    assert f"from {ERROR_LIKELIHOOD_NAME}" in report.to_text()

    plain = napari_medcl.predict(_image(), models["plain"], device="cpu")
    report = prediction_report(plain)
    assert report.error_likelihood == TOP_CLASS_ERROR_NAME and "(uncalibrated)" in TOP_CLASS_ERROR_NAME
    expected = plain.top_class_error.array.sum(dtype=np.float64) * voxel_ml
    assert report.expected_wrong_total == pytest.approx(expected, rel=1e-5)


def _layers(model) -> dict[str, tuple[np.ndarray, dict]]:
    out = segment_layer(image_layer_data(_image(), name="case"), model, device="cpu")
    return {kwargs["metadata"][PREDICTION_KEY]["output"]: (data, kwargs) for data, kwargs, _ in out}


def test_the_calibrated_map_is_the_layer_shown_and_the_uncalibrated_one_stays_a_click_away(models):
    layers = _layers(models["calibrated"])
    assert list(layers) == ["labels", "uafr_uncertainty", "entropy", "top_class_error", "error_likelihood"]
    names = {kind: kwargs["name"] for kind, (_, kwargs) in layers.items()}
    assert names["error_likelihood"] == "case error likelihood"
    assert names["top_class_error"] == "case error likelihood (uncalibrated)"
    shown = [kind for kind, (_, kwargs) in layers.items() if kwargs.get("visible", True)]
    assert shown == ["labels", "error_likelihood"]
    data, kwargs = layers["error_likelihood"]
    assert data.dtype == np.float32 and data.shape == layers["labels"][0].shape
    assert kwargs["contrast_limits"] == (0.0, 1.0) and kwargs["scale"] == SPACING

    plain = _layers(models["plain"])  # as before the calibrated map existed
    assert list(plain) == ["labels", "uafr_uncertainty", "entropy", "top_class_error"]
    assert [k for k, (_, kw) in plain.items() if kw.get("visible", True)] == ["labels", "top_class_error"]


def test_the_next_likely_mistake_follows_the_calibrated_map(models, tmp_path):
    image = np.full((8, 24, 24), 0.1, np.float32)
    image[2:6, 4:12, 4:12] = 0.6  # a labelled square: the calibrated map is high on its border
    image[2:6, 14:22, 14:22] = 0.45  # a doubtful unlabelled square: 1 - p(label) is highest here
    volume = Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    found = {}
    for name in ("calibrated", "plain"):
        session = open_interactive(volume, load_model(models[name], device="cpu"))
        prediction = session.predict()
        kind, error_map = prediction.error_map
        np.testing.assert_array_equal(session._error, error_map.array)
        region = session.next_region(window_mm=5.0)
        assert region.score == pytest.approx(float(error_map.array[region.box].sum()), rel=1e-4)
        found[name] = tuple(int(round(c)) for c in region.center)
    assert found["plain"][2] >= 14 and found["calibrated"][2] < 14  # different squares


def test_the_ranking_uses_the_calibrated_map(models, tmp_path):
    path = write_volume(tmp_path / "scan.nii.gz", _image().array)
    for name, suffix in (("calibrated", " by the model's error map"), ("plain", "")):
        (rank,) = rank_cases([path], models[name], device="cpu", backend="onnxruntime")
        prediction = napari_medcl.predict(path, models[name], device="cpu", backend="onnxruntime")
        kind, error_map = prediction.error_map
        foreground = prediction.labels.array > 0
        assert rank.expected_wrong_fraction == pytest.approx(
            float(error_map.array[foreground].mean()), rel=1e-5
        )
        assert rank.reason.endswith(f"mL){suffix}"), rank.reason
        assert kind == ("error_likelihood" if name == "calibrated" else "top_class_error")


@pytest.mark.parametrize("box", [None, (slice(2, 7), slice(0, 12), slice(3, 11))])
def test_the_calibrated_map_travels_to_a_remote_client(models, box):
    volume = _image()
    prediction = napari_medcl.predict(volume, models["calibrated"], device="cpu")
    received = prediction_from_npz(
        prediction_to_npz(prediction, box), volume, uncertainty_maps=("encoder1", "decoder1"), box=box
    )
    sent = prediction.error_likelihood.array if box is None else prediction.error_likelihood.crop(box).array
    got = received.error_likelihood.array if box is None else received.error_likelihood.array[box]
    assert received.error_likelihood.array.dtype == np.float32
    np.testing.assert_allclose(got, sent, atol=5e-4, rtol=0)
    assert received.error_likelihood.same_geometry(volume, atol=0)
    if box is not None:  # background outside the region, as a local region run
        outside = np.ones(volume.spatial_shape, bool)
        outside[box] = False
        assert (received.error_likelihood.array[outside] == 0).all()
    plain = napari_medcl.predict(volume, models["plain"], device="cpu")
    again = prediction_from_npz(
        prediction_to_npz(plain), volume, uncertainty_maps=("encoder1", "decoder1"), box=None
    )
    assert again.error_likelihood is None and again.top_class_error is not None


def test_the_case_writer_writes_and_lists_the_calibrated_map(models, tmp_path):
    source = write_volume(tmp_path / "scan.nii.gz", _image().array)
    prediction = napari_medcl.predict(source, models["calibrated"], device="cpu")
    written = napari_medcl.write_prediction(prediction, tmp_path / "out")
    assert written.error_likelihood == tmp_path / "out" / "scan_error_likelihood.nii.gz"
    likelihood = read_image(written.error_likelihood)
    assert likelihood.array.dtype == np.float32 and likelihood.same_geometry(read_image(source))
    np.testing.assert_allclose(likelihood.array, prediction.error_likelihood.array, atol=1e-6)
    sidecar = json.loads(written.sidecar.read_text())
    assert list(sidecar["outputs"]) == [
        "labels",
        "uncertainty",
        "entropy",
        "top_class_error",
        "error_likelihood",
    ]
    assert sidecar["outputs"]["error_likelihood"] == "scan_error_likelihood.nii.gz"
    assert sidecar["report"]["error_likelihood"] == ERROR_LIKELIHOOD_NAME
    assert (
        napari_medcl.Provenance.from_dict(sidecar).outputs.error_likelihood == "scan_error_likelihood.nii.gz"
    )

    plain = napari_medcl.predict(source, models["plain"], device="cpu")
    again = napari_medcl.write_prediction(plain, tmp_path / "plain")
    assert again.error_likelihood is None
    assert not (tmp_path / "plain" / "scan_error_likelihood.nii.gz").exists()
    outputs = json.loads(again.sidecar.read_text())["outputs"]
    assert list(outputs) == ["labels", "uncertainty", "entropy", "top_class_error"]


def test_medcl_predict_writes_the_calibrated_map_says_so_and_skips_a_complete_case(models, tmp_path, capsys):
    source = write_volume(tmp_path / "scan.nii.gz", _image().array)
    out = tmp_path / "out"
    argv = [str(source), "-o", str(out), "--model", str(models["calibrated"]), "--device", "cpu"]
    assert cli.main(argv) == 0
    banner = capsys.readouterr().err.splitlines()
    assert banner[1] == (
        "review map: calibrated error map (3 features, logistic): AUROC 0.810, ECE 0.020 on its 2 error "
        "case(s); fitted without each fold model's cases: AUROC 0.780, ECE 0.030; out-of-fold AUROC of each "
        "signal alone: top_error 0.750, border 0.600, UAFR decoder1 0.550"
    )
    assert banner[2].startswith("note: For research use only")
    assert (out / "scan_error_likelihood.nii.gz").is_file()
    assert cli.main(argv) == 0  # the same case again: complete, skipped
    assert "already complete" in capsys.readouterr().out
    (out / "scan_error_likelihood.nii.gz").unlink()  # a file the sidecar lists is missing: redone
    assert cli.main(argv) == 0
    assert "already complete" not in capsys.readouterr().out
    assert (out / "scan_error_likelihood.nii.gz").is_file()

    plain = [str(source), "-o", str(tmp_path / "plain"), "--model", str(models["plain"]), "--device", "cpu"]
    assert cli.main([*plain, "--quiet"]) == 0
    banner = capsys.readouterr().err.splitlines()
    assert banner[1].startswith(
        "review map: uncalibrated error likelihood, 1 - p(label) (this model carries no"
    )
    assert not (tmp_path / "plain" / "scan_error_likelihood.nii.gz").exists()


def test_the_model_summary_gives_the_calibrated_map_and_each_signals_figure():
    lines = calibrated_spec().error_map_summary().splitlines()
    assert lines == [
        "review map: calibrated error map (3 features, logistic): AUROC 0.810, ECE 0.020 on its 2 error "
        "case(s); fitted without each fold model's cases: AUROC 0.780, ECE 0.030",
        "out-of-fold AUROC of each signal alone: top_error 0.750, border 0.600, UAFR decoder1 0.550",
    ]
    bare = ErrorModel(features=("top_error",), coefficients=(4.0,), intercept=-2.0)
    spec = dataclasses.replace(make_spec(), error_model=bare.to_dict())
    assert spec.error_map_summary() == (
        "review map: calibrated error map (1 feature, logistic): no figures recorded"
    )
    assert "uncalibrated" in make_spec().error_map_summary()
    assert make_spec().summary() == calibrated_spec().summary()  # the one-line summary is unchanged
