"""The per-case report: sizes in mL / cm2 from the spacing, expected wrong volume from an error probability,
verdict, CSV, the sidecar's "report" and medcl-predict --report-csv, against hand-computed answers."""

from __future__ import annotations

import csv
import dataclasses
import json
import types

import numpy as np
import pytest
import SimpleITK as sitk

import napari_medcl
from napari_medcl import cli
from napari_medcl.case_report import (
    ENTROPY_NAME,
    NOT_ASSESSED,
    TOP_CLASS_ERROR_NAME,
    case_report,
    prediction_report,
    top_class_error,
)
from napari_medcl.errors import OutputError
from napari_medcl.spec import default_classes
from napari_medcl.verdict import NO_PROFILE
from napari_medcl.volume import Volume
from tests.onnx_models import nearest_class_model, save

CLASSES = default_classes(["background", "liver", "tumour"])
SPACING = (3.0, 2.0, 5.0)  # 30 mm^3 per voxel = 0.03 mL
PROVENANCE = {
    "version": "9.9.9",
    "model": {"name": "liver-3d", "sha256": "ab" * 32},
    "execution_provider": "CPUExecutionProvider",
    "roi": [[0, 2], [0, 3], [1, 4]],
    "timings": {"total": 1.5, "inference": 1.0},
}


def _labels() -> np.ndarray:
    """(2, 3, 4): 10 liver voxels, no tumour, 14 background."""
    labels = np.zeros((2, 3, 4), dtype=np.uint8)
    labels[0, :, :3] = 1  # 9 voxels
    labels[1, 0, 0] = 1  # 1 more
    return labels


def _error(labels: np.ndarray) -> np.ndarray:
    """0.2 on liver, 0.05 on background."""
    return np.where(labels == 1, 0.2, 0.05).astype(np.float32)


def _by_name(report):
    return {c.name: c for c in report.classes}


def test_volumes_follow_the_anisotropic_spacing_in_ml():
    report = case_report(_labels(), SPACING, CLASSES)
    sizes = _by_name(report)
    assert (report.measure, report.unit) == ("volume", "mL")
    assert sizes["liver"].voxels == 10 and sizes["liver"].amount == pytest.approx(10 * 30 / 1000)
    assert sizes["background"].voxels == 14 and sizes["background"].amount == pytest.approx(14 * 30 / 1000)
    assert sizes["background"].background and not sizes["liver"].background


def test_a_class_absent_from_the_labels_shows_zero():
    sizes = _by_name(case_report(_labels(), SPACING, CLASSES, error_likelihood=_error(_labels())))
    assert (sizes["tumour"].index, sizes["tumour"].voxels, sizes["tumour"].amount) == (2, 0, 0.0)
    assert sizes["tumour"].expected_wrong == 0.0


def test_expected_wrong_volume_per_class_and_in_total():
    labels = _labels()
    report = case_report(labels, SPACING, CLASSES, error_likelihood=_error(labels))
    sizes = _by_name(report)
    assert sizes["liver"].expected_wrong == pytest.approx(10 * 0.2 * 0.03)
    assert sizes["background"].expected_wrong == pytest.approx(14 * 0.05 * 0.03)
    assert report.expected_wrong_total == pytest.approx((10 * 0.2 + 14 * 0.05) * 0.03)
    assert report.error_likelihood == TOP_CLASS_ERROR_NAME and report.expected_wrong_note is None
    assert "Expected wrong volume: 0.08 mL (liver 0.06, tumour 0.00)" in report.to_text()


def test_two_d_reports_area_in_cm2_and_says_so():
    labels = np.array([[0, 1, 1], [1, 0, 0]], dtype=np.uint8)
    report = case_report(labels, (0.5, 4.0), {0: "background", 1: "lesion"}, error_likelihood=labels * 0.5)
    lesion = _by_name(report)["lesion"]
    assert (report.measure, report.unit) == ("area", "cm2")
    assert lesion.amount == pytest.approx(3 * 2.0 / 100)  # 2 mm^2 per pixel
    assert lesion.expected_wrong == pytest.approx(3 * 0.5 * 2.0 / 100)
    row = report.to_dict()["classes"][1]
    assert row["area_cm2"] == pytest.approx(0.06) and "volume_ml" not in row
    assert "lesion: 0.06 cm² (3 pixels)" in report.to_text()


def test_label_values_beyond_the_model_classes_get_their_own_row():
    labels = _labels()
    labels[1, 2, 3] = 7
    sizes = {c.index: c for c in case_report(labels, SPACING, CLASSES).classes}
    assert sorted(sizes) == [0, 1, 2, 7]
    assert sizes[7].voxels == 1 and "not a class of the model" in sizes[7].name


def test_verdict_none_is_stated_plainly():
    report = case_report(_labels(), SPACING, CLASSES)
    assert report.verdict is None and report.verdict_text == NOT_ASSESSED
    assert report.to_dict()["verdict"] == {"level": None, "reasons": [], "text": NOT_ASSESSED}
    assert f"Training-data check: {NOT_ASSESSED}" in report.to_text()


@pytest.mark.parametrize(
    "verdict",
    [
        types.SimpleNamespace(level="caution", reasons=["intensity range unlike training", "spacing 5 mm"]),
        {"level": "caution", "reasons": ["intensity range unlike training", "spacing 5 mm"]},
    ],
)
def test_a_given_verdict_keeps_its_level_and_reasons(verdict):
    report = case_report(_labels(), SPACING, CLASSES, verdict=verdict)
    assert report.verdict == "caution"
    assert report.verdict_reasons == ("intensity range unlike training", "spacing 5 mm")
    assert "Training-data check: caution: intensity range unlike training; spacing 5 mm" in report.to_text()


def test_an_unknown_verdict_level_is_refused():
    with pytest.raises(ValueError, match="'fine'"):
        case_report(_labels(), SPACING, CLASSES, verdict={"level": "fine", "reasons": []})


def test_provenance_fields_reach_the_report():
    report = case_report(_labels(), SPACING, CLASSES, provenance=PROVENANCE)
    assert (report.model, report.model_sha256, report.tool_version) == ("liver-3d", "ab" * 32, "9.9.9")
    assert report.execution_provider == "CPUExecutionProvider"
    assert report.roi == ((0, 2), (0, 3), (1, 4)) and report.timings == {"total": 1.5, "inference": 1.0}
    assert "Model: liver-3d (sha256 abababababab) on CPUExecutionProvider" in report.to_text()
    json.dumps(report.to_dict())  # plain JSON types only


def test_a_map_that_is_not_a_probability_is_named_and_gives_no_expected_wrong_volume():
    labels = _labels()
    report = case_report(
        labels,
        SPACING,
        CLASSES,
        error_likelihood=_error(labels),
        error_likelihood_name=ENTROPY_NAME,
        error_is_probability=False,
    )
    assert report.error_likelihood == ENTROPY_NAME and report.expected_wrong_total is None
    assert all(c.expected_wrong is None for c in report.classes)
    assert "not a probability" in report.expected_wrong_note
    assert "Expected wrong volume: not computed" in report.to_text()


def test_csv_round_trip(tmp_path):
    labels = _labels()
    report = case_report(
        labels,
        SPACING,
        CLASSES,
        error_likelihood=_error(labels),
        provenance=PROVENANCE,
        verdict={"level": "ok", "reasons": ["a, quoted; reason"]},
        case="scan",
    )
    path = report.to_csv(tmp_path / "scan_report.csv")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["class_name"] for r in rows] == ["background", "liver", "tumour"]
    liver = rows[1]
    assert (liver["case"], liver["class_index"], liver["background"], liver["voxels"]) == (
        "scan",
        "1",
        "False",
        "10",
    )
    assert float(liver["volume_ml"]) == pytest.approx(0.3)
    assert float(liver["expected_wrong_ml"]) == pytest.approx(0.06)
    assert float(liver["expected_wrong_total"]) == pytest.approx(report.expected_wrong_total)
    assert (liver["verdict"], liver["verdict_reasons"]) == ("ok", "a, quoted; reason")
    assert liver["model_sha256"] == "ab" * 32 and json.loads(liver["roi"]) == [[0, 2], [0, 3], [1, 4]]
    assert float(liver["total_seconds"]) == 1.5
    assert rows[0]["verdict"] == rows[2]["verdict"] == "ok"  # case-level fields on every row


def test_csv_without_expected_wrong_or_verdict_leaves_empty_cells(tmp_path):
    path = case_report(_labels(), SPACING, CLASSES).to_csv(tmp_path / "r.csv")
    with path.open(newline="", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    assert row["expected_wrong_ml"] == row["expected_wrong_total"] == row["model"] == ""
    assert row["verdict"] == "not assessed"


def test_csv_write_failure_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    report = case_report(_labels(), SPACING, CLASSES)
    with pytest.raises(OutputError, match="missing"):
        report.to_csv(tmp_path / "missing" / "r.csv")
    existing = tmp_path / "r.csv"
    existing.write_text("old\n")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("napari_medcl.atomic.os.replace", full_disk)
    with pytest.raises(OutputError) as caught:
        report.to_csv(existing)
    assert caught.value.path == existing
    assert existing.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as caught:
        case_report(_labels(), SPACING, CLASSES, error_likelihood=np.zeros((2, 3, 5), np.float32))
    assert "(2, 3, 5)" in str(caught.value) and "(2, 3, 4)" in str(caught.value)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        case_report(_labels(), (1.0, 1.0), CLASSES)


def test_an_error_likelihood_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        case_report(_labels(), SPACING, CLASSES, error_likelihood=np.full((2, 3, 4), 1.5, np.float32))


def test_top_class_error_on_known_probabilities():
    probabilities = np.array(
        [[0.7, 0.2, 1.0], [0.2, 0.5, 0.0], [0.1, 0.3, 0.0]], dtype=np.float32
    )  # (K=3, S=3)
    error = top_class_error(probabilities)
    assert error.dtype == np.float32 and error.shape == (3,)
    np.testing.assert_allclose(error, [0.3, 0.5, 0.0], atol=1e-6)


# A real run: the nearest-class model labels round(x) with p_c proportional to exp(-k (x - c)^2).
K_SOFT = 2.0
RUN_SPACING = (2.5, 0.9, 0.7)  # array order


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model = nearest_class_model(3, k=K_SOFT, maps=(), patch=(4, 4, 4))
    return save(model, tmp_path_factory.mktemp("m") / "nearest3.onnx")


def _values(shape=(5, 6, 7)) -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.choice(
        np.array([0.0, 0.2, 0.45, 1.0, 1.3, 2.0], np.float32), size=shape
    )  # class 2 is rare-ish


def _oracle(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, top-class error) the model computes voxel by voxel."""
    logits = -K_SOFT * (values[None] - np.arange(3, dtype=np.float64).reshape(3, 1, 1, 1)) ** 2
    p = np.exp(logits - logits.max(axis=0))
    p /= p.sum(axis=0)
    return p.argmax(axis=0), 1.0 - p.max(axis=0)


def test_the_sidecar_holds_the_report_of_a_real_run(tmp_path, model_path):
    values = _values()
    volume = Volume(values, RUN_SPACING, (0.0, 0.0, 0.0), np.eye(3))
    prediction = napari_medcl.predict(volume, model_path, device="cpu", return_probabilities=True)
    written = napari_medcl.write_prediction(prediction, tmp_path, "case1")
    sidecar = json.loads(written.sidecar.read_text())

    assert list(sidecar)[:-1] == list(written.provenance.to_dict()) and list(sidecar)[-1] == "report"
    report = sidecar["report"]
    labels, error = _oracle(values)
    voxel_ml = np.prod(RUN_SPACING) / 1000
    assert [c["name"] for c in report["classes"]] == ["background", "class1", "class2"]
    for c in report["classes"]:
        mine = labels == c["index"]
        assert c["voxels"] == int(mine.sum()) > 0
        assert c["volume_ml"] == pytest.approx(mine.sum() * voxel_ml)
        assert c["expected_wrong_ml"] == pytest.approx(error[mine].sum() * voxel_ml, rel=1e-4)
    assert report["expected_wrong_ml_total"] == pytest.approx(error.sum() * voxel_ml, rel=1e-4)
    assert report["expected_wrong_ml_total"] > 0.01  # soft probabilities: a test that can fail on zeros
    assert report["error_likelihood"] == TOP_CLASS_ERROR_NAME
    # A model file without a training-data profile: the verdict says so plainly (napari_medcl.verdict).
    assert report["verdict"] == {
        "level": "unknown",
        "reasons": [NO_PROFILE],
        "text": f"unknown: {NO_PROFILE}",
    }
    assert sidecar["verdict"]["level"] == "unknown"
    assert report["model"] == "test-model" and report["model_sha256"] == sidecar["model"]["sha256"]
    assert report["timings"] == sidecar["timings"]
    assert written.report.to_dict() == report and written.report_csv is None
    assert "report_csv" not in sidecar["outputs"]


def test_without_probabilities_the_sidecar_still_has_the_expected_wrong_volume(tmp_path, model_path):
    values = _values()
    volume = Volume(values, RUN_SPACING, (0.0, 0.0, 0.0), np.eye(3))
    prediction = napari_medcl.predict(volume, model_path, device="cpu")
    assert prediction.probabilities is None
    _, error = _oracle(values)
    np.testing.assert_allclose(prediction.top_class_error.array, error, atol=1e-5)
    report = json.loads(napari_medcl.write_prediction(prediction, tmp_path, "c").sidecar.read_text())[
        "report"
    ]
    voxel_ml = np.prod(RUN_SPACING) / 1000
    assert report["error_likelihood"] == TOP_CLASS_ERROR_NAME
    assert report["expected_wrong_ml_total"] == pytest.approx(error.sum() * voxel_ml, rel=1e-4)
    assert report["expected_wrong_ml_total"] > 0.01


def test_the_prediction_map_is_preferred_to_the_probabilities(model_path):
    volume = Volume(_values(), RUN_SPACING, (0.0, 0.0, 0.0), np.eye(3))
    prediction = napari_medcl.predict(volume, model_path, device="cpu", return_probabilities=True)
    # A map that differs from 1 - max p shows which one the report read.
    marked = prediction.top_class_error.with_array(np.full(volume.spatial_shape, 0.5, np.float32))
    report = prediction_report(dataclasses.replace(prediction, top_class_error=marked))
    voxel_ml = np.prod(RUN_SPACING) / 1000
    assert report.expected_wrong_total == pytest.approx(0.5 * volume.array.size * voxel_ml, rel=1e-6)
    # Without the map (a Prediction from older code): from the probabilities, else the entropy, named.
    older = dataclasses.replace(prediction, top_class_error=None)
    _, error = _oracle(volume.array)
    assert prediction_report(older).expected_wrong_total == pytest.approx(error.sum() * voxel_ml, rel=1e-4)
    no_probabilities = prediction_report(dataclasses.replace(older, probabilities=None))
    assert no_probabilities.error_likelihood == ENTROPY_NAME
    assert no_probabilities.expected_wrong_total is None
    assert all(c.expected_wrong is None for c in no_probabilities.classes)


def _scan(path) -> None:
    image = sitk.GetImageFromArray(_values())
    image.SetSpacing(RUN_SPACING[::-1])
    sitk.WriteImage(image, str(path))


def test_cli_report_csv_end_to_end(tmp_path, model_path):
    _scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    argv = [str(tmp_path / "scan.nii.gz"), "-o", str(out), "--model", str(model_path), "--quiet"]
    assert cli.main([*argv, "--report-csv", "--save-probabilities"]) == 0

    sidecar = json.loads((out / "scan.json").read_text())
    assert sidecar["outputs"]["report_csv"] == "scan_report.csv"
    with (out / "scan_report.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels, error = _oracle(_values())
    voxel_ml = np.prod(RUN_SPACING) / 1000
    assert [int(r["voxels"]) for r in rows] == np.bincount(labels.ravel(), minlength=3).tolist()
    for row, c in zip(rows, sidecar["report"]["classes"]):
        assert row["case"] == "scan" and row["class_name"] == c["name"]
        assert float(row["volume_ml"]) == pytest.approx(c["volume_ml"])
        assert float(row["expected_wrong_ml"]) == pytest.approx(c["expected_wrong_ml"])
    assert float(rows[0]["expected_wrong_total"]) == pytest.approx(error.sum() * voxel_ml, rel=1e-4)

    # a finished case is skipped; redone without --report-csv, no CSV is listed (the earlier one stays on disk)
    assert cli.main([*argv, "--overwrite"]) == 0
    assert "report_csv" not in json.loads((out / "scan.json").read_text())["outputs"]


@pytest.mark.parametrize("failing", ["csv", "sidecar"])
def test_a_failed_write_with_report_csv_leaves_the_earlier_case_whole(
    tmp_path, model_path, monkeypatch, failing
):
    from napari_medcl import atomic

    _scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    argv = [str(tmp_path / "scan.nii.gz"), "-o", str(out), "--model", str(model_path), "--quiet"]
    assert cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original = atomic.write_text_atomic

    def full_disk(path, text, encoding="utf-8"):
        if str(path).endswith(".csv" if failing == "csv" else ".json"):
            raise OSError(28, "No space left on device")
        return original(path, text, encoding)

    monkeypatch.setattr(atomic, "write_text_atomic", full_disk)
    assert cli.main([*argv, "--report-csv"]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no CSV, no newer file
