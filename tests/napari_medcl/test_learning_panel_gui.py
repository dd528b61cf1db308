"""The learning panel in a real napari viewer (Xvfb): Add to training set writes the image and the edited
labels with the voxels the user changed against the model's own output; the corrections folder is remembered;
the *Which case next* list shows rank_cases' order with the reasons, and a click selects or opens the case.
The model is a tiny threshold model (tests/onnx_models.py): the test checks the panel's bookkeeping."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medcl import learning
from napari_medcl.io import read_image, write_image
from napari_medcl.ranking import rank_cases
from tests.onnx_models import pointwise_model, save

pytestmark = pytest.mark.gui

WAIT_MS = 60_000


@pytest.fixture
def segment(make_napari_viewer, qtbot, tmp_path):
    spec = {"spatial_dims": 3, "patch": (16, 48, 48)}
    model = save(pointwise_model(threshold=150.0, name="threshold-150", **spec), tmp_path / "t.onnx")
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-medcl", "Segment with uncertainty")
    widget.add_model_file(model)
    return viewer, widget, model


def test_add_to_training_set_writes_the_edited_labels_and_what_changed(segment, qtbot, tmp_path):
    viewer, widget, _ = segment
    (image,) = viewer.open_sample("napari-medcl", "mni152_t1")
    panel = widget.learning
    panel.set_corrections_folder(tmp_path / "corrections")
    assert panel.add_to_training_set() is None  # nothing to add before a run
    assert panel._add_info.value.startswith("Run the model on the image first")

    widget._run.changed.emit(True)
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    labels = widget.results_of(image)["labels"]
    model_output = np.asarray(labels.data).copy()
    labels.brush_size = 4
    labels.paint((30, 40, 30), 1)  # the threshold model's 2 classes: add some, remove some
    labels.paint((39, 50, 40), 0)
    changed = int((np.asarray(labels.data) != model_output).sum())
    assert changed > 5

    panel._add.changed.emit(True)  # the button, as a user presses it
    line = panel._add_info.value
    folder = tmp_path / "corrections"
    assert line.startswith(
        f"Added mni152_t1_2mm in {folder} (1 corrected case(s)): {changed:,} voxel(s) changed"
    )
    record = json.loads((folder / "corrections" / "mni152_t1_2mm.json").read_text())
    assert record["changed"]["voxels"] == changed and record["model"]["name"] == "threshold-150"
    saved = read_image(folder / "labelsTr" / "mni152_t1_2mm.nii.gz")
    np.testing.assert_array_equal(saved.array, np.asarray(labels.data))
    assert (folder / "imagesTr" / "mni152_t1_2mm_0000.nii.gz").is_file()
    assert learning.load_corrections_folder() == folder  # remembered for the next session


def test_which_case_next_lists_the_ranking_and_a_click_opens_the_case(segment, tmp_path):
    viewer, widget, model = segment
    sample = read_image(
        viewer.open_sample("napari-medcl", "mni152_t1")[0].metadata["medcl_geometry"]["source"]
    )
    viewer.layers.clear()
    paths = []
    (tmp_path / "scans").mkdir()
    for name, scale in (("bright", 1.3), ("dim", 0.7), ("plain", 1.0)):
        paths.append(
            write_image(sample.with_array(sample.array * scale), tmp_path / "scans" / f"{name}.nii.gz")
        )
    opened = {}
    for path in paths[:2]:
        (opened[path.name],) = viewer.open(str(path), plugin="napari-medcl")
    panel = widget.learning

    panel.rank_open_images(sync=True)  # the two open scans
    expected = rank_cases([str(p.resolve()) for p in paths[:2]], str(model), device="cpu")
    shown = [panel.list.item(i).text() for i in range(panel.list.count())]
    assert shown == learning.ranking_entries(expected) and len(shown) == 2
    assert all(": " in line and "expected" in line for line in shown)  # each with its reason
    panel.list.setCurrentRow(1)
    second = opened[expected[1].path.name]
    assert viewer.layers.selection.active is second and widget.current_image() is second

    panel.rank_folder(tmp_path / "scans", sync=True)  # a folder: the third scan is not open yet
    assert panel.list.count() == 3
    row = next(i for i, (r, _) in enumerate(panel.ranked) if r.path.name == "plain.nii.gz")
    before = len(viewer.layers)
    panel.list.setCurrentRow(row)
    assert len(viewer.layers) == before + 1 and viewer.layers.selection.active.name == "plain"


def test_models_fine_tuned_in_the_remembered_folder_are_in_the_picker(make_napari_viewer, tmp_path):
    folder = tmp_path / "corrections"
    (folder / "finetuned").mkdir(parents=True)
    model = save(
        pointwise_model(threshold=1.0, name="x-ft1", spatial_dims=3), folder / "finetuned" / "x-ft1.onnx"
    )
    learning.remember_corrections_folder(folder)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-medcl", "Segment with uncertainty")
    assert str(model.resolve()) in widget._model.choices
    assert widget._model.value == "brain-tissue-3d"  # offered, not chosen
    assert widget.learning._folder_info.value == f"Corrections folder: {folder}"


@pytest.mark.torch
@pytest.mark.slow
def test_fine_tune_from_the_panel_adds_the_new_model_and_cancel_adds_none(
    make_napari_viewer, qtbot, tmp_path
):
    from tests.finetune_factory import corrections_with_tiny_model

    folder, source = corrections_with_tiny_model(tmp_path)
    save(pointwise_model(threshold=1.0, name="tiny-ft1", spatial_dims=3), source)  # what the picker shows
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-medcl", "Segment with uncertainty")
    widget.add_model_file(source)
    panel = widget.learning
    panel.set_corrections_folder(folder)

    panel._finetune.changed.emit(True)  # the button
    assert panel._finetune.text == "Cancel fine-tuning"
    assert "Holding out case2 (not trained on)" in panel._ft_info.value
    qtbot.waitUntil(lambda: not panel.running, timeout=180_000)
    new = folder / "finetuned" / "tiny-ft2.onnx"
    assert panel._ft_info.value.startswith(
        "tiny-ft2 is in the model picker. Held-out corrected case(s) case2"
    )
    assert str(new.resolve()) in widget._model.choices and panel._progress.value == 100
    assert "epoch 1/" in panel.log_text()

    panel._finetune.changed.emit(True)  # again: tiny-ft3, cancelled at once with the same button
    assert panel.running
    panel._finetune.changed.emit(True)
    assert panel._ft_info.value == "Fine-tuning cancelled; no model was added."
    assert panel._finetune.text == "Fine-tune on the corrections" and panel._progress.value == 0
    assert not (folder / "finetuned" / "tiny-ft3.onnx").exists()
