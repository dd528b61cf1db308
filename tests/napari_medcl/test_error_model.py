"""The calibrated error map: features, the logistic model, the spec round trip, the out-of-fold fit and
its place in every prediction of a model that carries one."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

import napari_medcl
from export.calibrate import main as calibrate_main
from export.error_fit import (
    ErrorCase,
    ErrorSamples,
    expected_calibration_error,
    fit_error_model,
    measure_consensus,
)
from napari_medcl.error_model import BASE_FEATURES, ErrorModel, ErrorModelError, feature_names, feature_planes
from napari_medcl.errors import UsageError
from napari_medcl.spec import ModelSpec, SpecError
from napari_medcl.volume import Volume
from tests.dataset_factory import make_msd_dataset
from tests.onnx_models import make_spec, pointwise_model, save


def planes(names, labels, top_error=None, entropy=None, maps=None, spacing=(1.0, 1.0, 1.0)):
    top_error = np.zeros(labels.shape, np.float32) if top_error is None else top_error
    entropy = np.zeros(labels.shape, np.float32) if entropy is None else entropy
    return dict(feature_planes(names, labels, top_error, entropy, maps or {}, spacing))


def test_border_marks_both_sides_of_a_label_change_and_nothing_else():
    labels = np.zeros((1, 4, 6), np.uint8)
    labels[:, :, 3:] = 2
    border = planes(["border"], labels)["border"]
    expected = np.zeros((1, 4, 6), np.float32)
    expected[:, :, 2:4] = 1
    np.testing.assert_array_equal(border, expected)
    assert planes(["border"], np.ones((3, 3, 3), np.uint8))["border"].max() == 0


def test_signal_features_have_their_values():
    labels = np.zeros((3, 5, 5), np.uint8)
    top = np.zeros((3, 5, 5), np.float32)
    top[1, 2, 2] = 0.5
    got = planes(["top_error", "top_error_logit", "top_error_max_3", "map:decoder1"], labels, top,
                 maps={"decoder1": np.full((3, 5, 5), 0.25, np.float32)})  # fmt: skip
    assert got["top_error_logit"][1, 2, 2] == pytest.approx(0.0, abs=1e-6)  # log(0.5 / 0.5)
    assert got["top_error_logit"][0, 0, 0] == pytest.approx(np.log(1e-4 / (1 - 1e-4)), rel=1e-4)
    assert got["top_error_max_3"][0:3, 1:4, 1:4].min() == 0.5 and got["top_error_max_3"][0, 0, 0] == 0
    assert (got["map:decoder1"] == 0.25).all()
    spike = np.zeros((13, 13, 13), np.float32)
    spike[6, 6, 6] = 0.5  # the Gaussian (sigma 2 voxels, truncated at 3 sigma) fits inside: the mass stays
    mean = planes(["top_error_mean_2mm"], np.zeros(spike.shape, np.uint8), spike)["top_error_mean_2mm"]
    assert mean.sum() == pytest.approx(0.5, rel=1e-3) and 0 < mean[6, 6, 6] < 0.5
    coarse = planes(["top_error_mean_2mm"], np.zeros(spike.shape, np.uint8), spike, spacing=(4.0, 1.0, 1.0))
    assert coarse["top_error_mean_2mm"][6, 6, 6] > mean[6, 6, 6]  # 2 mm is half a voxel along 4 mm slices
    with pytest.raises(ErrorModelError, match="unknown error-model feature 'nope'"):
        planes(["nope"], labels)
    with pytest.raises(ValueError, match="share one shape"):
        planes(["top_error"], labels, np.zeros((3, 5, 4), np.float32))


def test_apply_is_the_logistic_function_and_zero_where_the_label_cannot_be_wrong():
    model = ErrorModel(features=("top_error",), coefficients=(4.0,), intercept=-2.0)
    labels = np.zeros((2, 2, 2), np.uint8)
    top = np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 2, 2)
    eligible = np.ones((2, 2, 2), bool)
    eligible[0, 0, 0] = False
    got = model.apply(labels, top, np.zeros_like(top), {}, (1, 1, 1), eligible)
    expected = 1 / (1 + np.exp(-(4.0 * top - 2.0)))
    expected[0, 0, 0] = 0
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.dtype == np.float32
    huge = ErrorModel(features=("top_error",), coefficients=(1e6,), intercept=-5e5)
    assert np.isfinite(huge.apply(labels, top, top, {}, (1, 1, 1))).all()


def test_error_model_round_trips_through_the_spec_and_refuses_bad_ones():
    model = ErrorModel(
        features=("top_error", "border", "map:decoder1"), coefficients=(1.0, 0.5, -0.2), intercept=-3.0,
        figures={"auroc": 0.9, "ece": 0.01, "cases": ["a", "b"]},
    )  # fmt: skip
    spec = dataclasses.replace(make_spec(maps=("encoder1", "decoder1")), error_model=model.to_dict())
    again = ModelSpec.from_json(spec.to_json())
    assert again.error_map_model == model
    assert "AUROC 0.900, ECE 0.010 on its 2 error case(s)" in again.error_map_model.summary()
    plain = make_spec()
    assert "error_model" not in json.loads(plain.to_json()) and plain.error_map_model is None
    with pytest.raises(SpecError, match="map\\(s\\) the model does not output: map:decoder9"):
        dataclasses.replace(
            spec, error_model={**model.to_dict(), "features": ["top_error", "border", "map:decoder9"]}
        )
    with pytest.raises(SpecError, match="3 features but 2 coefficients"):
        dataclasses.replace(spec, error_model={**model.to_dict(), "coefficients": [1.0, 2.0]})
    with pytest.raises(SpecError, match="version must be a positive integer"):
        dataclasses.replace(spec, error_model={k: v for k, v in model.to_dict().items() if k != "version"})
    with pytest.raises(SpecError, match="must be finite"):
        dataclasses.replace(spec, error_model={**model.to_dict(), "intercept": float("nan")})
    newer = ErrorModel(**{**dataclasses.asdict(model), "version": 99})
    with pytest.raises(ErrorModelError, match="newer than this napari-medcl reads"):
        newer.apply(
            np.zeros((1, 2, 2)),
            np.zeros((1, 2, 2)),
            np.zeros((1, 2, 2)),
            {"decoder1": np.zeros((1, 2, 2))},
            (1, 1, 1),
        )


def test_fit_recovers_a_known_error_rule_and_measures_it():
    rng = np.random.default_rng(0)
    names = feature_names(())
    n = 20000
    features = rng.uniform(0, 1, (n, len(names))).astype(np.float32)
    top = names.index("top_error")
    truth = 1 / (1 + np.exp(-(8 * features[:, top] - 6)))  # P(wrong) rises with top_error only
    wrong = rng.uniform(0, 1, n) < truth
    group = (np.arange(n) % 2).astype(np.int32)
    cases = [
        ErrorCase("f0.onnx", __import__("pathlib").Path("d"), "c0"),
        ErrorCase("f1.onnx", __import__("pathlib").Path("d"), "c1"),
    ]
    model = fit_error_model(names, ErrorSamples(features, wrong, group, []), cases)
    weights = dict(zip(model.features, model.coefficients))
    assert weights["top_error"] > 4 and all(
        abs(w) < 1.0 for k, w in weights.items() if k not in ("top_error", "top_error_logit")
    )
    assert model.figures["auroc"] > 0.75 and model.figures["ece"] < 0.03
    assert model.figures["signals"]["top_error"] == pytest.approx(model.figures["auroc"], abs=0.01)
    assert model.figures["signals"]["entropy"] == pytest.approx(0.5, abs=0.03)  # noise alone
    assert "auroc_other_folds" in model.figures and model.figures["ece_other_folds"] < 0.03
    with pytest.raises(UsageError, match="no wrong voxel"):
        fit_error_model(names, ErrorSamples(features, np.zeros(n, bool), group, []), cases)


def test_a_consensus_by_verdict_is_measured_as_the_product_applies_it():
    """Each case's samples are weighed by the verdict the predicting model gave the case: the figures are
    those of the map the product computes, not of one weight for all."""
    from sklearn.metrics import roc_auc_score

    from napari_medcl.error_model import CONSENSUS_FEATURES
    from napari_medcl.verdict import LEVELS

    rng = np.random.default_rng(1)
    n = 4000
    features = rng.normal(0, 2, (n, 2)).astype(np.float32)
    wrong = rng.uniform(0, 1, n) < 1 / (1 + np.exp(-features[:, 0]))
    verdict = np.where(np.arange(n) < n // 2, LEVELS.index("ok"), LEVELS.index("caution")).astype(np.int8)
    samples = ErrorSamples(features, wrong, np.zeros(n, np.int32), [], verdict=verdict)
    cases = [ErrorCase("m.onnx", __import__("pathlib").Path("d"), "c")]
    model = measure_consensus(CONSENSUS_FEATURES, samples, cases, 1.0, {"caution": 0.0})
    assert model.verdict_weights == {"caution": 0.0} and model.intensity_weight == 1.0
    logit = features[:, 0] + np.where(verdict == LEVELS.index("ok"), features[:, 1], 0.0)
    expected = roc_auc_score(wrong, 1 / (1 + np.exp(-logit)))
    assert model.figures["auroc"] == pytest.approx(expected, abs=1e-4)
    single = measure_consensus(CONSENSUS_FEATURES, samples, cases, 1.0)
    assert single.figures["auroc"] != pytest.approx(expected, abs=1e-3)
    assert "0 on caution, 1 otherwise" in model.figures["fit"]
    # samples without recorded verdicts are 'unknown', which keeps the base weight
    unrecorded = ErrorSamples(features, wrong, np.zeros(n, np.int32), [])
    assert measure_consensus(CONSENSUS_FEATURES, unrecorded, cases, 1.0, {"caution": 0.0}).figures[
        "auroc"
    ] == pytest.approx(single.figures["auroc"])


def test_expected_calibration_error_on_known_bins():
    probability = np.array([0.05, 0.05, 0.95, 0.95])
    assert expected_calibration_error(probability, np.array([False, False, True, True])) == pytest.approx(
        0.05
    )
    assert expected_calibration_error(probability, np.array([True, True, False, False])) == pytest.approx(
        0.95
    )


def test_calibrate_fits_the_error_map_and_predictions_carry_it(tmp_path, capsys):
    spec = make_spec(
        normalization={"kind": "zscore", "use_nonzero_mask": True}, maps=("encoder1", "decoder1")
    )
    model = save(pointwise_model(spec=spec, k=3.0), tmp_path / "model.onnx")
    data = make_msd_dataset(tmp_path / "tiny", n_cases=4, shape=(10, 16, 14), modality="MRI")
    out = tmp_path / "calibrated.onnx"
    argv = [str(model), str(data), "-o", str(out), "--error-voxels", "500"]
    for case in ("case_001", "case_002"):  # the "fold model" is the same file here; the fit does not know
        argv += ["--error-case", str(model), str(data), case]
    assert calibrate_main(argv) == 0
    printed = capsys.readouterr().out
    assert "calibrated error map (" in printed and "AUROC of top_error alone" in printed
    loaded = napari_medcl.load_model(out, device="cpu")
    error_model = loaded.spec.error_map_model
    assert error_model.features == feature_names(("encoder1", "decoder1"))
    assert [c["case"] for c in error_model.figures["per_case"]] == [
        f"model.onnx: tiny/case_00{i}" for i in (1, 2)
    ]
    assert set(error_model.figures["signals"]) == set(error_model.features)

    image = napari_medcl.read_image(data / "imagesTr" / "case_003_0000.nii.gz")
    prediction = napari_medcl.predict(image, out, device="cpu")
    likelihood = prediction.error_likelihood
    assert likelihood is not None and likelihood.spatial_shape == image.spatial_shape
    a = likelihood.array
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert (a[image.array == 0] == 0).all()  # zero voxels are background by the model's rule: never wrong
    assert "error_map" in prediction.provenance.timings
    assert napari_medcl.predict(image, model, device="cpu").error_likelihood is None
    region = napari_medcl.predict(image, out, device="cpu", region=(slice(2, 6), slice(None), slice(None)))
    assert region.error_likelihood is not None and (region.error_likelihood.array[:2] == 0).all()


def test_calibrate_refuses_a_fold_model_of_another_network(tmp_path, capsys):
    model = save(pointwise_model(spec=make_spec(maps=("encoder1", "decoder1"))), tmp_path / "model.onnx")
    other = save(pointwise_model(spec=make_spec(maps=("encoder1",))), tmp_path / "other.onnx")
    data = make_msd_dataset(tmp_path / "tiny", n_cases=3, shape=(8, 10, 10), modality="MRI")
    argv = [
        str(model),
        str(data),
        "-o",
        str(tmp_path / "out.onnx"),
        "--error-case",
        str(other),
        str(data),
        "case_001",
    ]
    assert calibrate_main(argv) == 1
    err = capsys.readouterr().err
    assert "other.onnx" in err and "uncertainty_maps" in err and not (tmp_path / "out.onnx").exists()
    argv = [
        str(model),
        str(data),
        "-o",
        str(tmp_path / "out.onnx"),
        "--error-case",
        str(model),
        str(data),
        "case_9",
    ]
    assert calibrate_main(argv) == 1
    assert "no case case_9" in capsys.readouterr().err


def test_a_volume_without_nonzero_rule_is_eligible_everywhere():
    from napari_medcl.error_model import eligible_voxels

    image = Volume(np.array([[[0.0, 1.0]]], np.float32), (1, 1, 1), (0, 0, 0), np.eye(3))
    assert eligible_voxels(image, False) is None
    np.testing.assert_array_equal(eligible_voxels(image, True), [[[False, True]]])
    assert set(BASE_FEATURES) <= set(feature_names(("x",)))


def test_without_a_dataset_calibrate_keeps_the_profile_and_measures_a_carried_consensus(tmp_path, capsys):
    """A fine-tuned model's profile (its corrected and replayed cases) is kept; its carried consensus gets
    figures of its own, and keeps those of the model it started from."""
    from napari_medcl.spec import METADATA_KEY

    spec = make_spec(normalization={"kind": "zscore", "use_nonzero_mask": True}, maps=("decoder1",))
    data = make_msd_dataset(tmp_path / "tiny", n_cases=4, shape=(10, 16, 14), modality="MRI")
    profiled = tmp_path / "profiled.onnx"
    model = save(pointwise_model(spec=spec, k=3.0), tmp_path / "model.onnx")
    assert calibrate_main([str(model), str(data), "-o", str(profiled), "--cases", "case_000"]) == 0
    proto = onnx.load(str(profiled))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    carried = ErrorModel.consensus({"start_model": {"name": "base", "auroc": 0.9, "ece": 0.05}}, 0.5)
    entry.value = json.dumps({**json.loads(entry.value), "error_model": carried.to_dict()})
    onnx.save(proto, str(profiled))
    capsys.readouterr()

    out = tmp_path / "measured.onnx"
    argv = [str(profiled), "-o", str(out), "--error-map", "consensus", "--error-voxels", "500"]
    argv += ["--intensity-weight", "0.5", "--error-case", str(profiled), str(data), "case_003"]
    assert calibrate_main(argv) == 0
    printed = capsys.readouterr().out
    assert "(kept as it was)" in printed and "cases:" not in printed
    before = napari_medcl.load_model(profiled, device="cpu").spec
    after = napari_medcl.load_model(out, device="cpu").spec
    assert after.training_profile == before.training_profile
    figures = after.error_map_model.figures
    assert after.error_map_model.is_consensus and isinstance(figures["auroc"], float)
    assert after.error_map_model.intensity_weight == 0.5
    assert figures["start_model"] == {"name": "base", "auroc": 0.9, "ece": 0.05}
    assert figures["fit"].endswith("raised to 0.5")
    assert after.error_map_model.summary().startswith(
        "intensity consensus error map (network x local intensity model^0.5, nothing fitted): AUROC "
    )
    assert figures["per_case"][0]["verdict"] in ("ok", "caution", "out-of-distribution")
    # a weight per verdict level is stored, measured, and carried by the summary
    argv[argv.index("-o") + 1] = str(tmp_path / "by-verdict.onnx")
    argv += ["--verdict-weight", "caution=0.25", "--verdict-weight", "out-of-distribution=0"]
    assert calibrate_main(argv) == 0
    by_verdict = napari_medcl.load_model(tmp_path / "by-verdict.onnx", device="cpu").spec.error_map_model
    assert by_verdict.verdict_weights == {"caution": 0.25, "out-of-distribution": 0.0}
    assert by_verdict.intensity_weight == 0.5 and by_verdict.version == 2
    assert "intensity weight 0.25 on caution, 0 on out-of-distribution, 0.5 otherwise" in by_verdict.summary()
    for bad, message in (
        (["--verdict-weight", "caution"], "expected LEVEL=W"),
        (["--verdict-weight", "bogus=1"], "unknown verdict level 'bogus'"),
        (["--verdict-weight", "caution=-1"], "must be a number >= 0"),
        (["--verdict-weight", "caution=1", "--verdict-weight", "caution=0"], "names a level twice"),
        (["--error-map", "fit", "--verdict-weight", "caution=0"], "consensus only"),
    ):
        with pytest.raises(SystemExit):
            calibrate_main([str(profiled), "-o", str(tmp_path / "no.onnx"), "--error-map", "consensus", *bad])
        assert message in capsys.readouterr().err and not (tmp_path / "no.onnx").exists()
    # a weight is refused where it means nothing, or is not a positive number; nothing is written
    for extra in (["--error-case", str(profiled), str(data), "case_003"], ["--error-map", "consensus"]):
        for weight in ("0.5", "0") if extra[0] == "--error-case" else ("0", "-1", "nan"):
            with pytest.raises(SystemExit):
                calibrate_main(
                    [str(profiled), "-o", str(tmp_path / "no.onnx"), *extra, "--intensity-weight", weight]
                )
            assert "--intensity-weight" in capsys.readouterr().err and not (tmp_path / "no.onnx").exists()
    # what needs a dataset says so, and nothing is written
    for extra in (["--fold", "0"], []):
        with pytest.raises(SystemExit):
            calibrate_main([str(profiled), "-o", str(tmp_path / "no.onnx"), *extra])
        assert "DATASET" in capsys.readouterr().err and not (tmp_path / "no.onnx").exists()
