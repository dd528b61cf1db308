"""Real file-system faults: a full disk (ENOSPC) and a read-only output folder, on a small tmpfs mounted for
each test, for a real ``medcl-predict`` process and for training checkpoints.

CI runs the suite as root on a VM where ``mount -t tmpfs`` and ``mount -o remount,ro`` work, so these tests
run there. The ``small_disk`` fixture skips only where mounting is impossible (not root, or a container
without the capability: "permission denied"), naming the reason. ``test_atomic.py`` simulates the same
errors without root.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from napari_medcl import cli
from napari_medcl.atomic import is_temp_name
from napari_medcl.errors import OutputError
from napari_medcl.io import write_image
from napari_medcl.volume import Volume
from tests.onnx_models import pointwise_model, save

ROOT = Path(__file__).parents[2]
THRESHOLD = 100.5  # images hold integers 0..200, so no voxel sits on the threshold
# Room for the earlier output of a 4x8x8 case (four files, one 4 KiB page each) but not for that of a 64^3
# case: its random labels alone compress to about 40 KB, its two maps to about 4 KB and 17 KB.
DISK_BYTES = 64 * 1024
BANNER = 3  # version + model line, the error map it shows, intended-use note


def _mount(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *map(str, args)], capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """An empty tmpfs of DISK_BYTES mounted under tmp_path; unmounted afterwards whatever happened."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root; this is uid {getattr(os, 'geteuid', lambda: '?')()}")
    mounted = _mount("-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", mount_point)
    if mounted.returncode != 0:
        if "permission denied" in mounted.stderr.lower():
            pytest.skip(f"root may not mount here (no CAP_SYS_ADMIN?): {mounted.stderr.strip()}")
        pytest.fail(f"mount -t tmpfs failed: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        unmounted = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True, timeout=30)
        if unmounted.returncode != 0:
            # Something still holds a file open there: detach anyway, and say so.
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)
            pytest.fail(f"umount {mount_point} failed (lazily detached): {unmounted.stderr.strip()}")


def _read_only(mount_point: Path) -> None:
    remounted = _mount("-o", "remount,ro", mount_point)
    assert remounted.returncode == 0, remounted.stderr


def _image(path: Path, shape: tuple[int, ...], seed: int) -> Path:
    array = np.random.default_rng(seed).integers(0, 201, size=shape).astype(np.float32)
    return write_image(Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)), path)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    return save(pointwise_model(threshold=THRESHOLD, patch=(32, 32, 32)), folder / "pw.onnx")


@pytest.fixture(scope="module")
def earlier_output(tmp_path_factory, model) -> dict[str, bytes]:
    """The five files medcl-predict wrote for a small case 'scan' on an ordinary disk, by name."""
    folder = tmp_path_factory.mktemp("earlier")
    source = _image(folder / "scan.nii.gz", (4, 8, 8), seed=0)
    out = folder / "out"
    assert cli.main([str(source), "-o", str(out), "--model", str(model), "--device", "cpu", "--quiet"]) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(files) == [
        "scan.json",
        "scan_entropy.nii.gz",
        "scan_labels.nii.gz",
        "scan_top_class_error.nii.gz",
        "scan_uncertainty.nii.gz",
    ]
    return files


@pytest.fixture
def new_case(tmp_path) -> Path:
    """A later, larger scan with the same case name, on an ordinary disk."""
    folder = tmp_path / "new"
    folder.mkdir()
    return _image(folder / "scan.nii.gz", (64, 64, 64), seed=1)


def _place(files: dict[str, bytes], folder: Path) -> None:
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _predict(source: Path, out: Path, model: Path) -> subprocess.CompletedProcess:
    """The medcl-predict console script in its own process (the module where no script is installed)."""
    script = Path(sys.executable).with_name("medcl-predict")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "napari_medcl.cli"]
    return subprocess.run(
        [*command, str(source), "-o", str(out), "--model", str(model), "--device", "cpu", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


# -- medcl-predict ------------------------------------------------------------------------------------------


def test_full_disk_keeps_the_earlier_output_of_the_case(small_disk, model, earlier_output, new_case):
    out = small_disk / "out"
    _place(earlier_output, out)
    assert sum(len(data) for data in earlier_output.values()) < DISK_BYTES // 4

    result = _predict(new_case, out, model)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    # NIfTI's C library may print its own "** ERROR: NWAD: wrote only ..." straight to the process's stderr,
    # depending on where the gzip stream hits the limit; what is ours is exactly one line.
    errors = [line for line in result.stderr.splitlines()[BANNER:] if not line.startswith("** ERROR: NWAD")]
    assert len(errors) == 1, result.stderr
    # The labels fit, the uncertainty map did not: written and renamed one by one, the new labels would have
    # replaced the old ones. ITK returned without an error; write_image's read-back found the file cut short.
    assert errors[0].startswith(f"error: {new_case}: {out / 'scan_uncertainty.nii.gz'}: disk full: "), errors
    assert errors[0].endswith(
        "(the written file reads back with other voxel values); the earlier files of this case are unchanged"
    ), errors
    assert _contents(out) == earlier_output  # byte for byte, and nothing else: no temporary or lock file
    assert not any(is_temp_name(p.name) for p in out.iterdir())


def test_read_only_folder_keeps_the_earlier_output(small_disk, model, earlier_output, new_case):
    out = small_disk / "out"
    _place(earlier_output, out)
    _read_only(small_disk)

    result = _predict(new_case, out, model)

    assert result.returncode == 1, result.stderr
    # The lock file is the first thing a run writes, so it fails before the banner.
    assert result.stderr.splitlines() == [
        f"error: {out}: cannot write in the output folder (Read-only file system)"
    ], result.stderr
    assert _contents(out) == earlier_output
    assert not any(is_temp_name(p.name) for p in out.iterdir())


# -- training checkpoints -----------------------------------------------------------------------------------


def _checkpoint_state(epoch: int, weights: int) -> dict:
    import torch

    from training.checkpoint import CHECKPOINT_FORMAT
    from training.config import CONFIG_VERSION

    return {
        "format": CHECKPOINT_FORMAT,
        "config_version": CONFIG_VERSION,
        "config": {},
        "epoch": epoch,
        "model": {"weight": torch.arange(weights, dtype=torch.float32)},
        "losses": {},
        "optimizer": {},
        "scheduler": {},
        "scaler": None,
        "rng": {},
        "sampler": {"seed": 0, "epoch": epoch},
        "spec": {},
        "history": [],
        "best": {"epoch": epoch, "mean_dice": 0.5},
    }


def test_full_disk_keeps_the_previous_checkpoint(small_disk):
    from training.checkpoint import load_checkpoint, save_checkpoint

    final = small_disk / "checkpoint_last.pt"
    save_checkpoint(_checkpoint_state(epoch=1, weights=100), final)
    previous = final.read_bytes()

    with pytest.raises(OutputError) as caught:
        save_checkpoint(_checkpoint_state(epoch=2, weights=100_000), final)  # 400 KB of weights

    message = str(caught.value)
    assert caught.value.path == final and "\n" not in message
    assert message == f"{final}: disk full (No space left on device); the previous file, if any, is unchanged"
    assert final.read_bytes() == previous
    assert os.listdir(small_disk) == [final.name]
    assert load_checkpoint(final)["epoch"] == 1


def test_read_only_folder_keeps_the_previous_checkpoint(small_disk):
    from training.checkpoint import load_checkpoint, save_checkpoint

    final = small_disk / "checkpoint_last.pt"
    save_checkpoint(_checkpoint_state(epoch=1, weights=100), final)
    previous = final.read_bytes()
    _read_only(small_disk)

    with pytest.raises(OutputError) as caught:
        save_checkpoint(_checkpoint_state(epoch=2, weights=100), final)

    assert str(caught.value) == (f"{final}: cannot write in folder {small_disk} (Read-only file system)")
    assert final.read_bytes() == previous
    assert os.listdir(small_disk) == [final.name]
    assert load_checkpoint(final)["epoch"] == 1


@pytest.mark.parametrize("name", ["map.nii.gz", "map.nii", "map.nrrd"])
def test_write_image_refuses_a_cut_file_on_a_full_disk(small_disk, name):
    """The napari writer and the widget's save go through write_image alone: its own read-back must catch
    ITK's NIfTI writer leaving a cut file on a full disk without an error."""
    old = Volume(np.zeros((2, 2, 2), np.float32), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    write_image(old, small_disk / name)
    before = (small_disk / name).read_bytes()
    noise = np.random.default_rng(0).random((40, 40, 40), dtype=np.float32)  # 256 KB, incompressible
    with pytest.raises(OutputError, match="disk full") as caught:
        write_image(Volume(noise, (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3)), small_disk / name)
    assert str(small_disk / name) in str(caught.value)
    assert (small_disk / name).read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == [name]
