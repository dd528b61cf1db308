"""The clinician's path through a real napari viewer (Xvfb), with nothing lost on the way.

open the sample -> whole run -> brush edit -> slice run -> edits intact -> Ctrl+Z restores -> second scan ->
its layers' geometry equals its image's -> save -> reopen with equal geometry. The models are tiny threshold
models (labels = intensity above a threshold), so the test checks the product's bookkeeping, not a network;
``scripts/ux_tour.py`` walks the same path with the bundled model and takes screenshots.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_medcl.io import read_image, write_image
from napari_medcl.volume import Volume
from tests.onnx_models import pointwise_model, save

pytestmark = pytest.mark.gui

WAIT_MS = 60_000


def run_and_wait(qtbot, widget) -> None:
    widget._run.changed.emit(True)
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert "Done" in widget._status.value, widget._status.value


def press_ctrl_z(qtbot, viewer, layer) -> None:
    """Ctrl+Z pressed on the canvas with ``layer`` active, as a user does it."""
    from qtpy.QtCore import Qt

    viewer.layers.selection.active = layer
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    qtbot.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)


def test_the_clinicians_path_keeps_every_edit(make_napari_viewer, qtbot, tmp_path):
    spec = {"spatial_dims": 3, "patch": (16, 48, 48)}
    model_a = save(pointwise_model(threshold=150.0, name="threshold-150", **spec), tmp_path / "a.onnx")
    model_b = save(pointwise_model(threshold=120.0, name="threshold-120", **spec), tmp_path / "b.onnx")
    viewer = make_napari_viewer()
    (image,) = viewer.open_sample("napari-medcl", "mni152_t1")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medcl", "Segment with uncertainty")
    assert widget._model.value == "brain-tissue-3d"  # the bundled default is preselected
    asked = []
    widget.confirm_edits = lambda count, where: asked.append((count, where)) or "keep"

    # whole run
    widget.add_model_file(model_a)
    run_and_wait(qtbot, widget)
    labels = widget.results_of(image)["labels"]
    np.testing.assert_array_equal(labels.data, image.data > 150)

    # brush strokes on slice 30, as the brush paints them (one undoable stroke each)
    labels.brush_size = 6
    for y, x in ((40, 30), (42, 34), (60, 50)):
        labels.paint((30, y, x), 2)
    edited = labels.data == 2
    assert edited[30].sum() > 30 and not np.delete(edited, 30, axis=0).any()
    before_slice_run = labels.data.copy()

    # a slice run on slice 39 with another model: only slice 39 changes, the edits on slice 30 stay
    widget.add_model_file(model_b)
    viewer.dims.set_point(0, image.data_to_world((39, 0, 0))[0])
    from napari_medcl._widget import REGION_SLICE

    widget._region.value = REGION_SLICE
    assert widget._region_info.value.startswith("Writes z 39 (1 of 80)")
    run_and_wait(qtbot, widget)
    assert asked == []  # no edit lies in slice 39: nothing to ask
    assert widget.results_of(image)["labels"] is labels or widget.results_of(image)["labels"] == labels
    np.testing.assert_array_equal(labels.data[39], image.data[39] > 120)
    np.testing.assert_array_equal(np.delete(labels.data, 39, 0), np.delete(before_slice_run, 39, 0))
    assert (labels.data[edited] == 2).all()
    assert (labels.data[39] != before_slice_run[39]).sum() > 100

    # an edit inside the next run's region is asked about and kept
    labels.paint((39, 50, 40), 2)
    kept_edit = (labels.data[39] == 2).copy()
    run_and_wait(qtbot, widget)
    assert len(asked) == 1 and asked[0][0] == kept_edit.sum() and "z 39" in asked[0][1]
    assert (labels.data[39][kept_edit] == 2).all()
    assert "Kept" in widget._status.value

    # Ctrl+Z undoes a model write as one step: back to the labels before the run, edits and all
    widget.add_model_file(model_a)
    with_edit = labels.data.copy()
    run_and_wait(qtbot, widget)  # asked again; keeps the edit, rewrites the rest of slice 39
    assert not np.array_equal(labels.data, with_edit)
    press_ctrl_z(qtbot, viewer, labels)
    np.testing.assert_array_equal(labels.data, with_edit)

    # one status line under the cursor: the class and each map's value there
    viewer.cursor.position = tuple(image.data_to_world((39, 50, 40)))
    line = widget._cursor.value
    assert line.startswith("Under the cursor: label 2 · error likelihood (uncalibrated) 0.")
    assert " · UAFR " in line and " · entropy " in line
    assert viewer.status == "MNI152 T1: " + widget._cursor.value.removeprefix("Under the cursor: ")
    viewer.cursor.position = tuple(image.data_to_world((39, 10, 5)))
    assert widget._cursor.value.startswith("Under the cursor: background")

    # the 3D view shows the labels' surfaces: the maps, which would fill the volume, are hidden until 2D
    shown = widget.results_of(image)["top_class_error"]
    assert shown.visible and not widget.results_of(image)["uafr_uncertainty"].visible
    viewer.dims.ndisplay = 3
    assert not shown.visible and not widget.results_of(image)["review_outline"].visible and labels.visible
    viewer.dims.ndisplay = 2
    assert shown.visible and widget.results_of(image)["review_outline"].visible
    assert not widget.results_of(image)["uafr_uncertainty"].visible  # hidden before 3D, hidden after

    # a second scan, with another spacing and origin: its results sit on its own grid
    widget._region.value = "Whole image"
    sample = read_image(image.metadata["medcl_geometry"]["source"])
    other = Volume(
        array=sample.array[::2, ::2, ::2].copy(),
        spacing=(4.0, 4.0, 4.0),
        origin=(-60.0, -70.0, -50.0),
        direction=np.eye(3),
    )
    write_image(other, tmp_path / "second.nii.gz")
    (second,) = viewer.open(str(tmp_path / "second.nii.gz"), plugin="napari-medcl")
    widget._image.value = second
    run_and_wait(qtbot, widget)
    results = widget.results_of(second)
    assert set(results) == {"labels", "uafr_uncertainty", "entropy", "top_class_error", "review_outline"}
    for layer in results.values():
        np.testing.assert_allclose(layer.scale, second.scale)
        np.testing.assert_allclose(layer.translate, second.translate)
        assert layer.data.shape == second.data.shape
    first_results = widget.results_of(image)
    assert first_results["labels"].data.shape == image.data.shape
    np.testing.assert_array_equal(first_results["labels"].data, with_edit)  # untouched by the second scan
    assert first_results["review_outline"] != results["review_outline"]

    # save the first scan's labels, reopen them: same grid as the scan, same voxels
    review = widget.show_review()
    review.set_layers(first_results["labels"], first_results["uafr_uncertainty"])
    written = review.save_labels(tmp_path / "sample_labels.nii.gz")
    reopened = read_image(written)
    assert reopened.same_geometry(sample)
    np.testing.assert_array_equal(reopened.array, with_edit)

    # the case report counts the labels as they are now, the user's edits included
    report = review.case_report()
    rows = {c.index: c for c in report.classes}
    assert rows[1].name == "class1" and rows[1].voxels == int((with_edit == 1).sum())
    assert rows[1].amount == pytest.approx(rows[1].voxels * 8 / 1000)  # 2 mm voxels, mL
    assert rows[2].voxels == int((with_edit == 2).sum())  # painted with a label the model does not have
    assert report.model == "threshold-150" or report.model == "threshold-120"
    csv_path = report.to_csv(tmp_path / "sample_report.csv")
    assert "class1" in csv_path.read_text()
