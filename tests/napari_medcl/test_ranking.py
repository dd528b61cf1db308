"""medcl-rank and napari_medcl.ranking: cases of known difficulty come out in order, out-of-distribution
scans first, an empty scan and an unreadable file last, with a plain reason per case, written atomically."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from napari_medcl.rank_cli import main
from napari_medcl.ranking import CSV_COLUMNS, rank_cases
from napari_medcl.training_profile import profile_cases
from napari_medcl.volume import Volume
from tests.dataset_factory import write_volume
from tests.onnx_models import make_spec, pointwise_model, save

SHAPE = (8, 24, 24)
NOISE = {"calm": 0.02, "noisy": 0.12, "noisier": 0.2, "noisiest": 0.3}


def blob(noise: float, seed: int, scale: float = 1.0) -> np.ndarray:
    """A bright ball (1.0) on a dark background (0.2) plus Gaussian noise: the pointwise model's threshold
    is 0.5, so more noise puts more voxels near it, where the model is unsure."""
    grid = np.indices(SHAPE, dtype=np.float32)
    centre = np.array(SHAPE, dtype=np.float32)[:, None, None, None] / 2
    inside = (((grid - centre) / np.array([3, 8, 8])[:, None, None, None]) ** 2).sum(0) <= 1
    rng = np.random.default_rng(seed)
    image = np.where(inside, 1.0, 0.2) + rng.normal(0, noise, SHAPE)
    return (scale * image).astype(np.float32)


@pytest.fixture
def cases(tmp_path) -> dict[str, Path]:
    # written in an order unlike the expected ranking
    order = ["noisy", "calm", "noisiest", "noisier"]
    return {
        name: write_volume(tmp_path / f"{name}.nii.gz", blob(NOISE[name], i)) for i, name in enumerate(order)
    }


def test_noisier_cases_rank_first_with_their_expected_errors(tmp_path, cases):
    model = save(pointwise_model(k=10.0, maps=()), tmp_path / "model.onnx")
    ranks = rank_cases(list(cases.values()), model, device="cpu", backend="onnxruntime")
    assert [r.case for r in ranks] == ["noisiest", "noisier", "noisy", "calm"]
    assert [r.rank for r in ranks] == [1, 2, 3, 4]
    fractions = [r.expected_wrong_fraction for r in ranks]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > 2 * fractions[-1]
    for r in ranks:
        assert r.status == "ranked" and r.verdict == "unknown" and r.unit == "mL"
        assert r.reason.startswith("training-data check not possible (no profile in the model); expected ")
        assert f"{100 * r.expected_wrong_fraction:.1f}% of foreground voxels wrong" in r.reason
        assert r.foreground_voxels > 0 and r.model == "test-model" and len(r.model_sha256) == 64


def test_out_of_distribution_first_empty_scan_and_bad_file_last(tmp_path, cases, capsys):
    spec = make_spec(maps=())
    training = [
        Volume(blob(n, 10 + i), (1.0,) * 3, (0.0,) * 3, np.eye(3)) for i, n in enumerate(NOISE.values())
    ]
    spec = dataclasses.replace(spec, training_profile=profile_cases(training, spec.normalization))
    model = save(pointwise_model(k=10.0, spec=spec), tmp_path / "profiled.onnx")
    # bright: four times the intensities, so the model is sure of itself there, but it never saw such a scan
    bright = write_volume(tmp_path / "bright.nii.gz", blob(0.02, 20, scale=4.0))
    empty = write_volume(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.float32))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file at all")
    inputs = [broken, cases["calm"], empty, bright, cases["noisiest"]]
    out = tmp_path / "ranking.csv"

    code = main(
        [
            *map(str, inputs),
            "-o",
            str(out),
            "--model",
            str(model),
            "--device",
            "cpu",
            "--backend",
            "onnxruntime",
        ]
    )

    assert code == 1  # a case failed; the others are ranked and written
    captured = capsys.readouterr()
    problem_lines = [line for line in captured.err.splitlines() if line.startswith("medcl-rank: ")]
    assert len(problem_lines) == 1 and "broken.nii.gz" in problem_lines[0]
    assert "Traceback" not in captured.err
    assert "most informative: bright (out-of-distribution: " in captured.out
    with open(out, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [r["case"] for r in rows] == ["bright", "noisiest", "calm", "empty", "broken"]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[0]["verdict"] == "out-of-distribution"
    assert rows[0]["reason"].startswith("out-of-distribution: intensities unlike the training images")
    assert "% of foreground voxels wrong" in rows[0]["reason"]
    assert rows[1]["reason"].startswith("like the model's training data; expected ")
    assert rows[3]["reason"].startswith("nothing to label: the image is empty")
    assert rows[4]["status"] == "failed" and "broken.nii.gz" in rows[4]["reason"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically, no leftovers


def test_usage_and_model_errors_exit_2_with_one_line(tmp_path, cases, capsys):
    out = tmp_path / "ranking.csv"
    assert main([str(cases["calm"]), "-o", str(out), "--model", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.onnx" in err[0]
    model = save(pointwise_model(maps=()), tmp_path / "model.onnx")
    assert main([str(cases["calm"]), "-o", str(out), "--model", str(model), "--overlap", "1.5"]) == 2
    assert "overlap must be in [0, 1)" in capsys.readouterr().err
    assert not out.exists()
