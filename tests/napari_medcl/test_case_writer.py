"""write_prediction from Python: the case medcl-predict writes, from a file or from an array; typed provenance."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

import napari_medcl
from napari_medcl import cli
from napari_medcl.errors import OutputError
from napari_medcl.io import read_image
from napari_medcl.volume import Volume
from tests.onnx_models import pointwise_model, save

THRESHOLD = 100.5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save(
        pointwise_model(threshold=THRESHOLD, patch=(8, 8, 8)), tmp_path_factory.mktemp("m") / "pw.onnx"
    )


def _scan(path, shape=(6, 11, 9)):
    values = np.random.default_rng(3).integers(0, 201, size=shape).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-4.0, 2.5, 7.0))
    sitk.WriteImage(image, str(path))
    return path


def test_api_writes_the_same_case_as_the_cli(tmp_path, model_path):
    source = _scan(tmp_path / "scan.nii")
    assert cli.main([str(source), "-o", str(tmp_path / "cli"), "--model", str(model_path), "--quiet"]) == 0
    prediction = napari_medcl.predict(source, model_path, device="cpu")
    written = napari_medcl.write_prediction(prediction, tmp_path / "api")

    assert sorted(p.name for p in (tmp_path / "api").iterdir()) == sorted(
        p.name for p in (tmp_path / "cli").iterdir()
    )
    assert written.labels.name == "scan_labels.nii" and written.sidecar.name == "scan.json"
    np.testing.assert_array_equal(read_image(written.labels).array, read_image(source).array > THRESHOLD)
    by_cli = json.loads((tmp_path / "cli" / "scan.json").read_text())
    by_api = json.loads(written.sidecar.read_text())
    assert list(by_api) == list(by_cli) and list(by_api["input"]) == list(by_cli["input"])
    assert by_api["input"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert by_api["outputs"] == by_cli["outputs"] == written.provenance.to_dict()["outputs"]


def test_prediction_from_an_array_is_written_as_nifti_without_an_input_hash(tmp_path, model_path):
    values = np.random.default_rng(5).integers(0, 201, size=(5, 8, 7)).astype(np.float32)
    volume = Volume(values, (1.0, 2.0, 3.0), (0.0, 0.0, 0.0), np.eye(3))
    prediction = napari_medcl.predict(volume, model_path, device="cpu", return_probabilities=True)
    with pytest.raises(ValueError, match="name the case"):
        napari_medcl.write_prediction(prediction, tmp_path)
    written = napari_medcl.write_prediction(prediction, tmp_path, "memory")
    assert written.labels.name == "memory_labels.nii.gz"
    assert [p.name for p in written.probabilities.values()] == [
        "memory_probabilities_0.nii.gz",
        "memory_probabilities_1.nii.gz",
    ]
    sidecar = json.loads(written.sidecar.read_text())
    assert sidecar["input"]["path"] is None and "sha256" not in sidecar["input"]
    assert read_image(written.entropy).same_geometry(volume)


def test_a_failed_write_leaves_the_earlier_case(tmp_path, model_path, monkeypatch):
    from napari_medcl import io

    source = _scan(tmp_path / "scan.nii.gz")
    prediction = napari_medcl.predict(source, model_path, device="cpu")
    first = napari_medcl.write_prediction(prediction, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def fail_on_entropy(volume, path):
        if "entropy" in str(path):
            raise OutputError(path, "disk full")
        return real_write(volume, path)

    real_write = io.write_image
    monkeypatch.setattr(io, "write_image", fail_on_entropy)
    with pytest.raises(OutputError, match="scan_entropy.nii.gz"):
        napari_medcl.write_prediction(prediction, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert first.sidecar.is_file()


def test_provenance_is_typed_frozen_and_reads_as_the_sidecar_dict(tmp_path, model_path):
    prediction = napari_medcl.predict(_scan(tmp_path / "scan.nrrd"), model_path, device="cpu")
    provenance = prediction.provenance
    assert isinstance(provenance, napari_medcl.Provenance)
    assert provenance.tiling.windows == provenance["tiling"]["windows"] >= 1
    assert dict(provenance) == provenance.to_dict()
    json.dumps(provenance.to_dict())  # plain JSON types only
    with pytest.raises(dataclasses.FrozenInstanceError):
        provenance.execution_provider = "elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        provenance["tool"] = "other"  # type: ignore[index]


def test_the_top_class_error_is_written_beside_the_entropy_and_listed(tmp_path):
    k = 0.1  # soft: errors spread over (0, 0.5), so a wrong or all-zero file cannot pass
    model = save(pointwise_model(threshold=THRESHOLD, k=k, patch=(8, 8, 8)), tmp_path / "soft.onnx")
    source = _scan(tmp_path / "scan.nrrd")
    prediction = napari_medcl.predict(source, model, device="cpu")
    written = napari_medcl.write_prediction(prediction, tmp_path / "out")
    assert written.top_class_error == tmp_path / "out" / "scan_top_class_error.nrrd"
    image = read_image(source)
    top_error = read_image(written.top_class_error)
    assert top_error.same_geometry(image) and top_error.array.dtype == np.float32
    p1 = 1 / (1 + np.exp(-k * (image.array.astype(np.float64) - THRESHOLD)))
    expected = 1 - np.maximum(p1, 1 - p1)
    assert expected.max() > 0.4
    np.testing.assert_allclose(top_error.array, expected, atol=1e-5)
    outputs = json.loads(written.sidecar.read_text())["outputs"]
    assert list(outputs) == ["labels", "uncertainty", "entropy", "top_class_error"]
    assert outputs["top_class_error"] == "scan_top_class_error.nrrd"

    # A Prediction made without the map (older code) writes the case as before: no file, no key.
    older = dataclasses.replace(prediction, top_class_error=None)
    again = napari_medcl.write_prediction(older, tmp_path / "older")
    assert again.top_class_error is None
    assert sorted(p.name for p in (tmp_path / "older").iterdir()) == [
        "scan.json",
        "scan_entropy.nrrd",
        "scan_labels.nrrd",
        "scan_uncertainty.nrrd",
    ]
    assert "top_class_error" not in json.loads(again.sidecar.read_text())["outputs"]
