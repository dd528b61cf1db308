"""predict_iter / predict: exact oracles with pointwise models, resampling, 2D/3D, cancel, TTA, errors."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from napari_medcl.errors import Cancelled, InputError, InputWarning, PredictionError
from napari_medcl.onnx_session import load_model
from napari_medcl.prediction import Progress, predict, predict_iter
from napari_medcl.preprocess import grid_coordinates, normalize, resample_linear, resampled_shape
from napari_medcl.volume import Prediction, Volume
from tests.onnx_models import conv_model, make_spec, nearest_class_model, pointwise_model, save

OBLIQUE = np.array([[0.0, 0.6, 0.8], [0.0, 0.8, -0.6], [1.0, 0.0, 0.0]])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _volume(array, spacing=None, origin=None, direction=None, **kwargs):
    n = np.asarray(array).ndim - (1 if kwargs.get("channel_axis") else 0)
    return Volume(
        np.asarray(array),
        spacing or (1.0,) * n,
        origin or (0.0,) * n,
        np.eye(n) if direction is None else direction,
        **kwargs,
    )


def _away_from(threshold, shape, seed=0, margin=0.02):
    """Random values in [0, 1] at least ``margin`` away from ``threshold`` (so argmax ties cannot occur)."""
    x = np.random.default_rng(seed).random(shape).astype(np.float32)
    close = np.abs(x - threshold) < margin
    x[close] += np.float32(2 * margin)
    return x


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")

    def load(name, model):
        return load_model(save(model, folder / f"{name}.onnx"), device="cpu")

    return {
        "3d": load("3d", pointwise_model(patch=(8, 8, 8))),
        "2d": load("2d", pointwise_model(spatial_dims=2, patch=(16, 16), maps=())),
        "3d-spacing": load("3d-spacing", pointwise_model(patch=(8, 8, 8), spacing=(1.0, 1.0, 1.0))),
        "2d-spacing": load("2d-spacing", pointwise_model(spatial_dims=2, patch=(16, 16), spacing=(0.5, 0.5))),
        "nan": load("nan", pointwise_model(produce_nan=True, name="nan-model")),
        "conv": load("conv", conv_model(patch=(7, 9, 8))),
        "rgb": load("rgb", pointwise_model(spatial_dims=2, in_channels=3, patch=(16, 16), maps=())),
    }


@pytest.mark.parametrize("shape", [(13, 17, 11), (8, 8, 8), (20, 9, 31)])
@pytest.mark.parametrize(("overlap", "batch_size"), [(0.5, 1), (0.25, 3), (0.0, 2)])
def test_pointwise_oracle_3d(models, shape, overlap, batch_size):
    image = _away_from(0.5, shape)
    volume = _volume(image, spacing=(2.5, 0.7, 0.9), origin=(-3.0, 4.0, 10.0), direction=OBLIQUE)
    prediction = predict(volume, models["3d"], overlap=overlap, batch_size=batch_size)
    assert isinstance(prediction, Prediction)
    labels = prediction.labels
    assert labels.array.dtype == np.uint8
    np.testing.assert_array_equal(labels.array, image > 0.5)
    for output in (
        labels,
        prediction.entropy,
        prediction.top_class_error,
        prediction.uafr_uncertainty,
        *prediction.uncertainty_maps.values(),
    ):
        assert output.same_geometry(volume, atol=0)
        assert output.array.shape == shape
    shifted = image.astype(np.float64) - 0.5
    np.testing.assert_allclose(prediction.uncertainty_maps["encoder1"].array, _sigmoid(shifted), atol=1e-5)
    np.testing.assert_allclose(prediction.uncertainty_maps["decoder1"].array, _sigmoid(-shifted), atol=1e-5)
    # The summary map is the block nearest the output (the last listed), not a mean that would be 0.5 here.
    np.testing.assert_allclose(prediction.uafr_uncertainty.array, _sigmoid(-shifted), atol=1e-5)
    p = _sigmoid(50 * shifted)
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p)) / math.log(2)
    np.testing.assert_allclose(prediction.entropy.array, entropy, atol=1e-5)
    top_error = prediction.top_class_error.array
    assert top_error.dtype == np.float32
    np.testing.assert_allclose(top_error, 1 - np.maximum(p, 1 - p), atol=1e-5)
    assert top_error.max() > 0.1  # the margin of 0.02 leaves errors up to sigmoid(-1): a test that can fail
    assert prediction.probabilities is None


def test_pointwise_oracle_2d_image(models):
    image = _away_from(0.5, (37, 50))
    volume = _volume(image, spacing=(0.3, 0.4), origin=(5.0, -2.0))
    prediction = predict(volume, models["2d"])
    np.testing.assert_array_equal(prediction.labels.array, image > 0.5)
    assert prediction.labels.same_geometry(volume, atol=0)
    assert prediction.top_class_error.same_geometry(volume, atol=0)
    p = _sigmoid(50 * (image.astype(np.float64) - 0.5))
    np.testing.assert_allclose(prediction.top_class_error.array, 1 - np.maximum(p, 1 - p), atol=1e-5)
    assert prediction.uafr_uncertainty is None and prediction.uncertainty_maps == {}
    assert prediction.provenance["tiling"]["window"] == [16, 16]


def test_2d_model_over_3d_volume_runs_slice_by_slice(models):
    image = _away_from(0.5, (5, 20, 18))
    volume = _volume(image, spacing=(3.0, 0.5, 0.5))
    prediction = predict(volume, models["2d"])
    np.testing.assert_array_equal(prediction.labels.array, image > 0.5)
    assert prediction.labels.array.shape == (5, 20, 18)
    tiling = prediction.provenance["tiling"]
    assert tiling["windows"] == 5 * 2 * 2  # every slice: 2 x 2 windows of 16 x 16
    assert tiling["window"] == [16, 16]


@pytest.mark.parametrize("shape", [(3, 5, 4), (1, 20, 20), (1, 1, 1), (1, 9, 30)])
def test_smaller_than_patch_and_single_slice(models, shape):
    image = _away_from(0.5, shape, seed=3)
    volume = _volume(image, spacing=(4.0, 1.0, 1.0))
    prediction = predict(volume, models["3d"])
    np.testing.assert_array_equal(prediction.labels.array, image > 0.5)
    assert prediction.labels.same_geometry(volume, atol=0)


def _blob(shape, spacing, centre_mm, sigma_mm):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre_mm))
    return np.exp(-r2 / (2 * sigma_mm**2)).astype(np.float32)


def test_resampled_input_gives_labels_on_the_input_grid(models):
    spacing = (2.0, 0.8, 1.3)
    shape = (11, 30, 19)
    image = _blob(shape, spacing, centre_mm=(10.0, 12.0, 12.0), sigma_mm=6.0)
    volume = _volume(image, spacing=spacing, origin=(7.0, -1.0, 3.0), direction=OBLIQUE)
    prediction = predict(volume, models["3d-spacing"], return_probabilities=True)
    assert prediction.provenance["preprocessing"]["resampled"] is True
    assert prediction.provenance["preprocessing"]["model_grid_shape"] == [22, 24, 25]
    for output in (
        prediction.labels,
        prediction.entropy,
        prediction.uafr_uncertainty,
        prediction.probabilities,
    ):
        assert output.same_geometry(volume, atol=0)
    labels = prediction.labels.array
    clear = np.abs(image - 0.5) > 0.15  # away from the boundary, where resampling cannot move the decision
    assert clear.sum() > 0.8 * image.size and (image[clear] > 0.5).any()
    np.testing.assert_array_equal(labels[clear], (image > 0.5)[clear])
    probs = prediction.probabilities.array
    assert probs.shape == (2, *shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, probs.argmax(0))
    assert prediction.entropy.array.min() >= 0.0 and prediction.entropy.array.max() <= 1.0


@pytest.mark.parametrize("name", ["3d-spacing", "2d-spacing"])
def test_resampled_top_class_error_is_one_minus_the_chosen_probability(models, name):
    """On the resampled path the argmax runs on the input grid after resampling the probabilities back; the
    top-class error comes from the same planes, and does not need the probabilities kept."""
    dims = 3 if name == "3d-spacing" else 2
    spacing = (2.0, 0.8, 1.3)[-dims:]
    shape = (11, 30, 19)[-dims:]
    image = _blob(shape, spacing, centre_mm=(10.0, 12.0, 12.0)[-dims:], sigma_mm=6.0)
    volume = _volume(image, spacing=spacing)
    kept = predict(volume, models[name], return_probabilities=True)
    assert kept.provenance["preprocessing"]["resampled"] is True
    probs = kept.probabilities.array
    top_error = kept.top_class_error.array
    assert top_error.shape == shape and top_error.dtype == np.float32
    assert kept.top_class_error.same_geometry(volume, atol=0)
    np.testing.assert_allclose(top_error, 1 - probs.max(0), atol=1e-6)
    assert top_error.max() > 0.1 and top_error.min() >= 0 and top_error.max() <= 0.5
    # Far from the boundary the error is near the model's own formula on the image value (resampling a steep
    # sigmoid linearly is not exact: the plane is interpolated between model-grid voxels).
    p = _sigmoid(50 * (image.astype(np.float64) - 0.5))
    clear = np.abs(image - 0.5) > 0.15
    np.testing.assert_allclose(top_error[clear], (1 - np.maximum(p, 1 - p))[clear], atol=0.02)
    np.testing.assert_array_equal(predict(volume, models[name]).top_class_error.array, top_error)


def test_2d_model_with_spacing_over_3d_volume_keeps_z(models):
    spacing = (5.0, 1.0, 1.0)
    image = _blob((3, 24, 20), spacing, centre_mm=(5.0, 12.0, 10.0), sigma_mm=6.0)
    volume = _volume(image, spacing=spacing)
    prediction = predict(volume, models["2d-spacing"])
    assert prediction.provenance["preprocessing"]["model_grid_shape"] == [3, 48, 40]
    clear = np.abs(image - 0.5) > 0.1
    np.testing.assert_array_equal(prediction.labels.array[clear], (image > 0.5)[clear])


def test_progress_events_and_the_prediction_last(models):
    image = _away_from(0.5, (10, 10, 10))
    items = list(predict_iter(_volume(image), models["3d"]))
    assert isinstance(items[-1], Prediction)
    events = items[:-1]
    assert all(isinstance(e, Progress) for e in events)
    assert [e.stage for e in events][:2] == ["preprocess", "preprocess"]
    assert events[-1].stage == "postprocess" and events[-1].done == events[-1].total
    infer = [e for e in events if e.stage == "infer"]
    n = items[-1].provenance["tiling"]["windows"]
    assert [e.done for e in infer] == list(range(1, n + 1))
    assert {e.total for e in infer} == {n}
    elapsed = [e.elapsed for e in events]
    assert elapsed == sorted(elapsed)


@pytest.mark.parametrize("use_event", [True, False])
def test_cancel_between_windows(models, use_event):
    image = _away_from(0.5, (16, 16, 16))
    event = threading.Event()
    cancel = event if use_event else event.is_set
    seen = 0
    with pytest.raises(Cancelled, match="after 3 of 27 windows"):
        for item in predict_iter(_volume(image), models["3d"], cancel=cancel):
            if isinstance(item, Progress) and item.stage == "infer":
                seen += 1
                if seen == 3:
                    event.set()
    assert seen == 3


def test_nan_output_is_a_prediction_error_naming_the_model(models):
    with pytest.raises(PredictionError, match="'nan-model'.*NaN"):
        predict(_volume(np.zeros((8, 8, 8), np.float32)), models["nan"])


def test_tta_runs_all_mirrorings(models):
    image = _away_from(0.5, (9, 12, 10))
    prediction = predict(_volume(image), models["3d"], tta=True)
    np.testing.assert_array_equal(prediction.labels.array, image > 0.5)
    tiling = prediction.provenance["tiling"]
    assert tiling["tta"] is True and tiling["forward_passes"] == 8 * tiling["windows"]
    p = _sigmoid(50 * (image.astype(np.float64) - 0.5))  # mirroring leaves a pointwise model's output as is
    np.testing.assert_allclose(prediction.top_class_error.array, 1 - np.maximum(p, 1 - p), atol=1e-5)
    conv_plain = predict(_volume(image), models["conv"], return_probabilities=True)
    conv_tta = predict(_volume(image), models["conv"], tta=True, return_probabilities=True)
    np.testing.assert_allclose(conv_tta.probabilities.array.sum(0), 1.0, atol=1e-5)
    assert not np.allclose(conv_tta.probabilities.array, conv_plain.probabilities.array)
    # The error is that of the mirrored mean, like the entropy, not of one pass.
    np.testing.assert_allclose(
        conv_tta.top_class_error.array, 1 - conv_tta.probabilities.array.max(0), atol=1e-6
    )
    assert not np.allclose(conv_tta.top_class_error.array, conv_plain.top_class_error.array)


def test_conv_model_with_divisor_padding_matches_a_direct_run(models):
    # window = patch (7, 9, 8) rounded up to the divisor 2 -> (8, 10, 8); an image of that size is one window.
    model = models["conv"]
    image = np.random.default_rng(5).normal(size=(8, 10, 8)).astype(np.float32)
    prediction = predict(_volume(image), model, return_probabilities=True)
    assert prediction.provenance["tiling"]["window"] == [8, 10, 8]
    probs, maps = model.run(image[None, None])
    np.testing.assert_allclose(prediction.probabilities.array, probs[0], atol=1e-6)
    np.testing.assert_allclose(prediction.uafr_uncertainty.array, maps[0, 0], atol=1e-6)
    # odd sizes that are not multiples of the divisor are padded, not fed as is
    odd = predict(_volume(np.random.default_rng(6).normal(size=(11, 13, 9)).astype(np.float32)), model)
    assert odd.labels.array.shape == (11, 13, 9)


def test_many_classes_give_uint16_labels(tmp_path):
    model = load_model(
        save(nearest_class_model(300, maps=(), patch=(4, 4, 4)), tmp_path / "m.onnx"), device="cpu"
    )
    values = np.random.default_rng(2).integers(0, 300, size=(4, 5, 6)).astype(np.float32) + 0.2
    prediction = predict(_volume(values), model)
    assert prediction.labels.array.dtype == np.uint16
    np.testing.assert_array_equal(prediction.labels.array, np.round(values))


def test_input_checks(models):
    with pytest.raises(InputError, match="has 1 channel\\(s\\) but model 'test-model' expects 3"):
        predict(_volume(np.zeros((8, 8), np.float32)), models["rgb"])
    with pytest.raises(InputError, match="is a 2D image but model 'test-model' is a 3D model"):
        predict(_volume(np.zeros((8, 8), np.float32)), models["3d"])
    nan_image = np.zeros((8, 8, 8), np.float32)
    nan_image[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        predict(_volume(nan_image), models["3d"])
    with pytest.raises(ValueError, match="overlap"):
        predict(_volume(np.zeros((8, 8, 8), np.float32)), models["3d"], overlap=1.0)


def test_rgb_image_with_a_three_channel_model(models):
    rgb = np.stack([_away_from(0.5, (20, 24), seed=s) for s in range(3)])
    prediction = predict(_volume(rgb, channel_axis=True), models["rgb"])
    np.testing.assert_array_equal(prediction.labels.array, rgb.mean(0) > 0.5)
    assert prediction.labels.array.shape == (20, 24) and not prediction.labels.channel_axis


def test_provenance(models):
    prediction = predict(_volume(_away_from(0.5, (9, 9, 9))), models["3d"])
    p = prediction.provenance
    assert p["execution_provider"].startswith(("CPUExecutionProvider", "OpenVINO CPU"))  # backend auto
    assert p["model"]["name"] == "test-model" and len(p["model"]["sha256"]) == 64
    assert set(p["timings"]) >= {"read", "preprocess", "inference", "ort_seconds", "postprocess", "total"}
    assert 0 < p["timings"]["ort_seconds"] <= p["timings"]["inference"] <= p["timings"]["total"]
    stages = ("read", "load_model", "preprocess", "verdict", "inference", "postprocess", "error_map")
    # no stage counted twice; each timing is rounded to 0.1 ms, so the sum may pass the total by that per stage
    assert sum(p["timings"].get(s, 0.0) for s in stages) <= p["timings"]["total"] + 1e-4 * len(stages)
    assert 0 < p["timings"]["stitch_seconds"] <= p["timings"]["inference"]
    assert 0 <= p["timings"]["wait_seconds"] <= p["timings"]["inference"]
    assert p["tiling"]["batch_size"] == 1  # the default on a CPU
    assert p["tiling"]["patch"] == [8, 8, 8] and p["tiling"]["overlap"] == 0.5
    assert p["input"]["geometry"]["shape"] == [9, 9, 9]
    assert p["intended_use"]


def test_predict_from_a_path_and_a_model_path(tmp_path):
    import SimpleITK as sitk

    image = _away_from(0.5, (6, 9, 7))
    itk = sitk.GetImageFromArray(image)
    itk.SetSpacing((0.5, 0.6, 2.0))
    sitk.WriteImage(itk, str(tmp_path / "case.nii.gz"))
    model_path = save(pointwise_model(patch=(8, 8, 8)), tmp_path / "m.onnx")
    prediction = predict(tmp_path / "case.nii.gz", model_path, device="cpu")
    np.testing.assert_array_equal(prediction.labels.array, image > 0.5)
    assert prediction.labels.spacing == pytest.approx((2.0, 0.6, 0.5))
    assert prediction.provenance["input"]["path"] == str(tmp_path / "case.nii.gz")


# -- preprocessing ------------------------------------------------------------------------------------------


def test_zscore_whole_image_and_nonzero_mask():
    x = np.zeros((1, 4, 5, 6), np.float32)
    x[0, 1:3, 1:4, 1:5] = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 10
    whole = normalize(x, {"kind": "zscore"})
    assert whole.dtype == np.float32
    assert abs(whole.mean()) < 1e-5 and abs(whole.std() - 1) < 1e-5
    masked = normalize(x, {"kind": "zscore", "use_nonzero_mask": True})
    inside = x[0] != 0
    assert abs(masked[0][inside].mean()) < 1e-5 and abs(masked[0][inside].std() - 1) < 1e-5
    assert (masked[0][~inside] == 0).all()
    assert (normalize(np.full((1, 3, 3), 7.0), {"kind": "zscore"}) == 0).all()  # constant: std floored


def test_ct_percentile_and_none():
    x = np.array([[-2000.0, -500.0, 0.0, 40.0, 3000.0]], np.float32)
    ct = normalize(x, {"kind": "ct", "clip_low": -1000, "clip_high": 1000, "mean": 0.0, "std": 500.0})
    np.testing.assert_allclose(ct[0], [-2.0, -1.0, 0.0, 0.08, 2.0], rtol=1e-6)
    y = np.arange(101, dtype=np.float32)[None]
    pct = normalize(y, {"kind": "percentile", "low": 10, "high": 90})
    clipped = np.clip(np.arange(101.0), 10, 90)
    np.testing.assert_allclose(pct[0], (clipped - clipped.mean()) / clipped.std(), rtol=1e-5, atol=1e-6)
    none = normalize(x, {"kind": "none"})
    np.testing.assert_array_equal(none, x)
    assert none is not x


def test_rescale_maps_percentiles_to_0_and_1_without_clipping():
    y = np.arange(101, dtype=np.float32)[None]
    out = normalize(y, {"kind": "rescale", "low": 10, "high": 90})
    np.testing.assert_allclose(out[0], (np.arange(101.0) - 10) / 80, rtol=1e-6, atol=1e-6)
    # Statistics from the non-zero voxels only; the mapping still applies everywhere.
    z = np.concatenate([np.zeros(100, np.float32), np.linspace(1, 2, 101, dtype=np.float32)])[None]
    masked = normalize(z, {"kind": "rescale", "low": 0, "high": 100, "use_nonzero_mask": True})
    np.testing.assert_allclose(masked[0, 100:], np.linspace(0, 1, 101), atol=1e-6)
    assert (masked[0, :100] == 0).all()  # outside the mask: 0, the value windows are padded with
    # A field of view with another tissue mix keeps tissue intensities where a z-score moves them.
    tissue = np.repeat([0.4, 0.65, 0.84], [10, 50, 40]).astype(np.float32)
    other = np.repeat([0.4, 0.65, 0.84], [10, 20, 70]).astype(np.float32)
    spec = {"kind": "rescale", "low": 0, "high": 100}
    assert normalize(tissue[None], spec)[0, 20] == normalize(other[None], spec)[0, 15]
    assert (
        normalize(tissue[None], {"kind": "zscore"})[0, 20]
        != normalize(other[None], {"kind": "zscore"})[0, 15]
    )


def test_resampling_is_exact_for_linear_ramps_and_returns_to_the_input_grid():
    shape, spacing, target = (10, 12), (1.0, 0.5), (0.7, 1.1)
    new = resampled_shape(shape, spacing, target)
    assert new == (14, 5)
    ramp = (3 * np.arange(10)[:, None] - 2 * np.arange(12)[None, :]).astype(np.float32)[None]
    scales = tuple(t / s for s, t in zip(spacing, target))
    down = resample_linear(ramp, new, scales)
    zc, xc = (grid_coordinates(m, n, sc) for m, n, sc in zip(new, shape, scales))
    inside = (zc >= 0) & (zc <= 9)
    expected = 3 * zc[:, None] - 2 * np.clip(xc, 0, 11)[None, :]
    np.testing.assert_allclose(down[0][inside], expected[inside], atol=1e-4)
    back = resample_linear(down, shape, tuple(1 / s for s in scales))
    assert back.shape == ramp.shape and back.dtype == np.float32


@pytest.mark.parametrize(
    ("out_shape", "scales"), [((11, 6, 8), (0.6, 1.5, 0.6)), ((7, 12, 3), (1.0, 0.7, 1.8))]
)
def test_resampling_a_slab_of_rows_gives_that_slab_of_the_whole(out_shape, scales):
    x = np.random.default_rng(0).random((2, 7, 9, 5)).astype(np.float32)
    whole = resample_linear(x, out_shape, scales)
    assert whole.shape == (2, *out_shape)
    for rows in (slice(0, 1), slice(2, 5), slice(4, None), slice(0, out_shape[0])):
        slab = resample_linear(x, out_shape, scales, rows)
        np.testing.assert_allclose(slab, whole[:, rows], rtol=0, atol=1e-6)
        assert slab.dtype == np.float32 and not np.may_share_memory(slab, x)


def test_resample_identity_is_a_copy():
    x = np.random.default_rng(0).random((2, 3, 4, 5)).astype(np.float32)
    y = resample_linear(x, (3, 4, 5), (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(x, y)
    assert y is not x


def test_spec_helper_defaults():
    spec = make_spec()
    assert spec.normalization == {"kind": "none"} and spec.patch_size == (8, 8, 8)


def test_nonzero_is_foreground_rules_background_out_inside_the_mask(tmp_path):
    """A model whose training labels were background exactly where the scan was zero labels every non-zero
    voxel with its likeliest foreground class; zero voxels, entropy and probabilities are the network's."""
    rng = np.random.default_rng(3)
    image = rng.choice(np.array([0.0, 0.2, 1.0, 1.8], np.float32), size=(6, 10, 9))
    image[0] = 0  # a zero face, so the mask is not the whole image
    common = {"num_classes": 3, "patch": (4, 8, 8), "maps": ("decoder1",)}
    rule = load_model(
        save(nearest_class_model(nonzero_is_foreground=True, **common), tmp_path / "rule.onnx"), device="cpu"
    )
    plain = load_model(save(nearest_class_model(**common), tmp_path / "plain.onnx"), device="cpu")
    assert rule.spec.nonzero_is_foreground and not plain.spec.nonzero_is_foreground
    network = predict(_volume(image), plain, return_probabilities=True)
    ruled = predict(_volume(image), rule, return_probabilities=True)
    np.testing.assert_array_equal(network.labels.array, np.rint(image).astype(np.uint8))  # 0.2 -> background
    expected = np.where(image == 0, 0, np.maximum(np.rint(image), 1)).astype(np.uint8)  # 0.2 -> class 1
    np.testing.assert_array_equal(ruled.labels.array, expected)
    assert (network.labels.array[image == 0.2] == 0).all() and (image == 0.2).any()
    np.testing.assert_array_equal(ruled.entropy.array, network.entropy.array)
    np.testing.assert_array_equal(ruled.probabilities.array, network.probabilities.array)
    assert ruled.provenance["nonzero_is_foreground"] and not network.provenance["nonzero_is_foreground"]
    # Resampled to the model's spacing and back: the argmax on the input grid follows the same rule.
    spaced = {**common, "spacing": (2.0, 1.0, 1.0)}
    rule2 = load_model(save(nearest_class_model(nonzero_is_foreground=True, **spaced), tmp_path / "r2.onnx"))
    plain2 = load_model(save(nearest_class_model(**spaced), tmp_path / "p2.onnx"))
    ruled2 = predict(_volume(image), rule2)
    network2 = predict(_volume(image), plain2)
    assert ruled2.provenance["preprocessing"]["resampled"]
    assert (ruled2.labels.array[image != 0] != 0).all()
    assert (network2.labels.array[image != 0] == 0).any()
    moved = network2.labels.array != ruled2.labels.array
    assert (network2.labels.array[moved] == 0).all()  # only background voxels inside the mask changed
    # A 2D model on a 2D image (a depth-1 volume inside).
    flat = image[3]
    rule2d = load_model(
        save(nearest_class_model(nonzero_is_foreground=True, spatial_dims=2, num_classes=3, patch=(8, 8),
                                 maps=()), tmp_path / "rule2d.onnx")
    )  # fmt: skip
    labels2d = predict(_volume(flat), rule2d).labels.array
    np.testing.assert_array_equal(labels2d, expected[3])
    # No zero voxel at all (a scan not masked like the training scans): the rule would label every voxel
    # foreground, so it is not applied, and the user is told why.
    unmasked = np.where(image == 0, 0.3, image).astype(np.float32)
    with pytest.warns(InputWarning, match="no voxel is zero"):
        kept = predict(_volume(unmasked), rule)
    np.testing.assert_array_equal(kept.labels.array, np.rint(unmasked).astype(np.uint8))
    assert not kept.provenance["nonzero_is_foreground"]
    # A caller that passes a part of a masked scan says so; one that knows a scan is unmasked says that.
    part = predict(_volume(unmasked), rule, scan_is_masked=True)
    np.testing.assert_array_equal(part.labels.array, np.maximum(np.rint(unmasked), 1).astype(np.uint8))
    with pytest.warns(InputWarning, match="the scan is not masked"):
        assert not predict(_volume(image), rule, scan_is_masked=False).provenance["nonzero_is_foreground"]


def test_a_nonzero_mask_model_runs_on_the_nonzero_box_and_outside_is_background(tmp_path):
    """A model normalised over the non-zero mask was trained on crops to that box (crop_nonzero): inference
    crops the same way, and every voxel outside the mask (outside the box, or zero inside it) is background."""
    image = np.zeros((10, 14, 12), np.float32)
    image[3:8, 2:11, 4:9] = np.random.default_rng(0).uniform(0.1, 1.0, (5, 9, 5))
    image[4, 5, 6] = image[7, 10, 8] = 0  # zeros inside the box are outside the mask: background too
    volume = _volume(image, spacing=(2.0, 1.0, 0.5), origin=(1.0, 2.0, 3.0), direction=OBLIQUE)
    # Everything above -0.5 is class 1, so the zeros around the box would be class 1 without the crop.
    masked = load_model(
        save(pointwise_model(threshold=-0.5, patch=(4, 8, 8), normalization={"kind": "none", "use_nonzero_mask": True}),
             tmp_path / "masked.onnx"),
        device="cpu",
    )  # fmt: skip
    plain = load_model(
        save(pointwise_model(threshold=-0.5, patch=(4, 8, 8)), tmp_path / "plain.onnx"), device="cpu"
    )
    inside = image != 0
    prediction = predict(volume, masked, return_probabilities=True)
    np.testing.assert_array_equal(prediction.labels.array, inside.astype(np.uint8))
    assert prediction.labels.same_geometry(volume)
    assert prediction.provenance["nonzero_box"] == [[3, 8], [2, 11], [4, 9]]
    probabilities = prediction.probabilities.array
    assert (probabilities[0][~inside] == 1).all() and (probabilities[1][~inside] == 0).all()
    assert (prediction.entropy.array[~inside] == 0).all() and (
        prediction.uafr_uncertainty.array[~inside] == 0
    ).all()
    assert (prediction.top_class_error.array[~inside] == 0).all()
    np.testing.assert_allclose(
        prediction.top_class_error.array, 1 - probabilities.max(0), atol=1e-6
    )  # inside: the network's own; outside: certain background
    assert (predict(volume, plain).labels.array == 1).all()
    assert predict(volume, plain).provenance["nonzero_box"] is None
    # Non-zero voxels on every face: no crop, but the zeros inside are still outside the mask.
    holes = np.random.default_rng(1).uniform(0.1, 1.0, image.shape).astype(np.float32)
    holes[5, 6, 7] = holes[2, 3, 4] = 0
    prediction = predict(_volume(holes), masked)
    assert prediction.provenance["nonzero_box"] is None
    np.testing.assert_array_equal(prediction.labels.array, (holes != 0).astype(np.uint8))


def _ruled_error(probs, image):
    """1 - p(label) under the nonzero_is_foreground rule: where the image is non-zero, the best of classes 1..
    renormalised over those classes (background is ruled out there)."""
    conditional = probs[1:].max(0) / np.maximum(1 - probs[0], 1e-6)
    return np.clip(1 - np.where(image != 0, conditional, probs.max(0)), 0, 1)


@pytest.mark.parametrize("spacing", [None, (2.0, 1.0, 1.0)])
def test_top_class_error_follows_the_nonzero_is_foreground_rule(tmp_path, spacing):
    """Where background is ruled out the label is the likeliest foreground class, and its chance of being
    wrong is 1 - its probability among the foreground classes, even where the network was sure of
    background."""
    rng = np.random.default_rng(4)
    image = rng.choice(np.array([0.0, 0.1, 0.2, 0.6, 1.0, 1.7], np.float32), size=(6, 10, 9))
    image[0] = 0
    common = {
        "num_classes": 3,
        "patch": (4, 8, 8),
        "maps": (),
        **({} if spacing is None else {"spacing": spacing}),
    }
    rule = load_model(
        save(nearest_class_model(nonzero_is_foreground=True, k=4.0, **common), tmp_path / "r.onnx")
    )
    prediction = predict(_volume(image), rule, return_probabilities=True)
    assert prediction.provenance["nonzero_is_foreground"]
    assert prediction.provenance["preprocessing"]["resampled"] is (spacing is not None)
    probs = prediction.probabilities.array
    top_error = prediction.top_class_error.array
    np.testing.assert_allclose(top_error, _ruled_error(probs, image), atol=1e-6)
    labels = prediction.labels.array
    p_label = np.take_along_axis(probs, labels[None].astype(np.intp), 0)[0]
    conditional = np.where(image != 0, p_label / np.maximum(1 - probs[0], 1e-6), p_label)
    np.testing.assert_allclose(top_error, np.clip(1 - conditional, 0, 1), atol=1e-5)
    # Background likely but ruled out: the network's belief in background does not make the tissue label
    # look wrong; only the split among the tissue classes counts (a test that can fail).
    ruled_out = (image != 0) & (probs[0] > 0.8)
    assert ruled_out.any()
    assert (1 - p_label[ruled_out] > 0.8).all() and (top_error[ruled_out] < 0.5).all()
    if spacing is None:  # same grid: exact against the model's formula
        logits = -4.0 * (image[None].astype(np.float64) - np.arange(3).reshape(3, 1, 1, 1)) ** 2
        p = np.exp(logits - logits.max(0))
        p /= p.sum(0)
        np.testing.assert_allclose(top_error, _ruled_error(p, image), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "region"),
    [
        ("3d", ((2, 9), (3, 11), (1, 8))),
        ("3d", ("slice", 0, 5)),
        ("2d", ("slice", 0, 4)),
        ("2d-image", ((5, 30), (10, 44))),
    ],
)
def test_a_region_run_has_the_top_class_error_inside_and_zero_outside(models, name, region):
    shape = (37, 50) if name == "2d-image" else (12, 14, 10)
    image = _away_from(0.5, shape, seed=7)
    volume = _volume(image, spacing=(1.0,) * len(shape))
    prediction = predict(volume, models["2d" if name == "2d-image" else name], region=region)
    top_error = prediction.top_class_error
    assert top_error.same_geometry(volume, atol=0) and top_error.array.dtype == np.float32
    if region[0] == "slice":
        _, axis, index = region
        inside = tuple(slice(index, index + 1) if a == axis else slice(None) for a in range(len(shape)))
    else:
        inside = tuple(slice(a, b) for a, b in region)
    outside = np.ones(shape, bool)
    outside[inside] = False
    p = _sigmoid(50 * (image.astype(np.float64) - 0.5))
    expected = np.where(outside, 0.0, 1 - np.maximum(p, 1 - p))
    np.testing.assert_allclose(top_error.array, expected, atol=1e-5)
    assert top_error.array[inside].max() > 0.05 and (top_error.array[outside] == 0).all()


def test_crop_paste_and_set_background_carry_the_top_class_error():
    grid = _volume(np.zeros((4, 5, 6), np.float32), spacing=(2.0, 1.0, 0.5), origin=(1.0, 2.0, 3.0))
    error = np.linspace(0.1, 0.5, grid.array.size, dtype=np.float32).reshape(grid.spatial_shape)
    prediction = Prediction(
        labels=grid.with_array(np.ones(grid.spatial_shape, np.uint8)),
        entropy=grid.with_array(np.full(grid.spatial_shape, 0.3, np.float32)),
        top_class_error=grid.with_array(error.copy()),
    )
    box = (slice(1, 3), slice(0, 4), slice(2, 6))
    part = prediction.crop(box)
    np.testing.assert_array_equal(part.top_class_error.array, error[box])
    assert part.top_class_error.same_geometry(part.labels)
    pasted = part.pasted(grid, box)
    expected = np.zeros_like(error)
    expected[box] = error[box]
    np.testing.assert_array_equal(pasted.top_class_error.array, expected)
    assert pasted.top_class_error.same_geometry(grid)
    where = error > 0.3
    prediction.set_background(where)
    np.testing.assert_array_equal(prediction.top_class_error.array, np.where(where, 0, error))
    # A Prediction without the map (older code) still crops and pastes.
    assert Prediction(labels=prediction.labels, entropy=prediction.entropy).crop(box).top_class_error is None


class _ClaimsCuda:
    """A CPU session that says it runs on CUDA: what the defaults for a GPU session do, on any machine."""

    provider = "CUDAExecutionProvider"

    def __init__(self, session):
        self._session = session

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_a_cuda_session_batches_windows_and_stitches_on_threads(models, monkeypatch):
    from napari_medcl import prediction as module

    monkeypatch.setattr(module.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(module, "_POSTPROCESS_SLAB_VOXELS", 40)  # many slabs for the resampling threads
    image = _volume(_blob((13, 15, 17), (1.5, 0.8, 1.2), (9.0, 6.0, 10.0), 3.0), spacing=(1.5, 0.8, 1.2))
    cpu = predict(image, models["3d-spacing"], return_probabilities=True)
    gpu = predict(image, _ClaimsCuda(models["3d-spacing"]), return_probabilities=True)
    assert cpu.provenance["tiling"]["batch_size"] == 1
    assert gpu.provenance["tiling"]["batch_size"] == module.cuda_batch_size((8, 8, 8)) == 32
    assert module.cuda_batch_size((24, 80, 80)) == 8 and module.cuda_batch_size((128, 128)) == 32
    assert module.cuda_batch_size((96, 192, 192)) == 1
    assert module.stitch_threads(True) == 4 and module.stitch_threads(False) == 1
    for a, b in [(cpu.labels, gpu.labels), (cpu.entropy, gpu.entropy), (cpu.probabilities, gpu.probabilities),
                 (cpu.top_class_error, gpu.top_class_error), *zip(cpu.uncertainty_maps.values(), gpu.uncertainty_maps.values())]:  # fmt: skip
        np.testing.assert_allclose(b.array, a.array, rtol=0, atol=1e-6)
    assert len(np.unique(cpu.labels.array)) == 2
    assert [
        t.name for t in threading.enumerate() if t.name.startswith(("medcl-stitch", "medcl-resample"))
    ] == []


def test_stopping_a_prediction_midway_ends_its_model_thread(models):
    items = predict_iter(_volume(_away_from(0.5, (16, 16, 16))), models["3d"])
    for item in items:
        if isinstance(item, Progress) and item.stage == "infer" and item.done == 2:
            break
    assert any(t.name.startswith("medcl-windows") for t in threading.enumerate())  # one batch ahead
    items.close()
    assert [t.name for t in threading.enumerate() if t.name.startswith("medcl-windows")] == []
