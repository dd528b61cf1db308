"""The widget's "Where to run" choice in a real viewer (Xvfb): a server run gives the labels of a local run,
uploads the image once for several runs, and the choice is remembered."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medcl.io import write_image
from napari_medcl.server_connection import SERVER, THIS_COMPUTER, load_saved_server
from napari_medcl.volume import Volume
from tests.medcl_server import running_server
from tests.onnx_models import pointwise_model, save

pytestmark = [pytest.mark.gui, pytest.mark.slow]
pytest.importorskip("fastapi")

TOKEN = "gui-token-0123456789abcdefghijkl"
WAIT_MS = 60_000


def test_a_server_run_matches_a_local_run_and_the_choice_is_remembered(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    models = tmp_path / "models"
    models.mkdir()
    model_file = save(pointwise_model(spatial_dims=3, patch=(4, 8, 8)), models / "m3.onnx")
    x = np.random.default_rng(0).random((6, 20, 18)).astype(np.float32)
    write_image(Volume(x, (3.0, 0.75, 0.8), (5.0, -10.0, 20.0), np.eye(3)), tmp_path / "case.nii.gz")
    args = ("--models", str(models), "--device", "cpu")

    with running_server(*args, token=TOKEN, token_dir=tmp_path) as server:
        viewer = make_napari_viewer()
        (image,) = viewer.open(str(tmp_path / "case.nii.gz"), plugin="napari-medcl")
        _, widget = viewer.window.add_plugin_dock_widget("napari-medcl", "Segment with uncertainty")
        assert widget._where._where.value == THIS_COMPUTER  # nothing leaves the computer by default
        widget.add_model_file(model_file)
        _run(qtbot, widget)
        local = np.array(widget.results_of(image)["labels"].data)
        assert local.any() and not local.all()

        widget._where._where.value = SERVER
        assert not widget._device.visible and not widget._backend.visible
        widget._where._url.value, widget._where._token.value = server.url, TOKEN
        assert widget._where.connect() == ["m3"]
        widget._model.value = "m3"  # the server's name for it, now in the picker
        widget._keep.value = True  # new layers: both runs' labels stay side by side
        _run(qtbot, widget)
        assert "Done" in widget._status.value, widget._status.value
        remote_labels = widget.last_layers[0]
        np.testing.assert_array_equal(np.asarray(remote_labels.data), local)
        _run(qtbot, widget)  # again: the image is not uploaded a second time
        assert widget._loaded[1].session_for(widget._job.volume).uploads == 1

        server.process.kill()  # the server dies: one line under Run, and no layer changes
        server.process.wait(timeout=10)
        before = [np.array(layer.data, copy=True) for layer in viewer.layers]
        _run(qtbot, widget)
        assert "cannot reach the server" in widget._status.value and "\n" not in widget._status.value
        for layer, data in zip(viewer.layers, before, strict=True):
            np.testing.assert_array_equal(np.asarray(layer.data), data)

    saved = load_saved_server()
    assert (saved.where, saved.url, saved.token) == (SERVER, server.url, TOKEN)


def _run(qtbot, widget) -> None:
    widget._run.changed.emit(True)
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
