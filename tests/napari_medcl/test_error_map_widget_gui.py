"""The widget with a model that carries a calibrated error map: the "error likelihood" layer is shown and
reviewed, the uncalibrated map stays hidden beside it, region runs update it, the cursor line, the case report
and the model summary name it; a later run with a model without one takes its layer away."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_medcl.case_report import ERROR_LIKELIHOOD_NAME, TOP_CLASS_ERROR_NAME
from napari_medcl.error_model import ErrorModel
from tests.napari_medcl.test_widget_gui import make_widget, oblique_scan, open_scan, run_and_wait
from tests.onnx_models import make_spec, pointwise_model, save

pytestmark = pytest.mark.gui

ERROR_MODEL = ErrorModel(
    features=("top_error", "border"),
    coefficients=(4.0, 3.0),
    intercept=-3.0,
    figures={"auroc": 0.8, "ece": 0.02, "cases": ["a", "b"], "signals": {"top_error": 0.7, "border": 0.65}},
)


@pytest.fixture
def models(tmp_path):
    spec = make_spec(spatial_dims=3, patch=(4, 8, 8))
    calibrated = dataclasses.replace(spec, error_model=ERROR_MODEL.to_dict())
    return (
        save(pointwise_model(spec=calibrated, k=3.0), tmp_path / "calibrated.onnx"),
        save(pointwise_model(spec=spec, k=3.0), tmp_path / "plain.onnx"),
    )


@pytest.mark.slow
def test_the_calibrated_map_is_shown_reviewed_and_updated_by_region_runs(
    make_napari_viewer, qtbot, tmp_path, models
):
    from napari_medcl._widget import REGION_SLICE, REGION_WHOLE

    calibrated, plain = models
    source = tmp_path / "case.nii.gz"
    oblique_scan(source)
    viewer = make_napari_viewer()
    image = open_scan(viewer, source)
    widget = make_widget(viewer, calibrated)
    info = widget._model_info.value
    assert "calibrated error map (2 features, logistic): AUROC 0.800, ECE 0.020" in info
    assert "out-of-fold AUROC of each signal alone: top_error 0.700, border 0.650" in info

    run_and_wait(qtbot, widget)
    results = widget.results_of(image)
    shown, uncalibrated = results["error_likelihood"], results["top_class_error"]
    assert (
        shown.name == "case error likelihood" and uncalibrated.name == "case error likelihood (uncalibrated)"
    )
    assert shown.visible and not uncalibrated.visible and not results["uafr_uncertainty"].visible
    np.testing.assert_allclose(shown.scale, image.scale)
    assert viewer.layers.index(shown) > viewer.layers.index(uncalibrated)  # drawn on top

    review = widget.show_review()
    assert review._uncertainty.value == shown and review.scores
    assert viewer.layers[-1].name == "case error likelihood > 0.50"
    report = review.case_report()
    assert report.error_likelihood == ERROR_LIKELIHOOD_NAME
    voxel_ml = float(np.prod(image.scale)) / 1000
    assert report.expected_wrong_total == pytest.approx(float(shown.data.sum()) * voxel_ml, rel=1e-4)

    viewer.cursor.position = tuple(image.data_to_world((4, 10, 12)))
    line = widget._cursor.value
    assert " · error likelihood 0." in line and " · error likelihood (uncalibrated) 0." in line

    # a slice run rewrites the calibrated map in that slice only, like every other map
    before = np.asarray(shown.data).copy()
    shown.data = np.zeros_like(before)
    viewer.dims.set_point(0, image.data_to_world((5, 0, 0))[0])
    widget._region.value = REGION_SLICE
    run_and_wait(qtbot, widget)
    assert widget.results_of(image)["error_likelihood"] is shown
    after = np.asarray(shown.data)
    assert not after[:5].any() and not after[6:].any()
    np.testing.assert_allclose(after[5], before[5], atol=1e-6)  # the border feature sees the slice's labels

    # a model without an error map: its uncalibrated map is shown, the stale calibrated one is gone
    widget._region.value = REGION_WHOLE
    widget.add_model_file(plain)
    assert "review map: uncalibrated error likelihood" in widget._model_info.value
    run_and_wait(qtbot, widget)
    results = widget.results_of(image)
    assert "error_likelihood" not in results and shown not in viewer.layers
    assert results["top_class_error"] is uncalibrated and uncalibrated.visible
    assert widget.show_review()._uncertainty.value == uncalibrated
    assert widget.show_review().case_report().error_likelihood == TOP_CLASS_ERROR_NAME
