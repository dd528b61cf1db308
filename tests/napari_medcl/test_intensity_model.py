"""The local intensity model and the intensity consensus error map built on it."""

from __future__ import annotations

import numpy as np
import pytest

import napari_medcl
from export.calibrate import main as calibrate_main
from napari_medcl.error_model import CONSENSUS_FEATURES, ErrorModel, ErrorModelError, feature_planes
from napari_medcl.intensity_model import label_probability
from tests.dataset_factory import make_msd_dataset
from tests.onnx_models import make_spec, pointwise_model, save


def two_tissues(shape=(6, 40, 40), bias=0.0):
    """A dark tissue (label 1, about 100) left of x = 20 and a bright one (label 2, about 200) right of it,
    under a smooth multiplicative ramp along y of strength ``bias``, with a little seeded noise."""
    rng = np.random.default_rng(0)
    truth = np.ones(shape, np.uint8)
    truth[..., 20:] = 2
    image = np.where(truth == 1, 100.0, 200.0)
    ramp = 1.0 + bias * np.linspace(-1, 1, shape[1])[None, :, None]
    image = image * ramp + rng.normal(0, 5, shape)
    return image.astype(np.float32), truth


def test_a_label_the_intensity_contradicts_is_unlikely_and_right_labels_are_likely():
    image, truth = two_tissues()
    labels = truth.copy()
    labels[:, 10:14, 24:28] = 1  # a bright patch called dark
    p = label_probability(image[None], labels, (1.0, 1.0, 1.0), sigma_mm=8.0)
    assert p.shape == labels.shape and p.dtype == np.float32
    assert p[:, 10:14, 24:28].max() < 0.25 and np.median(p[:, 10:14, 24:28]) < 0.02
    right = np.ones(labels.shape, bool)
    right[:, 10:14, 24:28] = False
    assert np.median(p[right]) > 0.99 and (p[right] > 0.5).mean() > 0.99


def test_the_model_is_local_so_a_bias_field_does_not_fool_it():
    # with bias 0.6 the dark tissue at the bright end (about 160) is brighter than the bright tissue at the
    # dark end (about 80): one global threshold would mislabel a third of the image, the local model does not
    image, truth = two_tissues(shape=(4, 120, 40), bias=0.6)
    p = label_probability(image[None], truth, (1.0, 1.0, 1.0), sigma_mm=6.0)
    assert np.median(p) > 0.99 and (p > 0.5).mean() > 0.97


def test_eligible_voxels_alone_inform_it_and_the_rest_stay_certain():
    image, truth = two_tissues()
    labels = truth.copy()
    eligible = np.ones(labels.shape, bool)
    eligible[..., :4] = False
    image[..., :4] = 0.0
    labels[..., :4] = 0  # background by a rule, not a competing class
    p = label_probability(image[None], labels, (1.0, 1.0, 1.0), eligible)
    assert (p[~eligible] == 1).all() and np.median(p[eligible]) > 0.99
    one = label_probability(image[None], np.ones_like(labels), (1.0, 1.0, 1.0))
    assert (one == 1).all()  # nothing to compare a single label with


def test_bad_shapes_are_named():
    image, truth = two_tissues()
    with pytest.raises(ValueError, match="image \\(C, \\*S\\) must match labels"):
        label_probability(image, truth, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        label_probability(image[None], truth, (1.0, 1.0))
    with pytest.raises(ValueError, match="eligible mask"):
        label_probability(image[None], truth, (1.0, 1.0, 1.0), np.ones((2, 2, 2), bool))


def test_consensus_multiplies_the_two_odds_and_needs_the_image():
    image, truth = two_tissues()
    labels = truth.copy()
    labels[:, 10:14, 24:28] = 1
    top = np.full(labels.shape, 0.2, np.float32)
    consensus = ErrorModel.consensus()
    assert consensus.is_consensus and consensus.needs_image and consensus.features == CONSENSUS_FEATURES
    assert not ErrorModel(features=("top_error",), coefficients=(1.0,), intercept=0.0).needs_image
    got = consensus.apply(labels, top, top, {}, (1.0, 1.0, 1.0), image=image[None])
    p = np.clip(label_probability(image[None], labels, (1.0, 1.0, 1.0)), 1e-4, 1 - 1e-4)
    odds = (0.2 / 0.8) * (1 - p) / p
    np.testing.assert_allclose(got, odds / (1 + odds), rtol=1e-4, atol=1e-6)
    assert np.median(got[:, 10:14, 24:28]) > 0.9 and np.median(got) < 0.01
    with pytest.raises(ErrorModelError, match="needs the image"):
        consensus.apply(labels, top, top, {}, (1.0, 1.0, 1.0))
    with pytest.raises(ErrorModelError, match="needs the image"):
        list(feature_planes(["intensity_error_logit"], labels, top, top, {}, (1.0, 1.0, 1.0)))
    again = ErrorModel.from_dict(consensus.to_dict())
    assert again.is_consensus and "intensity consensus" in again.summary()


def test_a_weighted_consensus_raises_the_intensity_odds_to_its_weight():
    image, truth = two_tissues()
    labels = truth.copy()
    labels[:, 10:14, 24:28] = 1
    top = np.full(labels.shape, 0.2, np.float32)
    tempered = ErrorModel.consensus(intensity_weight=0.25)
    assert tempered.is_consensus and tempered.intensity_weight == 0.25
    got = tempered.apply(labels, top, top, {}, (1.0, 1.0, 1.0), image=image[None])
    p = np.clip(label_probability(image[None], labels, (1.0, 1.0, 1.0)), 1e-4, 1 - 1e-4)
    odds = (0.2 / 0.8) * ((1 - p) / p) ** 0.25
    np.testing.assert_allclose(got, odds / (1 + odds), rtol=1e-4, atol=1e-6)
    plain = ErrorModel.consensus().apply(labels, top, top, {}, (1.0, 1.0, 1.0), image=image[None])
    wrong = np.zeros(labels.shape, bool)
    wrong[:, 10:14, 24:28] = True
    # the intensities still raise the mislabelled patch above the network's 0.2 and lower the rest, by less
    # than the full intensity expert does
    assert (
        np.median(plain[wrong])
        > np.median(got[wrong])
        > 0.2
        > np.median(got[~wrong])
        > np.median(plain[~wrong])
    )
    again = ErrorModel.from_dict(tempered.to_dict())
    assert again.is_consensus and again.intensity_weight == 0.25
    assert "network x local intensity model^0.25, nothing fitted" in again.summary()
    assert "network x local intensity model, nothing fitted" in ErrorModel.consensus().summary()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ErrorModelError, match="intensity weight must be a positive number"):
            ErrorModel.consensus(intensity_weight=bad)
    fitted = ErrorModel(features=CONSENSUS_FEATURES, coefficients=(0.8, 1.0), intercept=0.1)
    assert not fitted.is_consensus
    with pytest.raises(ErrorModelError, match="only an intensity consensus"):
        _ = fitted.intensity_weight


def test_a_consensus_weighs_its_intensity_model_by_the_scans_verdict():
    """On a scan judged ``caution`` the intensity odds take that level's weight; on one judged
    ``out-of-distribution`` with weight 0 the map is the network's alone; other levels, and a scan not
    assessed, keep the base weight. The weights round-trip, and need format version 2."""
    image, truth = two_tissues()
    labels = truth.copy()
    labels[:, 10:14, 24:28] = 1
    top = np.full(labels.shape, 0.2, np.float32)
    by_verdict = ErrorModel.consensus(verdict_weights={"caution": 0.25, "out-of-distribution": 0.0})
    assert by_verdict.is_consensus and by_verdict.intensity_weight == 1.0 and by_verdict.version == 2
    assert ErrorModel.consensus().version == 1  # a file without them stays readable by older versions

    def on(level):
        return by_verdict.apply(labels, top, top, {}, (1.0, 1.0, 1.0), image=image[None], verdict_level=level)

    plain = ErrorModel.consensus().apply(labels, top, top, {}, (1.0, 1.0, 1.0), image=image[None])
    tempered = ErrorModel.consensus(intensity_weight=0.25).apply(
        labels, top, top, {}, (1.0, 1.0, 1.0), image=image[None]
    )
    for level in ("ok", "unknown", None):
        np.testing.assert_array_equal(on(level), plain)
    np.testing.assert_array_equal(on("caution"), tempered)
    np.testing.assert_allclose(on("out-of-distribution"), 0.2, rtol=1e-5)
    # weight 0: the intensity model is not computed, so not even the image is needed
    alone = by_verdict.apply(labels, top, top, {}, (1.0, 1.0, 1.0), verdict_level="out-of-distribution")
    np.testing.assert_allclose(alone, 0.2, rtol=1e-5)

    data = by_verdict.to_dict()
    assert data["version"] == 2
    assert data["intensity_weight_by_verdict"] == {"caution": 0.25, "out-of-distribution": 0.0}
    again = ErrorModel.from_dict(data)
    assert again == by_verdict
    assert "intensity weight 0.25 on caution, 0 on out-of-distribution, 1 otherwise" in again.summary()
    for bad, message in (
        ({"caution": -1.0}, "must be a number >= 0"),
        ({"caution": float("nan")}, "must be a number >= 0"),
        ({"unknown": 0.5}, "unknown verdict level 'unknown'"),
        ({"cautious": 0.5}, "unknown verdict level 'cautious'"),
    ):
        with pytest.raises(ErrorModelError, match=message):
            ErrorModel.consensus(verdict_weights=bad)
    with pytest.raises(ErrorModelError, match="only an intensity consensus"):
        ErrorModel(
            features=("top_error",), coefficients=(1.0,), intercept=0.0, verdict_weights={"caution": 0.5}
        )
    with pytest.raises(ErrorModelError, match="version 1 has no intensity weight by verdict"):
        ErrorModel.from_dict({**data, "version": 1})
    with pytest.raises(ErrorModelError, match="must map levels to numbers"):
        ErrorModel.from_dict({**data, "intensity_weight_by_verdict": {"caution": "high"}})


def test_calibrate_stores_the_consensus_measures_it_and_predictions_use_the_image(tmp_path, capsys):
    spec = make_spec(normalization={"kind": "zscore", "use_nonzero_mask": True}, maps=("decoder1",))
    model = save(pointwise_model(spec=spec, k=3.0), tmp_path / "model.onnx")
    data = make_msd_dataset(tmp_path / "tiny", n_cases=4, shape=(10, 16, 14), modality="MRI")
    bare = tmp_path / "bare.onnx"
    assert calibrate_main([str(model), str(data), "-o", str(bare), "--error-map", "consensus"]) == 0
    assert "intensity consensus error map" in capsys.readouterr().out
    assert napari_medcl.load_model(bare, device="cpu").spec.error_map_model.figures == {}

    out = tmp_path / "measured.onnx"
    argv = [str(model), str(data), "-o", str(out), "--error-map", "consensus", "--error-voxels", "500"]
    for case in ("case_001", "case_002"):  # the calibrated model predicts them itself: nothing is fitted
        argv += ["--error-case", str(model), str(data), case]
    assert calibrate_main(argv) == 0
    printed = capsys.readouterr().out
    assert "intensity consensus error map" in printed and "AUROC of intensity_error_logit alone" in printed
    spec = napari_medcl.load_model(out, device="cpu").spec
    error_model = spec.error_map_model
    summary = spec.error_map_summary()
    assert "on the 2 case(s) it was measured on (1 - p(label) alone: ECE" in summary
    assert "AUROC of each signal alone on the same cases: top_error_logit" in summary
    # every UAFR map gets its own figure beside the consensus's two signals, and the summary names it
    assert error_model.is_consensus and error_model.features == CONSENSUS_FEATURES
    assert set(error_model.figures["signals"]) == {*CONSENSUS_FEATURES, "map:decoder1"}
    assert f"UAFR decoder1 {error_model.figures['signals']['map:decoder1']:.3f}" in summary
    assert error_model.figures["fit"].startswith("none") and "ece network alone" in printed
    assert 0 <= error_model.figures["ece_network_alone"] <= 1

    image = napari_medcl.read_image(data / "imagesTr" / "case_003_0000.nii.gz")
    prediction = napari_medcl.predict(image, out, device="cpu")
    likelihood = prediction.error_likelihood.array
    expected = error_model.apply(
        prediction.labels.array,
        prediction.top_class_error.array,
        prediction.entropy.array,
        {},
        prediction.labels.spacing,
        image.array != 0,
        image=image.array[None],
    )
    np.testing.assert_allclose(likelihood, expected, atol=1e-6)
    assert (likelihood[image.array == 0] == 0).all()

    # the scan's verdict reaches the map: with the intensity model left out on every judged level, the map
    # is the network's 1 - p(label) on this profiled model's scans (its odds clipped at 1e-4, as always)
    assert prediction.verdict.level != "unknown"
    by_verdict = tmp_path / "by-verdict.onnx"
    levels = ("ok", "caution", "out-of-distribution")
    argv = [str(model), str(data), "-o", str(by_verdict), "--error-map", "consensus"]
    assert calibrate_main([*argv, *(f"--verdict-weight={level}=0" for level in levels)]) == 0
    alone = napari_medcl.predict(image, by_verdict, device="cpu")
    nonzero = image.array != 0
    np.testing.assert_allclose(
        alone.error_likelihood.array[nonzero],
        np.clip(alone.top_class_error.array[nonzero], 1e-4, 1 - 1e-4),
        rtol=1e-4,
        atol=1e-6,
    )


def test_the_coarse_grid_gives_what_full_resolution_sums_give():
    from scipy import ndimage

    image, truth = two_tissues(shape=(24, 48, 48), bias=0.3)
    labels = truth.copy()
    labels[8:14, 10:16, 24:30] = 1
    sigma = 8.0  # 1 mm voxels: the sums run on a grid 4 times coarser per axis
    got = label_probability(image[None], labels, (1.0, 1.0, 1.0), sigma_mm=sigma)
    logs = []
    for value in (1, 2):  # the same model with every sum at full resolution
        member = (labels == value).astype(np.float64)
        count = ndimage.gaussian_filter(member, sigma, mode="constant", truncate=3.0) + 1e-12
        mean = ndimage.gaussian_filter(member * image, sigma, mode="constant", truncate=3.0) / count
        second = ndimage.gaussian_filter(member * image**2, sigma, mode="constant", truncate=3.0) / count
        variance = np.maximum(second - mean**2, 1e-3 * image.var())
        logs.append(np.log(count) - 0.5 * (image - mean) ** 2 / variance - 0.5 * np.log(variance))
    logs = np.stack(logs)
    reference = np.exp(np.take_along_axis(logs, labels[None].astype(int) - 1, 0)[0] - np.logaddexp(*logs))
    assert np.abs(got - reference).mean() < 0.01
    assert np.abs(got - reference).max() < 0.2
