"""The napari widgets in a real viewer under Xvfb (pytest-xvfb starts it): few, end-to-end, no pixel comparisons."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_medcl.io import read_image
from napari_medcl.io import write_image as io_write_image
from napari_medcl.layer_data import ObliqueGeometryWarning
from napari_medcl.volume import Volume
from tests.onnx_models import make_spec, pointwise_model, save

pytestmark = pytest.mark.gui

WAIT_MS = 30_000


def oblique_scan(path: Path, shape=(8, 24, 28)) -> Volume:
    c, s = np.cos(0.25), np.sin(0.25)
    volume = Volume(
        array=np.random.default_rng(0).random(shape, dtype=np.float32),
        spacing=(3.0, 0.75, 0.8),
        origin=(5.0, -10.0, 20.0),
        direction=np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]),
    )
    io_write_image(volume, path)
    return volume


@pytest.fixture
def model3d(tmp_path):
    return save(pointwise_model(spatial_dims=3, patch=(4, 8, 8)), tmp_path / "m3.onnx")


def open_scan(viewer, path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ObliqueGeometryWarning)
        (layer,) = viewer.open(str(path), plugin="napari-medcl")
    return layer


def make_widget(viewer, model: Path):
    """The widget as napari builds it from the manifest (it gets the viewer through napari's public proxy)."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-medcl", "Segment with uncertainty")
    widget.add_model_file(model)
    return widget


def run_and_wait(qtbot, widget) -> None:
    widget._run.changed.emit(True)  # a click on Run
    assert widget.running and widget._run.text == "Cancel"
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)


@pytest.mark.slow
def test_open_segment_review_rerun_and_save(make_napari_viewer, qtbot, tmp_path, model3d):
    from napari.layers import Image, Labels
    from napari.utils.colormaps import DirectLabelColormap

    source = tmp_path / "case.nii.gz"
    scan = oblique_scan(source)
    viewer = make_napari_viewer()
    image = open_scan(viewer, source)
    np.testing.assert_allclose(image.scale, (3.0, 0.75, 0.8), rtol=1e-6)
    widget = make_widget(viewer, model3d)
    assert "research use" in widget._notice.value.lower()

    run_and_wait(qtbot, widget)
    names = [layer.name for layer in viewer.layers]
    assert names[:4] == ["case", "case labels", "case UAFR uncertainty", "case entropy"]
    labels, uafr, entropy = (viewer.layers[n] for n in names[1:4])
    assert isinstance(labels, Labels) and isinstance(uafr, Image)
    assert isinstance(labels.colormap, DirectLabelColormap)
    spec = make_spec(spatial_dims=3, patch=(4, 8, 8))
    expected = [int(spec.classes[1].color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    np.testing.assert_allclose(labels.colormap.map(np.array([1]))[0][:3], expected, atol=1e-6)
    assert list(labels.features["name"]) == ["background", "class1"]
    assert uafr.colormap.name == "medcl uncertainty" and tuple(uafr.contrast_limits) == (0.0, 1.0)
    error = viewer.layers["case error likelihood (uncalibrated)"]
    # the map shown is the error likelihood (measured to find mistakes best); UAFR and entropy are a click away
    assert error.visible and not uafr.visible and not entropy.visible
    for layer in (labels, uafr, entropy, error):
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
    np.testing.assert_array_equal(labels.data, scan.array > 0.5)
    assert widget._run.text == "Run"
    assert "CPUExecutionProvider" in widget._status.value or "OpenVINO CPU" in widget._status.value
    from napari_medcl.onnx_session import available_backends

    assert list(widget._backend.choices) == available_backends()  # OpenVINO offered when installed
    assert widget._device_note.value.startswith("Warning: ran on the CPU")  # whichever CPU backend ran

    # the review panel ranks slices; a click moves the viewer to the slice
    review = widget.show_review()
    assert review.scores and review._labels_combo.value == labels and review._uncertainty.value == error
    overlay = viewer.layers[-1]
    assert overlay.name == "case error likelihood > 0.50" and overlay.data.shape == labels.data.shape
    top = review.scores[0]
    review._slice_list.native.setCurrentRow(0)
    z_world = image.data_to_world((top.index, 0, 0))[0]
    assert viewer.dims.point[0] == pytest.approx(z_world)
    review._threshold.value = 0.9
    assert viewer.layers[-1] == overlay and overlay.name == "case error likelihood > 0.90"
    # ranked again another way, the list shows the new ranking in its order (row r is entry r)
    review._slice_list.native.setCurrentRow(2)
    review._threshold.value = 0.3
    review._mode.value = "volume_above"
    assert len(review._entries) > 2
    review._slice_list.native.setCurrentRow(0)
    point = tuple(viewer.dims.point)
    review.refresh()
    review._threshold.value = 0.35
    assert tuple(viewer.dims.point) == point  # ranking again does not move the viewer
    # 3D regions, most expected errors first; a click zooms to the region's box
    review._threshold.value = 0.2  # the test model's error likelihood is at most 0.5
    review._mode.value = "regions"
    first = review.scores[0]
    assert review._entries[0].startswith("1. z ") and "expected wrong" in review._entries[0]
    assert first.score == max(r.score for r in review.scores)
    viewer.reset_view()
    whole_zoom = viewer.camera.zoom
    last = len(review.scores) - 1  # the smallest regions come last: its box is a few voxels
    small = review.scores[last]
    assert small.voxels < 20
    review._slice_list.native.setCurrentRow(last)
    z_world = error.data_to_world(small.center)[0]
    assert viewer.dims.point[0] == pytest.approx(z_world, abs=error.scale[0])
    assert viewer.camera.zoom > whole_zoom
    shown = [review._slice_list.native.item(r).text() for r in range(review._slice_list.native.count())]
    assert shown == review._entries and shown[0].startswith("1. ")

    # re-running updates the same layers in place, asking before it overwrites the user's edits
    edited = int(labels.data.sum())
    labels.data = np.zeros_like(labels.data)
    asked = []
    widget.confirm_edits = lambda count, where: asked.append((count, where)) or "overwrite"
    count = len(viewer.layers)
    run_and_wait(qtbot, widget)
    assert asked == [(edited, "z all 8, y all 24, x all 28")]
    assert len(viewer.layers) == count and viewer.layers["case labels"] is labels and labels.data.any()
    widget._keep.value = True
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == count + 4

    # saving writes the labels with the source file's geometry (oblique direction included)
    written = review.save_labels(tmp_path / "case_labels.nii.gz")
    assert read_image(written).same_geometry(read_image(source))


def test_cancel_mid_run_adds_nothing(make_napari_viewer, qtbot, tmp_path):
    model = save(pointwise_model(spatial_dims=3, patch=(2, 4, 4)), tmp_path / "tiny_patch.onnx")
    viewer = make_napari_viewer()
    oblique_scan(tmp_path / "big.nrrd", shape=(16, 64, 64))
    open_scan(viewer, tmp_path / "big.nrrd")
    widget = make_widget(viewer, model)
    before = [layer.name for layer in viewer.layers]
    shown = []
    widget._progress.changed.connect(lambda value: shown.append((value, widget._progress.max)))
    widget.run()
    qtbot.waitUntil(lambda: widget._progress.value > 0, timeout=WAIT_MS)  # some windows are done
    widget._run.changed.emit(True)  # a click on the button, which reads "Cancel" while running
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    # the last window shown was well before the end: it stopped between windows; then the bar was reset
    done, total = max(pair for pair in shown if pair[1] > 1)
    assert 0 < done < total
    assert widget._progress.value == 0
    assert [layer.name for layer in viewer.layers] == before
    assert "Cancelled" in widget._status.value and widget._run.text == "Run" and widget._run.enabled


def test_error_is_shown_plainly_and_the_ui_resets(make_napari_viewer, qtbot, tmp_path, model3d):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((32, 32), dtype=np.float32), name="flat")
    widget = make_widget(viewer, model3d)
    run_and_wait(qtbot, widget)
    assert "2D image" in widget._status.value and "3D model" in widget._status.value
    assert [layer.name for layer in viewer.layers] == ["flat"]
    assert widget._run.text == "Run" and widget._run.enabled and widget._image.enabled
    # a model producing NaN raises PredictionError (a RuntimeError) inside the thread worker
    viewer.add_image(np.random.default_rng(1).random((4, 16, 16), dtype=np.float32), name="vol")
    widget._image.value = viewer.layers["vol"]
    widget.add_model_file(
        save(pointwise_model(spatial_dims=3, patch=(4, 8, 8), produce_nan=True), tmp_path / "nan.onnx")
    )
    run_and_wait(qtbot, widget)
    assert "NaN" in widget._status.value and widget._run.text == "Run"
    assert [layer.name for layer in viewer.layers] == ["flat", "vol"]
    # the next success clears the error and its colour
    widget.add_model_file(model3d)
    run_and_wait(qtbot, widget)
    assert widget._status.value.startswith("Done") and widget._status.native.styleSheet() == ""


def test_results_being_replaced_are_marked_and_locked(make_napari_viewer, qtbot, tmp_path, model3d):
    slow = save(pointwise_model(spatial_dims=3, patch=(2, 4, 4)), tmp_path / "tiny_patch.onnx")
    viewer = make_napari_viewer()
    oblique_scan(tmp_path / "big.nrrd", shape=(16, 64, 64))
    image = open_scan(viewer, tmp_path / "big.nrrd")
    widget = make_widget(viewer, model3d)
    run_and_wait(qtbot, widget)
    results = widget.results_of(image)
    before = {kind: np.array(layer.data, copy=True) for kind, layer in results.items()}
    names = {kind: layer.name for kind, layer in results.items()}
    widget.add_model_file(slow)
    widget.run()
    qtbot.waitUntil(lambda: widget._progress.value > 0, timeout=WAIT_MS)
    assert all(layer.name.endswith("(being replaced)") for layer in results.values())
    assert not results["labels"].editable
    assert "being recomputed" in widget.show_review()._summary.value
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert {kind: layer.name for kind, layer in results.items()} == names
    assert results["labels"].editable
    for kind, layer in results.items():
        np.testing.assert_array_equal(layer.data, before[kind], err_msg=kind)


def test_current_slice_and_rectangle_regions(make_napari_viewer, qtbot, tmp_path, model3d):
    from napari_medcl._widget import REGION_RECT, REGION_SLICE

    source = tmp_path / "roi.mha"
    scan = oblique_scan(source)
    viewer = make_napari_viewer()
    image = open_scan(viewer, source)
    widget = make_widget(viewer, model3d)

    viewer.dims.set_point(0, image.data_to_world((5, 0, 0))[0])
    widget._region.value = REGION_SLICE
    run_and_wait(qtbot, widget)
    labels = viewer.layers["roi labels"].data
    np.testing.assert_array_equal(labels[5], scan.array[5] > 0.5)
    assert not np.delete(labels, 5, axis=0).any()

    # a rectangle drawn on slice 5 covering rows 4..11 and columns 6..19 (data index), all slices
    corners = [
        image.data_to_world(p) for p in ((5, 3.6, 5.6), (5, 3.6, 19.4), (5, 11.4, 19.4), (5, 11.4, 5.6))
    ]
    shapes = viewer.add_shapes([np.array(corners)], shape_type="rectangle", name="box")
    widget._region.value = REGION_RECT
    widget._shapes.value = shapes
    viewer.layers.selection.active = image
    assert "spans every slice" in widget._region_info.value
    assert shapes.face_color[0][3] == 0  # drawn as an outline: the result inside stays visible
    before = viewer.layers["roi labels"].data.copy()
    run_and_wait(qtbot, widget)
    labels = viewer.layers["roi labels"].data
    inside = (slice(None), slice(4, 12), slice(6, 20))
    np.testing.assert_array_equal(labels[inside], scan.array[inside] > 0.5)
    outside = np.ones(labels.shape, bool)
    outside[inside] = False
    np.testing.assert_array_equal(labels[outside], before[outside])  # the slice run's result outside stays


def test_sample_screenshot_is_not_black(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    (layer,) = viewer.open_sample("napari-medcl", "mni152_t1")
    assert layer.data.ndim == 3 and tuple(layer.scale) == (2.0, 2.0, 2.0)
    shot = viewer.screenshot(canvas_only=True)
    assert shot.mean() > 5 and shot[..., :3].std() > 5  # a brain slice, not an empty or black canvas


def test_rgb_2d_image_with_rectangle_and_review(make_napari_viewer, qtbot, tmp_path):
    from napari_medcl._widget import REGION_RECT

    model = save(
        pointwise_model(spatial_dims=2, in_channels=3, threshold=127.5, patch=(16, 16)), tmp_path / "c.onnx"
    )
    viewer = make_napari_viewer()
    rgb = (np.random.default_rng(4).random((40, 50, 3)) * 255).astype(np.uint8)
    viewer.add_image(rgb, name="photo", rgb=True, scale=(0.5, 0.5))
    widget = make_widget(viewer, model)
    shapes = viewer.add_shapes(
        [np.array([[1.0, 1.0], [1.0, 15.0], [10.0, 15.0], [10.0, 1.0]])], shape_type="rectangle"
    )
    widget._region.value = REGION_RECT
    widget._shapes.value = shapes
    run_and_wait(qtbot, widget)
    labels = viewer.layers["photo labels"]
    assert labels.data.shape == (40, 50) and tuple(labels.scale) == (0.5, 0.5)
    inside = (slice(2, 21), slice(2, 31))  # pixels whose centres lie in the rectangle (world / 0.5)
    np.testing.assert_array_equal(labels.data[inside], rgb[inside].mean(axis=-1) > 127.5)
    outside = np.ones(labels.data.shape, bool)
    outside[inside] = False
    assert not labels.data[outside].any()
    review = widget.show_review()
    assert len(review.scores) == 1 and not review._axis.visible  # a 2D image is one slice
    assert "px²" in review._entries[0]


def test_labels_of_a_dicom_series_save_as_dicom_seg(make_napari_viewer, qtbot, tmp_path, model3d):
    from napari_medcl.io.dicom_seg import read_dicom_seg
    from tests.napari_medcl.io.test_dicom_seg import write_series

    folder = tmp_path / "ct"
    sources = write_series(folder)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(folder), plugin="napari-medcl")
    widget = make_widget(viewer, model3d)
    run_and_wait(qtbot, widget)
    labels = widget.results_of(image)["labels"]
    labels.paint((2, 3, 3), 0)  # a correction before saving
    written = widget.show_review().save_labels(tmp_path / "ct_seg.dcm")
    seg = read_dicom_seg(written, folder)
    assert seg.segment_names == ["class1"]
    np.testing.assert_array_equal(seg.labels.array, labels.data)
    assert sorted(seg.instance_uids) == sorted(ds.SOPInstanceUID for ds in sources)


def test_save_dialog_starts_beside_the_scan_or_at_home_for_the_sample(make_napari_viewer, tmp_path):
    from napari_medcl._widget import _default_save_path

    viewer = make_napari_viewer()
    (sample,) = viewer.open_sample("napari-medcl", "mni152_t1")
    labels = viewer.add_labels(np.zeros(sample.data.shape, np.uint8), metadata=dict(sample.metadata))
    assert _default_save_path(labels).parent == Path.home()  # never inside the installed package
    oblique_scan(tmp_path / "case.nii.gz")
    image = open_scan(viewer, tmp_path / "case.nii.gz")
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), metadata=dict(image.metadata))
    assert _default_save_path(labels) == tmp_path / "case_labels.nii.gz"


def test_verdict_banner_stays_with_the_result_and_warns(make_napari_viewer, qtbot, tmp_path):
    import dataclasses

    from napari_medcl.training_profile import profile_cases
    from tests.napari_medcl.test_verdict import RESCALE, head
    from tests.onnx_models import make_spec

    base = make_spec(
        spacing=(1.0, 1.0, 1.0), normalization=RESCALE, nonzero_is_foreground=True, patch=(8, 32, 32)
    )
    spec = dataclasses.replace(base, training_profile=profile_cases([head(s) for s in (1, 2, 3)], base))
    model = save(pointwise_model(spec=spec), tmp_path / "profiled.onnx")
    viewer = make_napari_viewer()
    like = head(7)
    viewer.add_image(like.array, name="like training")
    constant = np.full(like.array.shape, 80.0, np.float32)
    viewer.add_image(constant, name="constant")
    widget = make_widget(viewer, model)
    widget._image.value = viewer.layers["like training"]
    run_and_wait(qtbot, widget)
    assert widget._verdict.value.startswith("Scan check: ok") and widget._verdict.native.styleSheet() == ""
    widget._image.value = viewer.layers["constant"]
    run_and_wait(qtbot, widget)
    assert widget._verdict.value.startswith("Scan check: OUT OF DISTRIBUTION")
    assert "constant" in widget._verdict.value and "background-color" in widget._verdict.native.styleSheet()
    assert "out-of-distribution" in widget.show_review().case_report().verdict_text
    # the banner follows the chosen image: back to the first scan, its own verdict
    widget._image.value = viewer.layers["like training"]
    assert widget._verdict.value.startswith("Scan check: ok")


def test_long_verdicts_and_layer_names_do_not_widen_the_dock(make_napari_viewer, qtbot, tmp_path):
    """A caution banner (a noisy scan), a long model summary and a long layer name wrap or elide within the
    dock: its rows ask for no more width than a dock beside the canvas has, and its scroll area never gets
    narrower than its rows (there is no horizontal scroll bar, so a wider row would be clipped)."""
    import dataclasses

    from qtpy.QtWidgets import QScrollArea

    from napari_medcl.training_profile import profile_cases
    from tests.napari_medcl.test_verdict import RESCALE, head
    from tests.onnx_models import make_spec

    base = make_spec(
        spacing=(1.0, 1.0, 1.0), normalization=RESCALE, nonzero_is_foreground=True, patch=(8, 32, 32)
    )
    spec = dataclasses.replace(base, training_profile=profile_cases([head(s) for s in (1, 2, 3)], base))
    model = save(pointwise_model(spec=spec), tmp_path / "profiled.onnx")
    viewer = make_napari_viewer(show=True)  # sizes are only laid out in a shown window
    viewer.window.resize(1600, 1000)
    name = "sub-0001_ses-baseline_acq-mprage_run-02_desc-preprocessed_T1w_" * 2
    viewer.add_image(head(8, noise=14.0).array, name=name)
    widget = make_widget(viewer, model)
    widget._image.value = viewer.layers[name]
    run_and_wait(qtbot, widget)
    assert widget._verdict.value.startswith("Scan check: CAUTION. noisier than the training images")
    assert len(widget._verdict.value) > 200
    (scroll,) = [s for s in widget.native.findChildren(QScrollArea) if s.widget() is not None][:1]
    body = scroll.widget()
    qtbot.wait(50)  # the layout settles in the shown window
    assert body.minimumSizeHint().width() < 450
    assert body.width() <= scroll.viewport().width()  # nothing clipped on the right
    assert scroll.minimumSizeHint().width() >= body.minimumSizeHint().width()
    review = widget.show_review()
    assert review._uncertainty.native.minimumSizeHint().width() < 300
    from qtpy.QtCore import QEvent, QPoint
    from qtpy.QtGui import QHelpEvent
    from qtpy.QtWidgets import QApplication

    combo = widget._image.native
    QApplication.sendEvent(
        combo, QHelpEvent(QEvent.Type.ToolTip, QPoint(5, 5), combo.mapToGlobal(QPoint(5, 5)))
    )
    assert combo.toolTip() == name  # the whole name on hover
