"""The training-data profile and the per-case verdict: synthetic heads, the spec round trip, and the verdict
carried by predict, the CLI line and the sidecar."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import napari_medcl
from napari_medcl import cli
from napari_medcl.spec import ModelSpec, SpecError
from napari_medcl.training_profile import case_statistics, profile_cases
from napari_medcl.verdict import NO_PROFILE, NOISE_CAP, THRESHOLDS, Verdict, assess
from napari_medcl.volume import Volume
from tests.onnx_models import make_spec, pointwise_model, save

RESCALE = {"kind": "rescale", "low": 0.5, "high": 99.5, "use_nonzero_mask": True}
SHAPE = (40, 64, 64)


def head(seed: int, *, shape=SHAPE, spacing=(1.0, 1.0, 1.0), size: float = 1.0, noise: float = 4.0) -> Volume:
    """A skull-stripped synthetic 'brain': nested ellipsoids of CSF (60), GM (110), WM (160) with Gaussian
    noise of sd ``noise``, zero outside, about 10 voxels of zero border in-plane."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    r = np.sqrt((z / (0.8 * size)) ** 2 + (y / (0.72 * size)) ** 2 + (x / (0.66 * size)) ** 2)
    image = np.zeros(shape, dtype=np.float32)
    image[r < 1.0] = 60
    image[r < 0.85] = 110
    image[r < 0.6] = 160
    brain = image > 0
    image[brain] += rng.normal(0, noise, int(brain.sum())).astype(np.float32)
    image[brain] = np.maximum(image[brain], 1.0)  # stays non-zero inside
    return Volume(image, spacing, (0.0, 0.0, 0.0), np.eye(3))


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    base = make_spec(spacing=(1.0, 1.0, 1.0), normalization=RESCALE, nonzero_is_foreground=True)
    profile = profile_cases(
        [head(seed, size=size) for seed, size in ((1, 0.95), (2, 1.0), (3, 1.05), (4, 1.0))],
        base,
        channel_names=["T1"],
    )
    return dataclasses.replace(base, training_profile=profile)


def test_the_profile_describes_the_training_cases(spec):
    profile = spec.training_profile
    assert profile["cases"] == 4 and profile["modality"] == "MR" and profile["channel_names"] == ["T1"]
    assert profile["zero_outside_object"] and profile["border_zero_fraction"]["min"] == 1.0
    assert profile["spacing_mm"] == {"min": [1.0, 1.0, 1.0], "max": [1.0, 1.0, 1.0]}
    assert profile["fov_mm"]["max"] == [40.0, 64.0, 64.0]
    (channel,) = profile["intensity"]
    # rescale maps the 0.5-99.5 percentiles to 0-1: WM (most voxels) sits near the top
    assert 0.0 <= channel["pooled"][0] < channel["pooled"][3] < channel["pooled"][-1] <= 1.05
    low, high = profile["foreground_fraction"]["min"], profile["foreground_fraction"]["max"]
    assert 0.1 < low < high < 0.6


def test_a_case_like_training_is_ok(spec):
    verdict = assess(head(10), spec)
    assert verdict.level == "ok" and verdict.reasons == () and verdict.text == "ok"
    assert 0 <= verdict.score < 1


def test_a_head_with_a_non_zero_border_is_out_of_distribution(spec):
    volume = head(11)
    image = volume.array.copy()
    outside = image == 0
    image[outside] = 25 + np.random.default_rng(0).normal(0, 3, int(outside.sum())).clip(-20, 20)
    verdict = assess(volume.with_array(image), spec)
    assert verdict.level == "out-of-distribution"
    assert any(
        r.startswith("not skull-stripped or masked: 100% of the border ring is non-zero")
        and "border ring at most 0% non-zero" in r
        for r in verdict.reasons
    ), verdict.reasons
    assert verdict.details["severity"]["border"] >= 2


def test_thick_slices_name_the_thickness_and_the_resampling(spec):
    volume = head(12)
    thick = Volume(volume.array[::6], (6.5, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))  # 7 slices
    verdict = assess(thick, spec)
    assert verdict.level == "out-of-distribution"
    # 7 slices x 6.5 mm = 45.5 mm, at the model's 1 mm: 46 slices
    assert verdict.reasons[0] == "slices 6.5 mm thick, model trained at 1 mm: resampled 7 → 46 slices"
    # 2 mm slices are a routine resampling: no reason is given
    two = Volume(volume.array[::2], (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    assert assess(two, spec).level == "ok"


def test_inverted_contrast_is_out_of_distribution(spec):
    volume = head(13)
    image = volume.array.copy()
    brain = image != 0
    image[brain] = 220 - image[brain]
    verdict = assess(volume.with_array(image), spec)
    assert verdict.level == "out-of-distribution"
    assert verdict.reasons[0].startswith(
        "intensities unlike the training images after the model's normalisation"
    )
    assert verdict.details["severity"]["intensity"] >= 2


def test_constant_and_empty_images(spec):
    shape = SHAPE
    constant = assess(Volume(np.full(shape, 7.0, np.float32), (1.0,) * 3, (0.0,) * 3, np.eye(3)), spec)
    assert constant.level == "out-of-distribution"
    assert constant.reasons == ("the image is constant: every voxel is 7",)
    empty = assess(Volume(np.zeros(shape, np.int16), (1.0,) * 3, (0.0,) * 3, np.eye(3)), spec)
    assert empty.level == "out-of-distribution" and empty.reasons == ("the image is empty: every voxel is 0",)


def test_the_score_ranks_every_odd_case_above_the_typical_one(spec):
    typical = assess(head(14), spec).score
    volume = head(14)
    odd = [
        volume.with_array(np.where(volume.array == 0, 30.0, volume.array).astype(np.float32)),
        Volume(volume.array[::6], (6.5, 1.0, 1.0), (0.0,) * 3, np.eye(3)),
        volume.with_array(np.where(volume.array != 0, 220 - volume.array, 0).astype(np.float32)),
    ]
    assert all(assess(v, spec).score > typical + 1 for v in odd)


def test_sagittal_slices_get_a_caution(spec):
    volume = head(15)
    direction = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # axis 0 runs along x
    verdict = assess(Volume(volume.array, (1.0,) * 3, (0.0,) * 3, direction), spec)
    assert verdict.level == "caution"
    assert verdict.reasons == (
        "sagittal slices (array axes run x/y/z); the model was trained on axial slices (z/y/x)",
    )


@pytest.mark.parametrize("sigma", [2.0, 5.0, 12.0])
def test_the_noise_estimate_finds_the_noise_of_a_smooth_scan_with_edges(sigma):
    """A ramp and a curved background (which the estimate must not count as noise), a sharp-edged disc of
    +80 in it, and Gaussian noise of sd ``sigma``: the estimate is sigma over the foreground's p99 - p1."""
    rng = np.random.default_rng(7)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (6, 120, 120)), indexing="ij")
    clean = 100 + 30 * x + 20 * y**2 + 80 * ((x - 0.2) ** 2 + y**2 < 0.3)
    image = (clean + rng.normal(0, sigma, clean.shape)).astype(np.float32)
    low, high = np.percentile(image, (1, 99))
    (measured,) = case_statistics(Volume(image, (3.0, 1.0, 1.0), (0.0,) * 3, np.eye(3)), None)["noise"]
    assert measured == pytest.approx(sigma / (high - low), rel=0.12)
    # a 2D image is one plane
    (planar,) = case_statistics(Volume(image[2], (1.0, 1.0), (0.0,) * 2, np.eye(2)), None)["noise"]
    assert planar == pytest.approx(sigma / (high - low), rel=0.2)


def test_a_noisier_scan_gets_a_caution_that_says_so_and_noise_alone_is_never_out_of_distribution(spec):
    trained = spec.training_profile["noise_fraction"][0]
    assert 0 < trained["min"] <= trained["max"] < 0.06  # sd 4 over a span of about 110
    typical = assess(head(16), spec)
    assert typical.details["severity"]["noise"] < 0.5
    noisy = assess(head(16, noise=12.0), spec)
    assert noisy.level == "caution" and noisy.details["severity"]["noise"] >= 1.0
    assert any(r.startswith("noisier than the training images: voxel-to-voxel noise") for r in noisy.reasons)
    # the score ranks scans by how unlike training they are in kind: the noise sets the level, not the score
    severity = noisy.details["severity"]
    assert noisy.score == pytest.approx(sum(v for k, v in severity.items() if k != "noise"), abs=1e-3)
    assert noisy.score < noisy.details["severity"]["noise"]
    very = assess(head(16, noise=60.0), spec)
    assert very.details["severity"]["noise"] == NOISE_CAP
    assert very.details["measured"]["noise"][0] > noisy.details["measured"]["noise"][0]


def test_a_profile_without_noise_figures_skips_the_noise_check(spec):
    older = {k: v for k, v in spec.training_profile.items() if k != "noise_fraction"}
    verdict = assess(head(16, noise=12.0), spec, profile=older)
    assert "noise" not in verdict.details["severity"]
    assert not any("noisier" in r for r in verdict.reasons)


def test_thresholds_are_ordered():
    assert all(0 < caution < ood for caution, ood in THRESHOLDS.values())


def test_the_profile_round_trips_through_the_spec_json(spec):
    again = ModelSpec.from_json(spec.to_json())
    assert again.training_profile == spec.training_profile
    assert assess(head(10), again) == assess(head(10), spec)


def test_an_old_spec_without_a_profile_loads_and_gets_unknown(spec):
    old = {k: v for k, v in spec.to_dict().items() if k != "training_profile"}
    loaded = ModelSpec.from_json(json.dumps(old))
    assert loaded.training_profile is None
    assert "training_profile" not in loaded.to_dict()  # it reads and writes exactly as before the field
    verdict = assess(head(10), loaded)
    assert verdict == Verdict("unknown", (NO_PROFILE,))
    assert verdict.text == "unknown (this model file carries no training-data profile)"
    assert verdict.score is None


def test_a_newer_profile_format_is_kept_and_said_plainly(spec):
    newer = dataclasses.replace(spec, training_profile={"version": 99})
    verdict = assess(head(10), ModelSpec.from_json(newer.to_json()))
    assert verdict.level == "unknown" and "has format 99" in verdict.reasons[0]


@pytest.mark.parametrize(
    ("profile", "message"),
    [([1, 2], "must be an object"), ({"cases": 3}, "version"), ({"version": 1, "x": float("nan")}, "JSON")],
)
def test_a_malformed_profile_is_a_spec_error(profile, message):
    with pytest.raises(SpecError, match=message):
        dataclasses.replace(make_spec(), training_profile=profile)


# ------------------------------------------------------------------------------------------ wiring


@pytest.fixture(scope="module")
def model_path(spec, tmp_path_factory):
    return save(pointwise_model(spec=spec), tmp_path_factory.mktemp("model") / "profiled.onnx")


def test_predict_sets_the_verdict_in_the_prediction_and_its_provenance(model_path):
    thick = head(12)
    thick = Volume(thick.array[::6], (6.5, 1.0, 1.0), (0.0,) * 3, np.eye(3))
    prediction = napari_medcl.predict(thick, model_path, device="cpu")
    assert prediction.verdict.level == "out-of-distribution"  # and the prediction was still made
    assert prediction.labels.array.shape == thick.array.shape
    recorded = prediction.provenance["verdict"]
    assert recorded["level"] == "out-of-distribution" and recorded["reasons"] == list(
        prediction.verdict.reasons
    )
    assert 0 <= prediction.provenance["timings"]["verdict"] < 5
    assert napari_medcl.predict(head(10), model_path, device="cpu").verdict.level == "ok"


def test_the_cli_line_and_the_sidecar_carry_the_verdict(model_path, tmp_path, capsys):
    thick = head(12)
    path = napari_medcl.write_image(
        Volume(thick.array[::6], (6.5, 1.0, 1.0), (0.0,) * 3, np.eye(3)), tmp_path / "thick.nii.gz"
    )
    assert (
        cli.main([str(path), "-o", str(tmp_path / "out"), "--model", str(model_path), "--device", "cpu"]) == 0
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("thick: ")
    assert line.endswith(
        "verdict: out-of-distribution (slices 6.5 mm thick, model trained at 1 mm: resampled 7 → 46 slices)"
    )
    sidecar = json.loads((tmp_path / "out" / "thick.json").read_text())
    assert sidecar["verdict"]["level"] == "out-of-distribution" and sidecar["verdict"]["score"] > 2
    assert sidecar["report"]["verdict"]["level"] == "out-of-distribution"
    assert sidecar["report"]["verdict"]["reasons"] == sidecar["verdict"]["reasons"]
    assert (tmp_path / "out" / "thick_labels.nii.gz").is_file()  # the verdict refuses nothing


def test_a_model_without_a_profile_says_unknown_on_the_cli_line(tmp_path, capsys):
    model = save(pointwise_model(spec=make_spec(spacing=(1.0, 1.0, 1.0))), tmp_path / "plain.onnx")
    path = napari_medcl.write_image(head(10), tmp_path / "case.nii.gz")
    assert cli.main([str(path), "-o", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("verdict: unknown (this model file carries no training-data profile)")
