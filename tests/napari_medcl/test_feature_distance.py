"""Window features and the verdict's ``features`` check: the statistics, the graph output medcl-calibrate adds,
and a prediction's distance, without torch."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

import napari_medcl
from export.calibrate import main
from export.feature_output import add_feature_output, bottleneck_tensor, check_only_features_added
from napari_medcl.feature_distance import FeatureStats, FeatureStatsError
from napari_medcl.onnx_session import load_model
from napari_medcl.spec import ModelSpec, SpecError
from napari_medcl.verdict import Verdict, with_feature_distance
from napari_medcl.volume import Volume
from tests.dataset_factory import make_msd_dataset
from tests.onnx_models import conv_model, make_spec, pointwise_model, save

ZSCORE = {"kind": "zscore", "use_nonzero_mask": True}


def _stats() -> FeatureStats:
    rng = np.random.default_rng(0)
    per_case = {
        "a": rng.normal([1.0, -2.0, 0.0], [1.0, 2.0, 0.5], size=(400, 3)),
        "b": rng.normal([1.0, -2.0, 0.0], [1.0, 2.0, 0.5], size=(300, 3)),
    }
    return FeatureStats.fit("bottleneck", per_case)


def test_fit_measures_each_channel_and_the_training_windows():
    stats = _stats()
    assert stats.channels == 3 and stats.cases == ("a", "b") and stats.measured
    np.testing.assert_allclose(stats.mean, [1.0, -2.0, 0.0], atol=0.2)
    np.testing.assert_allclose(stats.variance, [1.0, 4.0, 0.25], rtol=0.15)
    # A window at the mean is at distance 0; one sd out on every channel at 1; the median of Gaussian
    # windows near sqrt of the chi-square median / 3.
    assert stats.window_distances(np.array([stats.mean]))[0] == pytest.approx(0.0)
    one_sd = np.array(stats.mean) + np.sqrt(stats.variance)
    assert stats.window_distances(one_sd[None])[0] == pytest.approx(1.0)
    assert all(0.75 < m < 1.05 for m in stats.case_medians)
    assert stats.reference == max(stats.case_medians)
    assert stats.window_percentiles["50"] < stats.window_percentiles["95"] < stats.window_percentiles["99"]
    shifted = np.random.default_rng(1).normal([4.0, -8.0, 1.5], [1.0, 2.0, 0.5], size=(50, 3))
    assert stats.case_distance(shifted) > 2.5 * stats.reference


def test_stats_round_trip_and_refuse_what_cannot_be_used():
    stats = _stats()
    again = FeatureStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    unmeasured = FeatureStats.from_dict({"tensor": "t", "channels": 4})
    assert not unmeasured.measured and unmeasured.to_dict() == {"version": 1, "tensor": "t", "channels": 4}
    with pytest.raises(FeatureStatsError, match="no training statistics"):
        unmeasured.window_distances(np.zeros((1, 4)))
    with pytest.raises(FeatureStatsError, match=r"expected \(N, 3\)"):
        stats.window_distances(np.zeros((2, 4)))
    broken = stats.to_dict() | {"variance": [1.0, -1.0, 1.0]}
    with pytest.raises(FeatureStatsError, match="variance"):
        FeatureStats.from_dict(broken)
    with pytest.raises(FeatureStatsError, match="unknown field"):
        FeatureStats.from_dict(stats.to_dict() | {"covariance": []})
    with pytest.raises(FeatureStatsError, match="3 values each"):
        FeatureStats.from_dict(stats.to_dict() | {"mean": [0.0]})


def test_the_spec_carries_features_and_old_specs_read_as_before():
    spec = make_spec()
    assert "features" not in spec.to_dict() and spec.feature_stats is None
    with_stats = ModelSpec.from_dict(spec.to_dict() | {"features": _stats().to_dict()})
    assert with_stats.feature_stats == _stats()
    assert ModelSpec.from_dict(json.loads(with_stats.to_json())) == with_stats
    with pytest.raises(SpecError, match="features.channels"):
        ModelSpec.from_dict(spec.to_dict() | {"features": {"tensor": "t", "channels": 0}})


def test_the_features_check_joins_the_image_checks():
    stats = _stats()
    ok = Verdict("ok", (), 0.4, {"severity": {"intensity": 0.4}})
    same = with_feature_distance(ok, stats.reference, stats)
    assert same.level == "ok" and same.reasons == () and same.details["severity"]["features"] == 0.0
    assert same.score == pytest.approx(0.4)
    caution = with_feature_distance(ok, 2.0 * stats.reference, stats)  # between x1.5 and x3
    assert caution.level == "caution" and "network's features" in caution.reasons[0]
    assert 1.0 < caution.details["severity"]["features"] < 2.0
    far = with_feature_distance(ok, 3.5 * stats.reference, stats)
    assert far.level == "out-of-distribution" and far.details["features"]["distance"] == pytest.approx(
        3.5 * stats.reference, rel=1e-3
    )
    # Worst reasons first: a feature finding milder than an existing one goes after it.
    ood = Verdict("out-of-distribution", ("not skull-stripped",), 4.0, {"severity": {"border": 4.0}})
    both = with_feature_distance(ood, 2.0 * stats.reference, stats)
    assert both.reasons[0] == "not skull-stripped" and "network's features" in both.reasons[1]
    assert both.level == "out-of-distribution"
    unknown = Verdict("unknown", ("no profile",))
    assert with_feature_distance(unknown, 10 * stats.reference, stats) == unknown


def test_the_graph_gains_only_the_features_output():
    proto = conv_model(spatial_dims=3, features=4)
    before = onnx.ModelProto()
    before.CopyFrom(proto)
    assert bottleneck_tensor(proto) == "a2"  # the data input of the first upsampling (Resize)
    tensor, channels = add_feature_output(proto)
    assert (tensor, channels) == ("a2", 4)
    assert check_only_features_added(before.graph, proto.graph)
    assert not check_only_features_added(proto.graph, before.graph)
    with pytest.raises(ValueError, match="already has"):
        add_feature_output(proto)
    with pytest.raises(ValueError, match="no upsampling node"):
        add_feature_output(pointwise_model())


@pytest.fixture
def conv_and_data(tmp_path):
    proto = conv_model(spatial_dims=3, features=4, spacing=(2.0, 1.0, 1.0), normalization=ZSCORE)
    model = save(proto, tmp_path / "model.onnx")
    data = make_msd_dataset(tmp_path / "tiny", n_cases=4, shape=(12, 20, 18), modality="MRI")
    return model, data


def test_calibrate_features_end_to_end(conv_and_data, tmp_path, capsys):
    model, data = conv_and_data
    out = tmp_path / "features.onnx"
    cases = ["case_000", "case_001", "case_002"]
    assert main([str(model), str(data), "-o", str(out), "--cases", *cases, "--features"]) == 0
    printed = capsys.readouterr().out
    assert "network features: 4 channels, measured on 3 training case(s)" in printed
    assert "window-features output added, every other node and weight unchanged" in printed

    calibrated = load_model(out, device="cpu")
    stats = calibrated.spec.feature_stats
    assert stats.measured and stats.cases == tuple(cases) and stats.tensor == "a2"
    case = napari_medcl.read_image(data / "imagesTr" / "case_000_0000.nii.gz")
    plain = napari_medcl.predict(case, model, device="cpu", return_probabilities=True)
    judged = napari_medcl.predict(case, calibrated, device="cpu", return_probabilities=True)
    # The added output changes nothing the model already gave.
    assert np.array_equal(plain.labels.array, judged.labels.array)
    np.testing.assert_array_equal(plain.probabilities.array, judged.probabilities.array)
    assert plain.window_features is None
    windows = judged.provenance.to_dict()["tiling"]["windows"]
    assert judged.window_features.shape == (windows, 4)
    # A training case measures as calibrate measured it.
    assert judged.verdict.details["features"]["distance"] == pytest.approx(stats.case_medians[0], rel=1e-4)
    assert judged.verdict.details["severity"]["features"] == 0.0

    # The same case with its contrast inverted and scaled: the features move far from training.
    strange = case.with_array(np.asarray(case.array, np.float32).max() * 3 - case.array * 5)
    far = napari_medcl.predict(strange, calibrated, device="cpu")
    distance = far.verdict.details["features"]["distance"]
    assert distance > stats.reference
    severity = far.verdict.details["severity"]["features"]
    expected = math.log2(distance / stats.reference)
    assert severity == pytest.approx(
        expected / math.log2(1.5) if expected <= math.log2(1.5) else 1 + (expected - math.log2(1.5)), rel=1e-3
    )

    # Calibrating the calibrated file again keeps its output and re-measures.
    again = tmp_path / "again.onnx"
    assert main([str(out), str(data), "-o", str(again), "--cases", "case_003", "--features"]) == 0
    assert "graph and weights unchanged" in capsys.readouterr().out
    assert load_model(again, device="cpu").spec.feature_stats.cases == ("case_003",)


def test_calibrate_features_on_a_graph_without_a_bottleneck_is_one_line(tmp_path, capsys):
    model = save(pointwise_model(spec=make_spec(normalization=ZSCORE)), tmp_path / "model.onnx")
    data = make_msd_dataset(tmp_path / "tiny", n_cases=2, shape=(8, 8, 8), modality="MRI")
    out = tmp_path / "never.onnx"
    assert main([str(model), str(data), "-o", str(out), "--features"]) == 1
    err = capsys.readouterr().err
    assert "cannot add window features" in err and "no upsampling node" in err and "Traceback" not in err
    assert not out.exists()


def test_a_verdict_without_a_profile_ignores_features(conv_and_data, tmp_path):
    model, data = conv_and_data
    out = tmp_path / "features.onnx"
    assert main([str(model), str(data), "-o", str(out), "--features"]) == 0
    proto = onnx.load(str(out))
    entry = next(p for p in proto.metadata_props if p.key == "medcl.spec")
    spec = json.loads(entry.value)
    del spec["training_profile"]
    entry.value = json.dumps(spec)
    bare = save(proto, tmp_path / "bare.onnx")
    case = Volume(np.ones((12, 20, 18), np.float32), (2.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    assert napari_medcl.predict(case, bare, device="cpu").verdict.level == "unknown"
