"""segment_layer and the layer <-> Volume conversions: pure, no Qt, no viewer."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_medcl._reader import get_reader
from napari_medcl.errors import Cancelled, InputError
from napari_medcl.io import read_image, write_image
from napari_medcl.layer_data import (
    GEOMETRY_KEY,
    PREDICTION_KEY,
    ObliqueGeometryWarning,
    image_layer_data,
    segment_layer,
    volume_from_layer,
)
from napari_medcl.region import plan_region
from napari_medcl.volume import Volume
from tests.onnx_models import make_spec, pointwise_model, save

SPACING = (3.0, 0.8, 0.9)
ORIGIN = (10.0, -20.0, 30.0)


def oblique_direction(degrees: float = 20.0) -> np.ndarray:
    """A rotation about the first (z) axis: rows/columns in array order (z, y, x)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def write_scan(path: Path, shape=(6, 20, 24), seed: int = 0, direction: np.ndarray | None = None) -> Volume:
    """An anisotropic, oblique float32 scan with values in [0, 1); returns the Volume written."""
    rng = np.random.default_rng(seed)
    volume = Volume(
        array=rng.random(shape, dtype=np.float32),
        spacing=SPACING,
        origin=ORIGIN,
        direction=oblique_direction() if direction is None else direction,
    )
    write_image(volume, path)
    return volume


def read_layer(path: Path):
    reader = get_reader(str(path))
    assert reader is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ObliqueGeometryWarning)
        (layer,) = reader(str(path))
    return layer


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "case1.nii.gz"
    volume = write_scan(path)
    return path, volume, read_layer(path)


@pytest.fixture(scope="module")
def model3d(tmp_path_factory):
    return save(pointwise_model(spatial_dims=3, patch=(4, 8, 8)), tmp_path_factory.mktemp("m") / "m3.onnx")


def test_reader_layer_carries_geometry_and_warns_about_obliqueness(scan):
    path, written, _ = scan
    with pytest.warns(ObliqueGeometryWarning, match="case1.nii.gz: oblique"):
        ((data, kwargs, layer_type),) = get_reader(str(path))(str(path))
    assert layer_type == "image" and data.shape == (6, 20, 24)
    assert kwargs["name"] == "case1"
    np.testing.assert_allclose(kwargs["scale"], SPACING, rtol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], ORIGIN, atol=1e-4)
    assert kwargs["units"] == ("mm", "mm", "mm") and kwargs["axis_labels"] == ("z", "y", "x")
    geometry = kwargs["metadata"][GEOMETRY_KEY]
    np.testing.assert_allclose(geometry["direction"], oblique_direction(), atol=1e-5)
    assert geometry["oblique"] and geometry["format"] == "nifti" and geometry["source"] == str(path)
    assert volume_from_layer((data, kwargs, layer_type)).same_geometry(read_image(path))


def test_axis_aligned_scan_gives_no_notice(tmp_path):
    path = tmp_path / "flipped.nrrd"
    write_scan(path, direction=np.diag([1.0, -1.0, 1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ObliqueGeometryWarning)
        get_reader(str(path))(str(path))


def test_segment_layer_outputs(scan, model3d):
    path, written, layer = scan
    out = segment_layer(layer, model3d)
    names = [kwargs["name"] for _, kwargs, _ in out]
    assert names == [
        "case1 labels",
        "case1 UAFR uncertainty",
        "case1 entropy",
        "case1 error likelihood (uncalibrated)",
    ]
    (labels, lkw, ltype), (uafr, ukw, utype), (entropy, ekw, etype), (error, errkw, _) = out
    # the model's own probability that the label is wrong: 1 - max(p0, p1) of the pointwise model
    # the error likelihood is the map shown; the UAFR map is hidden (it can rank mistakes below right labels)
    assert errkw.get("visible", True) and ukw["visible"] is False and error.shape == labels.shape
    assert error.min() >= 0.0 and error.max() <= 0.5
    assert (ltype, utype, etype) == ("labels", "image", "image")
    # the pointwise model labels exactly the voxels above 0.5
    np.testing.assert_array_equal(labels, (written.array > 0.5).astype(np.uint8))
    assert labels.dtype == np.uint8 and uafr.dtype == np.float32 and uafr.shape == labels.shape
    assert uafr.min() >= 0.0 and uafr.max() <= 1.0 and entropy.min() >= 0.0 and entropy.max() <= 1.0

    from napari.utils.colormaps import DirectLabelColormap

    spec = make_spec(spatial_dims=3, patch=(4, 8, 8))
    assert isinstance(lkw["colormap"], DirectLabelColormap)
    np.testing.assert_allclose(
        lkw["colormap"].map(np.array([1]))[0][:3], _rgb(spec.classes[1].color), atol=1e-6
    )
    assert lkw["colormap"].map(np.array([0]))[0][3] == 0  # background transparent
    assert lkw["features"] == {"index": [0, 1], "name": ["background", "class1"]}
    # low uncertainty is transparent and the map is blended translucently: it cannot wash out bright tissue
    assert ukw["colormap"]["colors"][0][3] == 0.0 and ukw["colormap"]["colors"][-1][3] == 1.0
    assert ukw["contrast_limits"] == (0.0, 1.0) and ukw["blending"] == "translucent"
    assert (
        ekw["visible"] is False
        and ekw["colormap"] == ukw["colormap"]
        and ekw["contrast_limits"] == (0.0, 1.0)
    )
    assert lkw["opacity"] <= 0.5  # the anatomy shows through the labels
    for kwargs in (lkw, ukw, ekw):
        assert kwargs["scale"] == layer[1]["scale"] and kwargs["translate"] == layer[1]["translate"]
        assert kwargs["units"] == ("mm",) * 3 and kwargs["axis_labels"] == ("z", "y", "x")
        provenance = kwargs["metadata"][PREDICTION_KEY]
        assert provenance["model"]["sha256"] and provenance["execution_provider"].startswith(
            ("CPUExecutionProvider", "OpenVINO CPU")
        )
        assert "research" in provenance["intended_use"]
    # the labels rebuild the source geometry exactly, oblique direction included
    assert volume_from_layer((labels, lkw, "labels")).same_geometry(read_image(path))


def test_segment_layer_accepts_a_napari_layer(scan, model3d):
    from napari.layers import Image

    _, written, (data, kwargs, _) = scan
    layer = Image(data, **{k: v for k, v in kwargs.items() if k != "rgb"})
    out = segment_layer(layer, model3d, uncertainty_maps=True)
    assert [k["name"] for _, k, _ in out][-2:] == ["case1 UAFR encoder1", "case1 UAFR decoder1"]
    np.testing.assert_array_equal(out[0][0], written.array > 0.5)


def test_progress_callback_and_cancel(scan, model3d):
    _, _, layer = scan
    events = []
    segment_layer(layer, model3d, progress=events.append)
    infer = [e for e in events if e.stage == "infer"]
    assert infer and infer[-1].done == infer[-1].total > 1
    event = threading.Event()

    def cancel_after_first_window(progress):
        if progress.stage == "infer":
            event.set()

    with pytest.raises(Cancelled):
        segment_layer(layer, model3d, progress=cancel_after_first_window, cancel=event)


def test_roi_box_touches_only_the_roi(scan, model3d):
    _, written, layer = scan
    full = segment_layer(layer, model3d)
    box = ((1, 4), (3, 15), (5, 20))
    part = segment_layer(layer, model3d, roi=box)
    inside = tuple(slice(a, b) for a, b in box)
    outside = np.ones(written.array.shape, bool)
    outside[inside] = False
    for (f, _, _), (p, pkw, _) in zip(full, part):
        assert f.shape == p.shape and not p[outside].any()
        # labels are exact; maps may differ in the last float bit (other windows, other stitching sums)
        np.testing.assert_allclose(p[inside], f[inside], rtol=0, atol=1e-5)
        assert pkw["metadata"][PREDICTION_KEY]["roi"] == [list(b) for b in box]


def test_roi_current_slice(scan, model3d):
    _, written, layer = scan
    full = segment_layer(layer, model3d)[0][0]
    part = segment_layer(layer, model3d, roi=("slice", 1, 7))[0][0]
    np.testing.assert_array_equal(part[:, 7], full[:, 7])
    assert not np.delete(part, 7, axis=1).any()


def test_roi_for_a_3d_model_gives_the_slice_its_context():
    volume = Volume(
        np.zeros((40, 8, 8), np.float32), spacing=(2.0, 1.0, 1.0), origin=(0, 0, 0), direction=np.eye(3)
    )
    plan = plan_region(("slice", 0, 20), volume, model_dims=3, context_mm=16.0)  # 16 mm = 8 slices
    assert plan.paste[0] == slice(20, 21)
    assert (
        plan.compute[0].stop - plan.compute[0].start == 7
        and plan.compute[0].start <= 20 < plan.compute[0].stop
    )
    assert plan.inner[0] == slice(20 - plan.compute[0].start, 21 - plan.compute[0].start)
    # a 2D model needs only the slice itself; at the border the slab is clipped
    assert plan_region(("slice", 0, 20), volume, model_dims=2, context_mm=16.0).compute[0] == slice(20, 21)
    assert plan_region(("slice", 0, 0), volume, model_dims=3, context_mm=16.0).compute[0] == slice(0, 4)


def test_roi_is_proportionally_faster(tmp_path):
    """Full volume vs an ROI of 1/8 of it (printed, not asserted: timings depend on the machine)."""
    model = save(pointwise_model(spatial_dims=3, patch=(16, 16, 16)), tmp_path / "m.onnx")
    volume = Volume(
        np.random.default_rng(1).random((64, 96, 96), dtype=np.float32), SPACING, ORIGIN, np.eye(3)
    )
    layer = image_layer_data(volume, name="big")
    from napari_medcl.onnx_session import load_model

    loaded = load_model(model, device="cpu")
    segment_layer(layer, loaded)  # warm-up
    timings = {}
    for label, roi in (("full", None), ("roi", ((0, 32), (0, 48), (0, 48)))):
        start = time.perf_counter()
        out = segment_layer(layer, loaded, roi=roi)
        timings[label] = time.perf_counter() - start
    assert not out[0][0][32:].any()
    print(
        f"\nsegment_layer 64x96x96: full {timings['full']:.3f} s, ROI (1/8 of the voxels) {timings['roi']:.3f} s, "
        f"ratio {timings['full'] / timings['roi']:.1f}x"
    )


def test_2d_and_rgb_images(tmp_path):
    gray = np.random.default_rng(2).random((30, 40), dtype=np.float32)
    model2d = save(pointwise_model(spatial_dims=2, patch=(16, 16)), tmp_path / "m2.onnx")
    out = segment_layer((gray, {"name": "slide", "scale": (0.5, 0.25)}, "image"), model2d)
    assert out[0][0].shape == (30, 40) and out[0][1]["scale"] == (0.5, 0.25)
    np.testing.assert_array_equal(out[0][0], gray > 0.5)
    assert out[0][1]["axis_labels"] == ("y", "x")

    rgb = (np.random.default_rng(3).random((30, 40, 3)) * 255).astype(np.uint8)
    model_rgb = save(
        pointwise_model(spatial_dims=2, in_channels=3, threshold=127.5, patch=(16, 16)), tmp_path / "c.onnx"
    )
    out = segment_layer((rgb, {"name": "photo", "rgb": True}, "image"), model_rgb, roi=((0, 10), (0, 40)))
    assert out[0][0].shape == (30, 40) and not out[0][0][10:].any()
    np.testing.assert_array_equal(out[0][0][:10], rgb[:10].mean(axis=-1) > 127.5)


def test_3d_model_on_a_2d_image_is_a_clear_error(tmp_path, model3d):
    with pytest.raises(InputError, match="2D image"):
        segment_layer((np.zeros((20, 20), np.float32), {"name": "flat"}, "image"), model3d)


def test_volume_from_layer_falls_back_to_scale_and_translate(scan):
    _, _, (data, kwargs, layer_type) = scan
    edited = dict(kwargs, scale=(1.0, 1.0, 1.0))  # a user changed the scale by hand: metadata no longer holds
    volume = volume_from_layer((data, edited, layer_type))
    assert volume.spacing == (1.0, 1.0, 1.0) and np.array_equal(volume.direction, np.eye(3))
    bare = volume_from_layer(
        (data, {"scale": (2, 3), "translate": (5, 6)}, "image")
    )  # napari pads leading axes
    assert bare.spacing == (1.0, 2.0, 3.0) and bare.origin == (0.0, 5.0, 6.0)
    with pytest.raises(ValueError, match="2D or 3D"):
        volume_from_layer((np.zeros((2, 3, 4, 5)), {"name": "4d"}, "image"))


@pytest.mark.parametrize(
    ("roi", "message"),
    [
        (("slice", 3, 0), "axis 3"),
        (("slice", 0, 6), "outside"),
        (((0, 2), (5, 5), (0, 3)), "empty"),
        (((0, 2), (0, 3)), "3 \\(start, stop\\) pairs"),
    ],
)
def test_plan_region_errors(roi, message):
    volume = Volume(np.zeros((6, 20, 24)), (1, 1, 1), (0, 0, 0), np.eye(3))
    with pytest.raises(ValueError, match=message):
        plan_region(roi, volume)


def _rgb(color: str) -> tuple[float, float, float]:
    return tuple(int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))


def test_a_region_inside_a_masked_scan_keeps_the_nonzero_rule(tmp_path):
    """A nonzero_is_foreground model on a box inside the anatomy: the box has no zero voxel, but the scan does,
    so the rule applies (no warning) and the box's labels are the whole image's."""
    from tests.onnx_models import nearest_class_model

    rng = np.random.default_rng(5)
    image = np.zeros((6, 16, 16), np.float32)
    image[:, 2:14, 2:14] = rng.choice(np.array([0.2, 1.0, 1.8], np.float32), size=(6, 12, 12))
    model = save(
        nearest_class_model(3, nonzero_is_foreground=True, patch=(4, 8, 8), maps=()), tmp_path / "rule.onnx"
    )
    layer = (image, {"name": "scan"}, "image")
    full = segment_layer(layer, str(model))[0][0]
    box = ((1, 5), (4, 12), (4, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the box alone has no zero voxel: no "not masked" warning
        part = segment_layer(layer, str(model), roi=box)[0][0]
    inside = tuple(slice(a, b) for a, b in box)
    np.testing.assert_array_equal(part[inside], full[inside])
    assert (full[image != 0] != 0).all() and (image[inside] == np.float32(0.2)).any()
