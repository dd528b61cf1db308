"""medcl-predict end to end: every input format against the threshold oracle, sidecars, bad inputs, exit codes."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medcl import cli
from napari_medcl.errors import OutputError
from napari_medcl.io import read_image
from napari_medcl.onnx_session import cuda_unavailable_reason
from tests.onnx_models import pointwise_model, save

THRESHOLD = 100.5  # images hold integers 0..200, so no voxel sits on the threshold
POINTWISE_K = 50.0  # pointwise_model's default logit slope
SPACING_XYZ = (0.7, 0.85, 2.5)
ORIGIN_XYZ = (-20.0, 13.5, 7.25)


def _rotation(seed: int = 4) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _values(shape, seed=0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 201, size=shape).astype(dtype)


def _itk_3d(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    image.SetDirection(_rotation().ravel().tolist())
    return image


def _write_dicom(folder: Path, array: np.ndarray) -> None:
    """An int16 CT series, one file per slice, oblique and anisotropic (positions to 6 decimals)."""
    folder.mkdir()
    direction = _rotation()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.7.1"
    for k, plane in enumerate(array):
        position = np.asarray(ORIGIN_XYZ) + direction[:, 2] * SPACING_XYZ[2] * k
        image = sitk.GetImageFromArray(plane.astype(np.int16))
        image.SetSpacing(SPACING_XYZ[:2])
        for tag, value in {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{k + 1}",
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": "\\".join(f"{c:.6f}" for c in (*direction[:, 0], *direction[:, 1])),
            "0028|0030": f"{SPACING_XYZ[1]:.6f}\\{SPACING_XYZ[0]:.6f}",
        }.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {
        3: save(pointwise_model(threshold=THRESHOLD, patch=(8, 8, 8)), folder / "pw3.onnx"),
        2: save(pointwise_model(threshold=THRESHOLD, spatial_dims=2, patch=(16, 16)), folder / "pw2.onnx"),
        "nospec": save(pointwise_model(with_spec=False), folder / "nospec.onnx"),
    }


def _make_input(kind: str, folder: Path) -> Path:
    shape = (6, 19, 13)
    if kind == "dicom":
        path = folder / "ct_series"
        _write_dicom(path, _values(shape, dtype=np.int16))
        return path
    if kind == "png":
        path = folder / "photo.png"
        sitk.WriteImage(sitk.GetImageFromArray(_values((23, 31), dtype=np.uint8)), str(path))
        return path
    path = folder / {"nii.gz": "scan.nii.gz", "nii": "scan.nii", "nrrd": "scan.nrrd", "mha": "scan.mha"}[kind]
    sitk.WriteImage(_itk_3d(_values(shape)), str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "label_ext", "map_ext"),
    [
        ("nii.gz", ".nii.gz", ".nii.gz"),
        ("nii", ".nii", ".nii"),
        ("nrrd", ".nrrd", ".nrrd"),
        ("mha", ".mha", ".mha"),
        ("dicom", ".nii.gz", ".nii.gz"),
        ("png", ".png", ".tif"),
    ],
)
def test_formats_match_the_oracle_with_the_input_geometry(
    tmp_path, model_files, capsys, kind, label_ext, map_ext
):
    source = _make_input(kind, tmp_path)
    model = model_files[2 if kind == "png" else 3]
    out = tmp_path / "out"
    assert cli.main([str(source), "-o", str(out), "--model", str(model), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "For research use only" in captured.err  # the intended-use banner
    case = "ct_series" if kind == "dicom" else source.name.split(".")[0]
    assert captured.out.startswith((f"{case}: CPUExecutionProvider", f"{case}: OpenVINO CPU"))

    image = read_image(source)
    labels = read_image(out / f"{case}_labels{label_ext}")
    np.testing.assert_array_equal(labels.array, image.array > THRESHOLD)
    assert labels.array.dtype == np.uint8
    atol = 1e-4 if kind == "dicom" else 1e-5
    entropy = read_image(out / f"{case}_entropy{map_ext}")
    uncertainty = read_image(out / f"{case}_uncertainty{map_ext}")
    top_error = read_image(out / f"{case}_top_class_error{map_ext}")
    for output in (labels, entropy, uncertainty, top_error):
        assert output.same_geometry(image, atol=atol), output.geometry_dict()
        assert output.spatial_dims == image.spatial_dims
    assert entropy.array.dtype == np.float32 and entropy.array.min() >= 0 and entropy.array.max() <= 1
    # pointwise model: p(class 1) = sigmoid(k (x - threshold)), so the label's error is 1 - max(p0, p1),
    # which is sigmoid(-k |x - threshold|).
    margin = np.abs(image.array.astype(np.float64) - THRESHOLD)
    assert top_error.array.dtype == np.float32
    expected = np.exp(-POINTWISE_K * margin) / (1 + np.exp(-POINTWISE_K * margin))
    np.testing.assert_allclose(top_error.array, expected, atol=atol)

    sidecar = json.loads((out / f"{case}.json").read_text(encoding="utf-8"))
    assert sidecar["version"] == "0.1.0"
    assert sidecar["model"]["name"] == "test-model"
    assert sidecar["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert sidecar["execution_provider"].startswith(("CPUExecutionProvider", "OpenVINO CPU"))
    assert sidecar["input"]["path"] == str(source)
    if kind != "dicom":
        assert sidecar["input"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    else:
        assert len(sidecar["input"]["sha256"]) == 64
    np.testing.assert_allclose(sidecar["input"]["geometry"]["spacing"], image.spacing)
    assert sidecar["input"]["geometry"]["shape"] == list(image.spatial_shape)
    assert sidecar["tiling"]["overlap"] == 0.5 and sidecar["tiling"]["windows"] >= 1
    assert sidecar["tiling"]["batch_size"] == 1  # the default on a CPU
    assert {"read", "preprocess", "inference", "ort_seconds", "postprocess", "total", "write"} <= set(
        sidecar["timings"]
    )
    assert sidecar["intended_use"].startswith("For research use only")
    assert sidecar["outputs"] == {
        "labels": f"{case}_labels{label_ext}",
        "uncertainty": f"{case}_uncertainty{map_ext}",
        "entropy": f"{case}_entropy{map_ext}",
        "top_class_error": f"{case}_top_class_error{map_ext}",
    }
    assert sorted(p.name for p in out.iterdir()) == sorted([*sidecar["outputs"].values(), f"{case}.json"])


def test_probabilities_one_file_per_class_and_quiet(tmp_path, model_files, capsys):
    source = _make_input("mha", tmp_path)
    out = tmp_path / "out"
    args = [str(source), "-o", str(out), "--model", str(model_files[3]), "--save-probabilities", "--quiet"]
    assert cli.main([*args, "--overlap", "0.25", "--tta", "--batch-size", "3"]) == 0
    assert capsys.readouterr().out == ""
    sidecar = json.loads((out / "scan.json").read_text(encoding="utf-8"))
    assert sidecar["tiling"]["batch_size"] == 3
    assert sidecar["outputs"]["probabilities"] == {
        "background": "scan_probabilities_0.mha",
        "class1": "scan_probabilities_1.mha",
    }
    assert sidecar["tiling"]["tta"] is True and sidecar["tiling"]["overlap"] == 0.25
    p0 = read_image(out / "scan_probabilities_0.mha").array
    p1 = read_image(out / "scan_probabilities_1.mha").array
    np.testing.assert_allclose(p0 + p1, 1.0, atol=1e-5)
    np.testing.assert_array_equal(p1 > 0.5, read_image(source).array > THRESHOLD)


# -- bad inputs ---------------------------------------------------------------------------------------------


def _bad_input(kind: str, folder: Path) -> Path:
    if kind == "empty":
        (folder / "empty.nii.gz").write_bytes(b"")
        return folder / "empty.nii.gz"
    if kind == "truncated":
        sitk.WriteImage(_itk_3d(_values((8, 9, 10))), str(folder / "full.nii"))
        data = gzip.compress((folder / "full.nii").read_bytes())
        (folder / "full.nii").unlink()
        (folder / "cut.nii.gz").write_bytes(data[: len(data) // 2])
        return folder / "cut.nii.gz"
    if kind == "wrong-extension":
        sitk.WriteImage(sitk.GetImageFromArray(_values((8, 8), dtype=np.uint8)), str(folder / "real.png"))
        (folder / "real.png").rename(folder / "photo.nii")
        return folder / "photo.nii"
    if kind == "4d":
        frames = [sitk.GetImageFromArray(_values((3, 4, 5))) for _ in range(2)]
        sitk.WriteImage(sitk.JoinSeries(frames), str(folder / "fmri.nii.gz"))
        return folder / "fmri.nii.gz"
    if kind == "nan":
        array = _values((4, 5, 6))
        array[1, 2, 3] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / "nan.nii.gz"))
        return folder / "nan.nii.gz"
    if kind == "no-dicom":
        (folder / "notes").mkdir()
        (folder / "notes" / "readme.txt").write_text("no images here")
        return folder / "notes"
    if kind == "missing":
        return folder / "absent.nii.gz"
    raise ValueError(kind)


BAD_KINDS = ["empty", "truncated", "wrong-extension", "4d", "nan", "no-dicom", "missing"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_is_one_line_naming_the_file_and_writes_nothing(tmp_path, model_files, capsys, kind):
    source = _bad_input(kind, tmp_path)
    out = tmp_path / "out"
    assert cli.main([str(source), "-o", str(out), "--model", str(model_files[3])]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {source}: "), errors
    assert list(out.iterdir()) == []


def test_model_without_spec_is_one_line_and_writes_nothing(tmp_path, model_files, capsys):
    source = _make_input("nrrd", tmp_path)
    out = tmp_path / "out"
    assert cli.main([str(source), "-o", str(out), "--model", str(model_files["nospec"])]) == 1
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"error: {model_files['nospec']}: has no medcl.spec metadata; export it with medcl-export"
    )
    assert not out.exists()


def test_console_script_continues_after_bad_cases_without_traceback(tmp_path, model_files):
    """One real process: every bad input fails alone, the good case is written, exit status 1."""
    bad = [_bad_input(kind, tmp_path) for kind in BAD_KINDS]
    good = _make_input("nii.gz", tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_medcl.cli", *map(str, bad[:3]), str(good), *map(str, bad[3:])]
    result = subprocess.run(
        [*command, "-o", str(out), "--model", str(model_files[3])],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert [line.split(": ")[1] for line in errors] == [str(p) for p in bad]
    assert "[E:onnxruntime" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "scan.json",
        "scan_entropy.nii.gz",
        "scan_labels.nii.gz",
        "scan_top_class_error.nii.gz",
        "scan_uncertainty.nii.gz",
    ]


def test_same_case_name_twice_is_refused_for_the_second(tmp_path, model_files, capsys):
    first = _make_input("nii", tmp_path)
    second = _make_input("nii.gz", tmp_path)
    out = tmp_path / "out"
    assert cli.main([str(first), str(second), "-o", str(out), "--model", str(model_files[3])]) == 1
    err = capsys.readouterr().err
    assert f"error: {second}: its outputs would overwrite those of {first}" in err
    assert (out / "scan_labels.nii").exists() and not (out / "scan_labels.nii.gz").exists()


def test_failed_write_removes_what_the_case_wrote(tmp_path, model_files, capsys, monkeypatch):
    from napari_medcl import io

    real_write = io.write_image

    def failing_write(volume, path):
        if "_entropy" in Path(path).name and "scan" in Path(path).name:
            raise OutputError(path, "disk full (simulated)")
        return real_write(volume, path)

    monkeypatch.setattr(io, "write_image", failing_write)
    failing = _make_input("nrrd", tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    fine = _make_input("mha", other)
    fine = fine.rename(other / "fine.mha")
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan.json").write_text(
        "{}"
    )  # the earlier case stays as it was: nothing new is renamed into place
    assert cli.main([str(failing), str(fine), "-o", str(out), "--model", str(model_files[3])]) == 1
    err = capsys.readouterr().err
    assert f"error: {failing}: {out / 'scan_entropy.nrrd'}: disk full (simulated)" in err
    assert (out / "scan.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == [
        "fine.json",
        "fine_entropy.mha",
        "fine_labels.mha",
        "fine_top_class_error.mha",
        "fine_uncertainty.mha",
        "scan.json",
    ]


def test_usage_errors_exit_2(tmp_path, capsys):
    for argv in (
        [],
        ["x.nii"],
        ["x.nii", "-o", "o", "--overlap", "1.5"],
        ["x.nii", "-o", "o", "--device", "tpu"],
        ["x.nii", "-o", "o", "--batch-size", "0"],
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "must be in [0, 1)" in err and "--batch-size: must be at least 1, got 0" in err


def test_interrupt_exits_130(tmp_path, model_files, capsys, monkeypatch):
    from napari_medcl import prediction

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(prediction, "predict_iter", interrupted)
    source = _make_input("mha", tmp_path)
    assert cli.main([str(source), "-o", str(tmp_path / "out"), "--model", str(model_files[3])]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_cuda_request_on_a_machine_without_cuda(tmp_path, model_files, capsys):
    if cuda_unavailable_reason() is None:
        pytest.skip("CUDA loads here")
    source = _make_input("mha", tmp_path)
    assert (
        cli.main(
            [str(source), "-o", str(tmp_path / "out"), "--model", str(model_files[3]), "--device", "cuda"]
        )
        == 1
    )
    assert "cuda was requested but CUDA cannot be used" in capsys.readouterr().err


def test_missing_default_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from napari_medcl import onnx_session

    monkeypatch.setattr(onnx_session, "MODELS_DIR", tmp_path / "no-models")
    assert cli.main([str(tmp_path / "x.nii"), "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: no bundled default model yet; pass a model file (--model PATH.onnx)"
    )
    assert not (tmp_path / "out").exists()


def test_an_input_warning_is_one_line(tmp_path, capsys):
    """A model trained on masked scans (nonzero_is_foreground) given a scan without zero voxels: the CLI
    says so in one line starting with "warning:", and still writes its outputs."""
    from tests.onnx_models import nearest_class_model

    model = save(
        nearest_class_model(3, nonzero_is_foreground=True, patch=(4, 8, 8), maps=()), tmp_path / "m.onnx"
    )
    scan = sitk.GetImageFromArray(np.full((6, 10, 9), 0.3, np.float32))
    sitk.WriteImage(scan, str(tmp_path / "unmasked.nii.gz"))
    code = cli.main([str(tmp_path / "unmasked.nii.gz"), "--model", str(model), "-o", str(tmp_path / "out")])
    assert code == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "no voxel is zero" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "unmasked.nii.gz" in warned[0]
    assert not any("InputWarning" in line or ".py:" in line for line in err)
    assert (tmp_path / "out" / "unmasked_labels.nii.gz").is_file()


def test_a_bug_is_an_internal_error_with_its_traceback_logged(tmp_path, capsys, monkeypatch, model_files):
    """Anything that is not a MedclError is reported as napari-medcl's bug, in one line naming the log file
    that holds its traceback, and the other cases still run."""
    from napari_medcl import prediction

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = prediction.predict_iter
    calls = []

    def broken_once(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise KeyError("an internal slip")
        return real(*args, **kwargs)

    monkeypatch.setattr(prediction, "predict_iter", broken_once)
    first, second = tmp_path / "first.nii.gz", tmp_path / "second.nii.gz"
    for path in (first, second):
        sitk.WriteImage(_itk_3d(_values((6, 19, 13))), str(path))
    model = model_files[3]
    code = cli.main([str(first), str(second), "--model", str(model), "-o", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    line = next(line for line in err.splitlines() if "internal error" in line)
    assert "KeyError" in line and "Traceback" not in err
    log = Path(line.rsplit("traceback in ", 1)[1])
    assert log.parent == tmp_path / "cache" / "napari-medcl" / "logs"
    assert "an internal slip" in log.read_text(encoding="utf-8") and "Traceback" in log.read_text(
        encoding="utf-8"
    )
    assert (tmp_path / "out" / "second.json").is_file() and not (tmp_path / "out" / "first.json").exists()


def test_two_bugs_in_one_run_get_two_logs(tmp_path, monkeypatch):
    from napari_medcl.crash_log import internal_error_message

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lines = [internal_error_message("medcl-predict", KeyError(f"slip {k}")) for k in range(2)]
    logs = [Path(line.rsplit("traceback in ", 1)[1]) for line in lines]
    assert logs[0] != logs[1]
    assert [
        "slip 0" in logs[0].read_text(encoding="utf-8"),
        "slip 1" in logs[1].read_text(encoding="utf-8"),
    ] == [
        True,
        True,
    ]
