"""Atomic writes: complete file or previous file, never a partial one, never a stray temporary file."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from napari_medcl.atomic import (
    atomic_path,
    is_temp_name,
    split_suffix,
    sweep_stale_temps,
    write_bytes_atomic,
    write_text_atomic,
)
from napari_medcl.errors import OutputError


@pytest.fixture
def umask():
    """Set the process umask for one test and put the previous one back."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("scan.nii.gz", ("scan", ".nii.gz")),
        ("scan.NII.GZ", ("scan", ".NII.GZ")),
        ("ckpt.epoch3.pt", ("ckpt.epoch3", ".pt")),
        ("case.v2.nrrd", ("case.v2", ".nrrd")),
        ("data.gz", ("data", ".gz")),
        ("README", ("README", "")),
    ],
)
def test_split_suffix_keeps_compressed_extensions_whole(name, expected):
    assert split_suffix(name) == expected


def test_temp_file_sits_beside_final_with_real_extension(tmp_path):
    final = tmp_path / "scan.nii.gz"
    with atomic_path(final) as temp:
        assert temp.parent == final.parent
        assert temp.name.startswith(".scan.") and temp.name.endswith(".nii.gz")
        assert temp.exists() and not final.exists()
        temp.write_bytes(b"new")
    assert final.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["scan.nii.gz"]


def test_replaces_existing_file(tmp_path):
    final = tmp_path / "sidecar.json"
    final.write_text("old")
    assert write_text_atomic(final, '{"ok": true}') == final
    assert final.read_text(encoding="utf-8") == '{"ok": true}'
    write_bytes_atomic(final, b"\x00\x01")
    assert final.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["sidecar.json"]


@pytest.mark.parametrize("error", [ValueError("writer failed"), KeyboardInterrupt()])
def test_failure_in_body_keeps_old_file_and_removes_temp(tmp_path, error):
    final = tmp_path / "labels.nii.gz"
    final.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_path(final) as temp:
        temp.write_bytes(b"half-writ")
        raise error
    assert final.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["labels.nii.gz"]


def test_disk_full_in_body_is_output_error_naming_file(tmp_path):
    final = tmp_path / "checkpoint.pt"
    final.write_bytes(b"previous checkpoint")
    with pytest.raises(OutputError) as caught, atomic_path(final) as temp:
        temp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = str(caught.value)
    assert "checkpoint.pt" in message and "disk full" in message and "\n" not in message
    assert caught.value.path == final
    assert final.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_final_path_is_a_folder(tmp_path):
    final = tmp_path / "out.nii.gz"
    final.mkdir()
    with pytest.raises(OutputError, match="out.nii.gz: is a folder"), atomic_path(final):
        pytest.fail("the body must not run")
    assert os.listdir(tmp_path) == ["out.nii.gz"]
    assert os.listdir(final) == []


def test_folder_made_a_file_name_after_start_is_output_error(tmp_path):
    final = tmp_path / "out.mha"
    with pytest.raises(OutputError, match="out.mha"), atomic_path(final) as temp:
        temp.write_bytes(b"data")
        final.mkdir()  # os.replace cannot put a file over a folder
    assert os.listdir(tmp_path) == ["out.mha"]


def test_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_bytes_atomic(tmp_path / "gone" / "x.json", b"{}")
    assert os.listdir(tmp_path) == []


def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.write_bytes(b"")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip(
                "running as root: a read-only folder is still writable "
                "(tests/napari_medcl/test_disk_faults.py covers root with a read-only remount of a tmpfs)"
            )
        with pytest.raises(OutputError, match="cannot write in folder"):
            write_bytes_atomic(folder / "x.json", b"{}")
    finally:
        folder.chmod(0o755)


def test_permission_error_when_creating_temp_is_output_error(tmp_path, monkeypatch):
    """Root ignores chmod, so the read-only case is also checked by refusing the temp file's creation."""
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if Path(path).parent == tmp_path and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OutputError) as caught:
        write_bytes_atomic(tmp_path / "x.json", b"{}")
    assert "x.json" in str(caught.value) and "cannot write in folder" in str(caught.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o644)])
def test_mode_follows_umask_not_mkstemp(tmp_path, umask, mask, mode):
    umask(mask)
    final = tmp_path / "labels.nii.gz"
    with atomic_path(final) as temp:
        temp.write_bytes(b"x")
        os.chmod(temp, 0o600)  # as a writer that recreates the file might leave it
    assert final.stat().st_mode & 0o777 == mode


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd to name fsync'd files")
def test_file_and_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    final = tmp_path / "model.pt"
    with atomic_path(final) as temp:
        temp.write_bytes(b"weights")
    assert synced == [temp.resolve(), tmp_path.resolve()]


def test_long_name_still_gets_a_temp_file(tmp_path):
    final = tmp_path / ("c" * 240 + ".nii.gz")
    write_bytes_atomic(final, b"data")
    assert final.read_bytes() == b"data"
    assert os.listdir(tmp_path) == [final.name]


# -- sweeping the temporary files of killed writers ----------------------------------------------------------


@pytest.mark.parametrize(
    "final",
    [
        "scan.nii.gz",
        "scan.NII.GZ",
        "ckpt.epoch3.pt",
        "README",
        "data.gz",
        ".hidden",
        "é ü.mha",
        "c" * 240 + ".nrrd",
    ],
)
def test_every_temp_name_is_recognised(tmp_path, final):
    with atomic_path(tmp_path / final) as temp:
        assert is_temp_name(temp.name), temp.name
        assert sweep_stale_temps(tmp_path) == []  # too young: a live writer's file
        assert sweep_stale_temps(tmp_path, older_than_s=0) == [temp]
        temp.write_bytes(b"rewritten")  # the writer may still recreate it; the rename then succeeds


@pytest.mark.parametrize(
    "name",
    [
        "scan.1a2b3c4d.nii.gz",  # no leading dot
        ".scan.1A2B3C4D.nii.gz",  # upper-case token
        ".scan.1a2b3c4.nii.gz",  # 7 hex digits
        ".scan.1a2b3c4d5.nii.gz",  # 9
        ".scan.nii.gz",
        ".1a2b3c4d.nii",  # no stem
        ".scan.1a2b3c4d.tar.nii",  # an extension split_suffix would not produce
        ".medcl-predict.lock",
        ".DS_Store",
        ".x." + "c" * 101 + ".1a2b3c4d.nii",  # stem longer than atomic_path writes
    ],
)
def test_names_that_only_look_like_temps_are_not_temps(name):
    assert not is_temp_name(name)


def test_sweep_removes_only_old_regular_temp_files(tmp_path):
    def aged(path: Path, seconds: float) -> Path:
        os.utime(path, (os.path.getmtime(path) - seconds,) * 2)
        return path

    old = [tmp_path / ".a.1a2b3c4d.nii.gz", tmp_path / ".curves.0badc0de.png", tmp_path / ".ckpt.12345678.pt"]
    for path in old:
        path.write_bytes(b"partial")
        aged(path, 61)
    young = tmp_path / ".b.deadbeef.nii.gz"
    young.write_bytes(b"being written")
    aged(young, 30)
    other = tmp_path / ".notes.txt"
    other.write_text("mine")
    aged(other, 3600)
    folder = tmp_path / ".dir.1a2b3c4d.nii"
    folder.mkdir()
    aged(folder, 3600)
    target = tmp_path / "target.nii"
    target.write_bytes(b"keep me")
    link = tmp_path / ".link.1a2b3c4d.nii"
    link.symlink_to(target)
    os.utime(link, (1.0, 1.0), follow_symlinks=False)

    assert sweep_stale_temps(tmp_path) == sorted(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [young.name, other.name, folder.name, target.name, link.name]
    )
    assert target.read_bytes() == b"keep me"
    assert sweep_stale_temps(tmp_path, older_than_s=0) == [young]
    assert sweep_stale_temps(tmp_path / "missing") == []
