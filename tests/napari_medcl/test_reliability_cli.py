"""medcl-predict under faults: stale temporary files, a case locked by another process, size budgets, case-name
collisions and Ctrl-C in a real process; and the training run folder's temp sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_medcl import cli
from napari_medcl.errors import InputError
from napari_medcl.io import read_image, write_image
from napari_medcl.volume import Volume
from tests.onnx_models import pointwise_model, save

ROOT = Path(__file__).parents[2]
THRESHOLD = 100.5  # images hold integers 0..200, so no voxel sits on the threshold
LOCKS = ".medcl-predict-locks"


def _image(path: Path, shape=(6, 19, 13), spacing=(1.0, 1.0, 1.0), seed=0) -> Path:
    array = np.random.default_rng(seed).integers(0, 201, size=shape).astype(np.float32)
    return write_image(Volume(array, spacing, (0.0, 0.0, 0.0), np.eye(3)), path)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save(
        pointwise_model(threshold=THRESHOLD, patch=(8, 8, 8)), tmp_path_factory.mktemp("m") / "pw.onnx"
    )


def _predict(*args: str | Path) -> int:
    return cli.main([*map(str, args), "--device", "cpu", "--quiet"])


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line and not line.startswith("review map:")]


def _age(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


# -- stale temporary files ----------------------------------------------------------------------------------


def test_run_removes_stale_temps_and_nothing_else(tmp_path, model, capsys):
    source = _image(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".scan_labels.1a2b3c4d.nii.gz", out / ".other.0badc0de.json"]
    for path in stale:
        path.write_bytes(b"half-written")
        _age(path, 120)
    # A temp another writer may still be filling, and names that only look alike: all stay.
    young = out / ".scan_entropy.deadbeef.nii.gz"
    young.write_bytes(b"being written")
    kept = [young]
    for name in (".notes.txt", ".scan.1a2b3c4.nii.gz", "mine.1a2b3c4d.nii.gz", ".scan.1A2B3C4D.nii.gz"):
        (out / name).write_bytes(b"user file")
        kept.append(_age(out / name, 600))
    (out / ".dir.1a2b3c4d.nii").mkdir()
    kept.append(_age(out / ".dir.1a2b3c4d.nii", 600))

    assert _predict(source, "-o", out, "--model", model) == 0
    err = capsys.readouterr().err
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    notices = [line for line in err.splitlines() if "temporary file" in line]
    assert notices == [
        f"medcl-predict: removed 2 temporary file(s) left by a killed run in {out}: "
        ".other.0badc0de.json, .scan_labels.1a2b3c4d.nii.gz"
    ]
    assert (out / "scan.json").is_file()


def test_training_run_setup_removes_temps_of_a_killed_run(tmp_path):
    """The run folder sweep happens before the data is even looked at (here: a missing dataset)."""
    from training.config import load_config
    from training.data import DatasetError
    from training.run import train

    out = tmp_path / "run"
    out.mkdir()
    temps = [".curves.1a2b3c4d.png", ".metrics.0badc0de.jsonl", ".checkpoint_best.12345678.pt"]
    for name in temps:
        (out / name).write_bytes(b"partial")
    (out / ".keep").write_text("")
    (out / "notes.txt").write_text("mine")
    overrides = [f"data.root={tmp_path / 'missing'}", "data.layout=folder2d", "train.device=cpu"]
    with pytest.raises(DatasetError):
        train(load_config(None, [*overrides, f"output.dir={out}"]))
    names = sorted(p.name for p in out.iterdir())
    assert not set(temps) & set(names)
    assert {".keep", "notes.txt"} <= set(names)


# -- one lock per case --------------------------------------------------------------------------------------


def _hold_lock(path: Path) -> subprocess.Popen:
    """A real process holding ``path`` with flock until it is killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.kill()
    holder.wait(timeout=30)
    holder.stdout.close()


def test_case_locked_by_another_process_is_not_touched(tmp_path, model, capsys):
    pytest.importorskip("fcntl", reason="POSIX flock; Windows uses msvcrt.locking")
    scan = _image(tmp_path / "scan.nii.gz")
    other = _image(tmp_path / "other.nii.gz", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"scan_labels.nii.gz": b"being rewritten elsewhere", "scan.json": b"{}"}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    holder = _hold_lock(out / LOCKS / "scan.lock")
    try:
        assert _predict(scan, other, "-o", out, "--model", model) == 0
    finally:
        _release(holder)
    assert capsys.readouterr().err.splitlines()[3:] == [  # after the banner
        f"medcl-predict: scan: being written by another medcl-predict process (lock {out / LOCKS / 'scan.lock'}); "
        "skipped"
    ]
    for name, data in earlier.items():
        assert (out / name).read_bytes() == data
    assert sorted(p.name for p in out.iterdir() if "scan" in p.name) == ["scan.json", "scan_labels.nii.gz"]
    assert (out / "other.json").is_file()

    # The holder was SIGKILLed: its lock file is still there, but no longer locked.
    assert (out / LOCKS / "scan.lock").exists()
    assert _predict(scan, other, "-o", out, "--model", model) == 0
    np.testing.assert_array_equal(
        read_image(out / "scan_labels.nii.gz").array, read_image(scan).array > THRESHOLD
    )
    # The run removes the lock files it held and those nobody holds, and then the empty lock folder.
    assert not (out / LOCKS).exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_sweep_keeps_the_temps_of_a_case_another_process_holds(tmp_path, model, capsys):
    pytest.importorskip("fcntl", reason="POSIX flock; Windows uses msvcrt.locking")
    source = _image(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    held = [out / ".busy_labels.1a2b3c4d.nii.gz", out / ".busy.0badc0de.json"]
    stale = [out / ".idle_labels.12345678.nii.gz", out / ".busy2.abcdef01.json"]
    for path in [*held, *stale]:
        path.write_bytes(b"half-written")
        _age(path, 3600)
    holder = _hold_lock(out / LOCKS / "busy.lock")
    try:
        assert _predict(source, "-o", out, "--model", model) == 0
        assert all(p.exists() for p in held)
        assert not any(p.exists() for p in stale)
        assert (out / LOCKS / "busy.lock").exists()  # the folder stays while another process uses it
    finally:
        _release(holder)
    notices = [line for line in capsys.readouterr().err.splitlines() if "temporary file" in line]
    assert notices == [
        f"medcl-predict: removed 2 temporary file(s) left by a killed run in {out}: "
        ".busy2.abcdef01.json, .idle_labels.12345678.nii.gz"
    ]


# -- size budgets -------------------------------------------------------------------------------------------


def test_max_voxels_and_max_bytes_flags_reach_the_reader(tmp_path, model, capsys):
    source = _image(tmp_path / "scan.nii.gz")  # 6 x 19 x 13 = 1482 float32 voxels, 5928 bytes
    out = tmp_path / "out"
    for flags in (["--max-voxels", "1481"], ["--max-bytes", "5927"]):
        assert _predict(source, "-o", out, "--model", model, *flags) == 1
        errors = _error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and errors[0].startswith(f"error: {source}: "), errors
        assert list(out.iterdir()) == []
    assert _predict(source, "-o", out, "--model", model, "--max-voxels", "1482", "--max-bytes", "5928") == 0
    assert _predict(source, "-o", out, "--model", model, "--max-voxels", "none", "--max-bytes", "none") == 0
    for bad in ("0", "-5", "1e9", "lots"):
        with pytest.raises(SystemExit) as info:
            cli.main([str(source), "-o", str(out), "--max-voxels", bad])
        assert info.value.code == 2


def test_help_shows_the_reader_defaults(capsys):
    import inspect

    defaults = inspect.signature(read_image).parameters
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {defaults['max_voxels'].default})" in text
    assert f"(default: {defaults['max_bytes'].default})" in text


@pytest.fixture(scope="module")
def fine_model(tmp_path_factory) -> Path:
    """A pointwise model trained at 0.1 mm: a 1 mm scan grows 1000-fold when resampled to it."""
    spec_model = pointwise_model(threshold=THRESHOLD, patch=(32, 32, 32), spacing=(0.1, 0.1, 0.1))
    return save(spec_model, tmp_path_factory.mktemp("fine") / "fine.onnx")


def test_resampled_size_is_checked_before_allocating(tmp_path, fine_model, monkeypatch):
    from napari_medcl import prediction

    def no_resampling(*args, **kwargs):
        raise AssertionError("resampled although over the budget")

    monkeypatch.setattr(prediction, "resample_linear", no_resampling)
    source = _image(tmp_path / "scan.nii.gz")  # 6 x 19 x 13 at 1 mm -> 60 x 190 x 130 at 0.1 mm
    with pytest.raises(InputError) as info:
        prediction.predict(source, fine_model, device="cpu", max_voxels=1_000_000)
    message = str(info.value)
    assert message.startswith(f"{source}: resampled to the spacing of model 'test-model' (0.1, 0.1, 0.1 mm)")
    assert "60x190x130 voxels x 1 channel(s)" in message
    assert "1482000 values > max_voxels 1000000" in message and "\n" not in message
    with pytest.raises(InputError, match=r"5928000 bytes of float32 > max_bytes 5000000\)$"):
        prediction.predict(source, fine_model, device="cpu", max_bytes=5_000_000)


def test_resampled_budget_in_the_cli(tmp_path, fine_model, capsys):
    source = _image(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert _predict(source, "-o", out, "--model", fine_model, "--max-voxels", "100000") == 1
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(f"error: {source}: resampled to the spacing"), errors
    assert "60x190x130" in errors[0] and "max_voxels 100000" in errors[0]
    assert list(out.iterdir()) == []


# -- two inputs, one case name ------------------------------------------------------------------------------


def test_case_name_collisions_are_refused_before_anything_runs(tmp_path, model, capsys, monkeypatch):
    from napari_medcl import prediction

    first = _image(tmp_path / "a.nii")
    other = _image(tmp_path / "b.mha")
    second = _image(tmp_path / "a.nii.gz", seed=1)
    third = _image(tmp_path / "a.nrrd", seed=2)
    real = prediction.predict_iter
    err_at_first_prediction: list[str] = []

    def recording(*args, **kwargs):
        if not err_at_first_prediction:
            err_at_first_prediction.append(capsys.readouterr().err)
        return real(*args, **kwargs)

    monkeypatch.setattr(prediction, "predict_iter", recording)
    out = tmp_path / "out"
    assert _predict(first, other, second, third, "-o", out, "--model", model) == 1
    errors = _error_lines(err_at_first_prediction[0])
    assert errors == [
        f"error: {path}: its outputs would overwrite those of {first} (same case name 'a'); "
        "rename one of them or run it into another output folder"
        for path in (second, third)
    ]
    assert _error_lines(capsys.readouterr().err) == []
    labels = read_image(out / "a_labels.nii").array
    np.testing.assert_array_equal(labels, read_image(first).array > THRESHOLD)
    assert sorted(p.name for p in out.glob("*.json")) == ["a.json", "b.json"]
    assert not list(out.glob("a_*.nii.gz")) and not list(out.glob("a_*.nrrd"))


# -- Ctrl-C in a real process -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_mid_run_exits_130_leaving_finished_cases_only(tmp_path, model, capsys):
    """A real medcl-predict process: while it runs, a second run skips the case it is writing; SIGINT in the
    middle of the second case stops it with exit 130 and one line, and only the first case's files stay."""
    first = _image(tmp_path / "first.nii.gz", shape=(8, 16, 16))
    slow = _image(tmp_path / "slow.nii.gz", shape=(64, 64, 64), seed=1)  # about 4 s with --tta here
    never = _image(tmp_path / "never.nii.gz", shape=(8, 16, 16), seed=2)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_medcl.cli", str(first), str(slow), str(never), "-o", str(out)]
    process = subprocess.Popen(
        [*command, "--model", str(model), "--device", "cpu", "--tta"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "first.json").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the first case never finished"
            time.sleep(0.02)
        # A second run asked for the case being written leaves it alone, and writes nothing.
        assert _predict(slow, "-o", out, "--model", model) == 0
        assert "slow: being written by another medcl-predict process" in capsys.readouterr().err
        time.sleep(0.3)
        assert process.poll() is None, "the slow case finished before the interrupt: make it slower"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    banner = 3  # version + model line, the error map it shows, intended-use note
    assert stderr.splitlines()[banner:] == ["medcl-predict: interrupted"], stderr
    assert stdout.startswith("first: ") and "slow" not in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "first.json",
        "first_entropy.nii.gz",
        "first_labels.nii.gz",
        "first_top_class_error.nii.gz",
        "first_uncertainty.nii.gz",
    ]
    labels = read_image(out / "first_labels.nii.gz").array
    np.testing.assert_array_equal(labels, read_image(first).array > THRESHOLD)
