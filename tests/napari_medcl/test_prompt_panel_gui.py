"""Prompts in a real napari viewer (Xvfb): a negative click inside a wrongly labelled region removes that label
there and nowhere else, as one Ctrl+Z step; the next-mistake button moves the view; prompts are saved beside
the labels."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medcl._prompt_panel import REMOVES
from napari_medcl.prompts import load_prompts
from tests.napari_medcl.test_clinician_path import press_ctrl_z, run_and_wait
from tests.napari_medcl.test_interactive import EXTRA, MISSED, RIGHT, planted_case
from tests.onnx_models import pointwise_model, save

pytestmark = pytest.mark.gui


def test_a_negative_click_removes_the_label_there_and_nowhere_else(make_napari_viewer, qtbot, tmp_path):
    volume, _truth = planted_case()
    volume.array[1:4, 14:18, 26:30] = 0.49  # a doubtful patch: the model's error likelihood there is 0.5
    viewer = make_napari_viewer()
    image = viewer.add_image(volume.array, name="planted")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medcl", "Segment with uncertainty")
    widget.add_model_file(save(pointwise_model(patch=(8, 8, 8), maps=()), tmp_path / "pointwise.onnx"))
    widget._image.value = image
    run_and_wait(qtbot, widget)
    labels = widget.results_of(image)["labels"]
    before = np.asarray(labels.data).copy()
    assert (before[EXTRA] == 1).all() and (before[RIGHT] == 1).all()

    panel = widget.prompts
    points = panel.place_prompts()
    assert points is not None and points.mode == "add"
    panel._class.value = 1
    panel._polarity.value = REMOVES
    points.add(np.array([[6.0, 22.0, 6.0]]))  # what a click in the view adds

    after = np.asarray(labels.data)
    assert not after[EXTRA].any()
    changed = after != before
    outside = np.ones(changed.shape, dtype=bool)
    outside[EXTRA] = False
    assert not changed[outside].any()
    assert "1 voxel" in panel._info.value or "voxel(s) changed" in panel._info.value

    press_ctrl_z(qtbot, viewer, labels)
    np.testing.assert_array_equal(np.asarray(labels.data), before)

    # a stroke of class 1 across the blob the model missed labels the blob
    from napari_medcl._prompt_panel import ADDS, BOX, SCRIBBLE

    panel._polarity.value = ADDS
    assert panel._tool in list(panel)  # the tool choice is on the panel, not only in the API
    panel._tool.value = SCRIBBLE
    panel._place.changed.emit(True)  # the button, as a user presses it
    strokes = viewer.layers.selection.active
    assert strokes.mode == "paint"
    strokes.brush_size = 1
    strokes.paint((6, 6, 6), 1)
    qtbot.waitUntil(lambda: panel._info.value.startswith("Prompt 2"), timeout=5000)
    assert (np.asarray(labels.data)[MISSED] == 1).all()
    assert panel.undo() == np.asarray(labels.data)[MISSED].size
    assert not np.asarray(labels.data)[MISSED].any()

    # a rectangle on slice 6 around the same blob labels it on that slice
    panel._tool.value = BOX
    panel._place.changed.emit(True)
    rectangles = viewer.layers.selection.active
    assert rectangles.mode == "add_rectangle"
    rectangles.add(np.array([[6, 3, 3], [6, 3, 10], [6, 10, 10], [6, 10, 3]]), shape_type="rectangle")
    assert panel._info.value.startswith("Prompt 2"), panel._info.value
    assert (np.asarray(labels.data)[6, 4:9, 4:10] == 1).all()
    panel.undo()

    region = panel.go_to_next()
    centre = tuple(int(c) for c in region.center)
    assert 1 <= centre[0] < 4 and 14 <= centre[1] < 18 and 26 <= centre[2] < 30  # the doubtful patch
    assert viewer.dims.point[0] == pytest.approx(centre[0])
    assert tuple(viewer.camera.center[-2:]) == pytest.approx(centre[1:])
    outline = viewer.layers["planted next likely mistake"]
    (corners,) = outline.data
    low, high = np.asarray(corners)[:, 1:].min(axis=0) + 0.5, np.asarray(corners)[:, 1:].max(axis=0) + 0.5
    assert (low <= np.array(centre[1:])).all() and (np.array(centre[1:]) < high).all()
    assert tuple(high - low) == tuple(b.stop - b.start for b in region.box[1:])

    review = widget.show_review()
    review._labels_combo.value = labels
    saved = review.save_labels(tmp_path / "planted-labels.nii.gz")
    prompts = load_prompts(tmp_path / "planted-labels.prompts.json", shape=(12, 32, 32))
    assert saved.exists() and len(prompts) == 1 and not prompts[0].positive  # the undone ones are gone
    assert "prompts" in review._summary.value

    # reopen: a new run on the same scan, then the saved prompts replayed onto it
    panel.sessions.clear()
    run_and_wait(qtbot, widget)
    assert panel.load_prompts(tmp_path / "planted-labels.nii.gz") == 1
    assert not np.asarray(labels.data)[EXTRA].any()

    # the network engine, asked of a model without prompt channels, says so in one line and changes nothing
    assert panel._engine in list(panel) and panel._engine.value == "auto"
    panel._engine.value = "network"
    kept = np.asarray(labels.data).copy()
    assert panel.add_click(image, (6, 7, 7), label=1, positive=True) is None
    assert "needs a model with prompt channels" in panel._info.value
    np.testing.assert_array_equal(np.asarray(labels.data), kept)
