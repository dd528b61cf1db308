"""medcl-predict on cohorts: parts of the inputs, finished cases skipped, several processes writing into one
folder (per-case locks), --jobs worker processes, and a worker killed mid-case."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_medcl import cli
from napari_medcl.atomic import is_temp_name
from napari_medcl.cohort import LOCKS_DIR, select_part
from napari_medcl.io import read_image, write_image
from napari_medcl.volume import Volume
from tests.onnx_models import pointwise_model, save

ROOT = Path(__file__).parents[2]
THRESHOLD = 100.5  # images hold integers 0..200, so no voxel sits on the threshold
CASE_FILES = (
    "{}.json",
    "{}_entropy.nii.gz",
    "{}_labels.nii.gz",
    "{}_top_class_error.nii.gz",
    "{}_uncertainty.nii.gz",
)


# A segmented case's line names the backend that ran it: ONNX Runtime's CPU provider, or OpenVINO where installed.
SEGMENTED = ("scan: CPUExecutionProvider", "scan: OpenVINO CPU")


def _segmented(line: str) -> bool:
    return ": CPUExecutionProvider" in line or ": OpenVINO CPU" in line


def _image(path: Path, shape=(6, 19, 13), seed=0) -> Path:
    array = np.random.default_rng(seed).integers(0, 201, size=shape).astype(np.float32)
    return write_image(Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)), path)


def _files(*cases: str) -> list[str]:
    return sorted(name.format(case) for case in cases for name in CASE_FILES)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save(
        pointwise_model(threshold=THRESHOLD, patch=(8, 8, 8)), tmp_path_factory.mktemp("m") / "pw.onnx"
    )


def _predict(*args: str | Path) -> int:
    return cli.main([*map(str, args), "--device", "cpu", "--quiet"])


def _command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "napari_medcl.cli", *map(str, args), "--device", "cpu"]


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# -- parts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_parts", [1, 2, 3, 4, 7, 13, 20])
def test_parts_partition_the_cases_exactly(num_parts):
    names = [f"case{i:02d}" for i in range(13)] + ["a", "Z", "case_x", "b.1"]
    cases = [(f"/data/{name}.nii.gz", name) for name in names]
    parts = [select_part(cases, num_parts, i) for i in range(num_parts)]
    seen = [case for part in parts for case in part]
    assert sorted(seen) == sorted(cases)  # every case in exactly one part
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    # The same parts whatever order the inputs come in (a glob on another machine).
    shuffled = cases[:]
    random.Random(num_parts).shuffle(shuffled)
    assert [select_part(shuffled, num_parts, i) for i in range(num_parts)] == parts
    with pytest.raises(ValueError):
        select_part(cases, num_parts, num_parts)


def test_parts_through_the_cli_write_each_case_once(tmp_path, model, capsys):
    inputs = [_image(tmp_path / f"s{k}.nii.gz", seed=k) for k in (3, 0, 4, 1, 2)]  # not in name order
    out = tmp_path / "out"
    written: list[set[str]] = []
    for part in range(3):
        before = {p.name for p in out.glob("*.json")} if out.exists() else set()
        assert _predict(*inputs, "-o", out, "--model", model, "--num-parts", "3", "--part-id", str(part)) == 0
        written.append({p.name for p in out.glob("*.json")} - before)
    # Sorted s0..s4: case i goes to part i mod 3.
    assert written == [{"s0.json", "s3.json"}, {"s1.json", "s4.json"}, {"s2.json"}]
    assert sorted(p.name for p in out.iterdir()) == _files("s0", "s1", "s2", "s3", "s4")
    for k in range(5):
        labels = read_image(out / f"s{k}_labels.nii.gz").array
        np.testing.assert_array_equal(labels, read_image(tmp_path / f"s{k}.nii.gz").array > THRESHOLD)


def test_a_duplicate_case_name_is_reported_by_the_part_that_owns_the_name(tmp_path, model, capsys):
    first = _image(tmp_path / "a.nii")
    b = _image(tmp_path / "b.nii.gz", seed=1)
    second = _image(tmp_path / "a.nii.gz", seed=2)
    out = tmp_path / "out"
    codes, errors = [], []
    for part in range(2):
        codes.append(
            _predict(
                first, b, second, "-o", out, "--model", model, "--num-parts", "2", "--part-id", str(part)
            )
        )
        errors.append([line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")])
    # Sorted cases: a (part 0), b (part 1). Only part 0 refuses a.nii.gz.
    assert codes == [1, 0]
    assert errors[1] == [] and len(errors[0]) == 1
    assert errors[0][0].startswith(f"error: {second}: its outputs would overwrite those of {first}")
    assert (out / "a_labels.nii").is_file() and not (out / "a_labels.nii.gz").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-parts", "3"], "--num-parts and --part-id go together"),
        (["--part-id", "0"], "--num-parts and --part-id go together"),
        (["--num-parts", "3", "--part-id", "3"], "--part-id must be in [0, 3) for --num-parts 3, got 3"),
        (["--num-parts", "0", "--part-id", "0"], "argument --num-parts: must be at least 1, got 0"),
        (["--num-parts", "2", "--part-id", "-1"], "argument --part-id: must be at least 0, got -1"),
        (["--num-parts", "two", "--part-id", "0"], "argument --num-parts: not a whole number: 'two'"),
        (["--jobs", "0"], "argument --jobs: must be at least 1, got 0"),
        (["--jobs", "1.5"], "argument --jobs: not a whole number: '1.5'"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli.main(["x.nii", "-o", str(out), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: medcl-predict") and f"medcl-predict: error: {message}" in err, err
    assert not out.exists()


def test_help_names_the_cohort_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--num-parts N", "--part-id I", "--jobs K", "--overwrite", "$SLURM_ARRAY_TASK_ID"):
        assert option in text


# -- finished cases -----------------------------------------------------------------------------------------


def test_finished_cases_are_skipped_unless_overwrite_or_changed(tmp_path, model, capsys):
    scan = _image(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    args = [scan, "-o", out, "--model", model, "--device", "cpu"]

    def run(*extra: str) -> str:
        assert cli.main([*map(str, args), *extra]) == 0
        return capsys.readouterr().out

    def stamp() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert run().startswith(SEGMENTED)
    first = stamp()
    assert run().splitlines() == [f"scan: already complete in {out}; skipped"]
    assert stamp() == first  # not one file rewritten
    assert run("--overwrite").startswith(SEGMENTED)
    # Other settings, another output asked for, a changed input or a missing output: segmented again.
    assert run("--tta").startswith(SEGMENTED)
    assert run("--tta").startswith("scan: already complete")
    assert run("--tta", "--report-csv").startswith(SEGMENTED)
    assert run("--tta").startswith("scan: already complete")  # it holds more than asked for
    _image(scan, seed=5)
    assert run("--tta").startswith(SEGMENTED)
    (out / "scan_entropy.nii.gz").unlink()
    assert run("--tta").startswith(SEGMENTED)
    (out / "scan.json").write_text("{not json")
    assert run("--tta").startswith(SEGMENTED)
    sidecar = json.loads((out / "scan.json").read_text(encoding="utf-8"))
    sidecar["model"]["sha256"] = "0" * 64
    (out / "scan.json").write_text(json.dumps(sidecar))
    assert run("--tta").startswith(SEGMENTED)
    np.testing.assert_array_equal(
        read_image(out / "scan_labels.nii.gz").array, read_image(scan).array > THRESHOLD
    )


# -- several processes, one folder -------------------------------------------------------------------------


def _check_complete(out: Path, sources: dict[str, Path]) -> None:
    """Every case complete and correct, and nothing else in the folder (no temp, lock or lock folder)."""
    assert sorted(p.name for p in out.iterdir()) == _files(*sources)
    for case, source in sources.items():
        labels = read_image(out / f"{case}_labels.nii.gz").array
        np.testing.assert_array_equal(labels, read_image(source).array > THRESHOLD)


@pytest.mark.slow
def test_two_processes_on_one_folder_write_each_case_once(tmp_path, model):
    """Two real processes given the same cases at the same moment: each case is segmented by exactly one of
    them (the other skips it as being written or already complete), and the folder ends complete."""
    sources = {f"c{k}": _image(tmp_path / f"c{k}.nii.gz", shape=(32, 48, 48), seed=k) for k in range(6)}
    out = tmp_path / "out"
    command = _command(*sources.values(), "-o", out, "--model", model, "--tta")
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for _ in range(2)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], results
    segmented = [
        {line.split(":")[0] for line in stdout.splitlines() if _segmented(line)} for stdout, _ in results
    ]
    assert segmented[0].isdisjoint(segmented[1]), segmented
    assert segmented[0] | segmented[1] == set(sources), segmented
    assert all("Traceback" not in stderr for _, stderr in results)
    _check_complete(out, sources)


@pytest.mark.slow
def test_two_parts_at_once_on_one_folder(tmp_path, model):
    sources = {f"c{k}": _image(tmp_path / f"c{k}.nii.gz", seed=k) for k in range(5)}
    out = tmp_path / "out"
    processes = [
        subprocess.Popen(
            _command(
                *sources.values(), "-o", out, "--model", model, "--num-parts", "2", "--part-id", str(part)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for part in range(2)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], results
    segmented = [
        sorted(line.split(":")[0] for line in stdout.splitlines() if _segmented(line))
        for stdout, _ in results
    ]
    assert segmented == [["c0", "c2", "c4"], ["c1", "c3"]]
    assert results[0][0].splitlines()[-1] == (
        "medcl-predict: part 0 of 2: 3 case(s): 3 segmented, 0 already complete, "
        "0 being written by another process, 0 failed"
    )
    _check_complete(out, sources)


# -- --jobs -------------------------------------------------------------------------------------------------


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "timings"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.slow
def test_jobs_2_writes_the_same_cases_as_jobs_1(tmp_path, model, capsys):
    shapes = [(6, 19, 13), (9, 24, 17), (5, 31, 8), (7, 12, 12)]
    sources = {f"c{k}": _image(tmp_path / f"c{k}.nii.gz", shape, seed=k) for k, shape in enumerate(shapes)}
    outs = {jobs: tmp_path / f"out{jobs}" for jobs in (1, 2)}
    printed = {}
    for jobs, out in outs.items():
        args = [*sources.values(), "-o", out, "--model", model, "--device", "cpu", "--jobs", str(jobs)]
        assert cli.main(list(map(str, args))) == 0
        printed[jobs] = capsys.readouterr().out.splitlines()
    for jobs in outs:
        assert sorted(line.split(":")[0] for line in printed[jobs][:-1]) == sorted(sources)
        assert printed[jobs][-1].startswith("medcl-predict: 4 case(s): 4 segmented")
    _check_complete(outs[2], sources)
    assert sorted(p.name for p in outs[1].iterdir()) == sorted(p.name for p in outs[2].iterdir())
    for name in sorted(p.name for p in outs[1].iterdir()):
        one, two = outs[1] / name, outs[2] / name
        if name.endswith(".json"):
            a = _without_timings(json.loads(one.read_text(encoding="utf-8")))
            b = _without_timings(json.loads(two.read_text(encoding="utf-8")))
            assert a == b, name
        else:
            x, y = read_image(one), read_image(two)
            np.testing.assert_array_equal(x.array, y.array)
            assert x.array.dtype == y.array.dtype and x.same_geometry(y, atol=0)


def test_the_temps_of_an_abandoned_case_are_cleared_under_its_lock(tmp_path):
    """What the parent does when a worker died mid-case: that case's temporary files go, whatever their age;
    another case's stay, also one whose name starts like it while another process holds its lock."""
    from napari_medcl.cohort import case_lock, clear_abandoned_case

    names = {
        "mine": [".a_labels.1a2b3c4d.nii.gz", ".a.0badc0de.json", ".a_probabilities_1.12345678.nii.gz"],
        "other": [".b_labels.1a2b3c4d.nii.gz", ".ab.1a2b3c4d.json"],
        "held": [".a_b_labels.1a2b3c4d.nii.gz", ".a_b.1a2b3c4d.json"],
    }
    for name in [n for group in names.values() for n in group]:
        (tmp_path / name).write_bytes(b"partial")
    with case_lock(tmp_path, "a_b"):  # this process's own lock counts as another writer's
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom napari_medcl.cohort import case_lock\n"
            "with case_lock(__import__('pathlib').Path(sys.argv[1]), 'a_b'):\n"
            "    print('locked', flush=True)\n    time.sleep(120)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        removed = clear_abandoned_case(tmp_path, "a")
        assert sorted(p.name for p in removed) == sorted(names["mine"])
        assert clear_abandoned_case(tmp_path, "a_b") == []  # held: nothing is touched
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != LOCKS_DIR)
    assert left == sorted(names["other"] + names["held"])


def _holder_of(lock: Path, parent: int) -> int | None:
    """The pid of the child of ``parent`` that has ``lock`` open (Linux /proc), or None."""
    children = Path(f"/proc/{parent}/task/{parent}/children")
    try:
        pids = [int(pid) for pid in children.read_text().split()]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == str(lock):
                    return pid
            except OSError:
                continue
    return None


@pytest.mark.slow
def test_a_killed_worker_fails_its_case_only_and_leaves_nothing_of_it(tmp_path, model):
    if not Path("/proc/self/task").is_dir():
        pytest.skip("finds the worker through /proc")
    small = {f"s{k}": _image(tmp_path / f"s{k}.nii.gz", shape=(8, 16, 16), seed=k) for k in range(3)}
    slow = _image(tmp_path / "slow.nii.gz", shape=(64, 64, 64), seed=9)  # seconds with --tta
    out = tmp_path / "out"
    inputs = [small["s0"], slow, small["s1"], small["s2"]]
    process = subprocess.Popen(
        _command(*inputs, "-o", out, "--model", model, "--tta", "--jobs", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        lock = out / LOCKS_DIR / "slow.lock"
        deadline = time.monotonic() + 120
        while (worker := _holder_of(lock, process.pid)) is None:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no worker took the slow case"
            time.sleep(0.02)
        time.sleep(0.5)  # into the prediction
        os.kill(worker, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {slow}: the worker process segmenting it died (killed by SIGKILL); nothing of this case was "
        "written"
    ], stderr
    assert sorted(line.split(":")[0] for line in stdout.splitlines()[:-1]) == ["s0", "s1", "s2"]
    assert stdout.splitlines()[-1].endswith(
        "3 segmented, 0 already complete, 0 being written by another process, 1 failed"
    )
    # Nothing of the slow case, not even a temporary file; the lock folder is gone.
    assert not [p.name for p in out.iterdir() if is_temp_name(p.name)]
    _check_complete(out, small)

    # The next run segments only the case that is missing.
    rerun = subprocess.run(
        _command(*inputs, "-o", out, "--model", model, "--tta", "--jobs", "2"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.splitlines()[-1].endswith(
        "1 segmented, 3 already complete, 0 being written by another process, 0 failed"
    )
    _check_complete(out, {**small, "slow": slow})


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_leaves_finished_cases_only(tmp_path, model):
    """SIGINT to the whole process group (what a terminal's Ctrl+C does) while two workers are mid-case:
    exit 130 with one line, the finished case intact, nothing of the others, no worker left holding a lock."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("finds the workers through /proc")
    first = _image(tmp_path / "first.nii.gz", shape=(8, 16, 16))
    slow = [_image(tmp_path / f"slow{k}.nii.gz", shape=(64, 64, 64), seed=k + 1) for k in range(2)]
    out = tmp_path / "out"
    process = subprocess.Popen(
        _command(first, *slow, "-o", out, "--model", model, "--tta", "--jobs", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not all(_holder_of(out / LOCKS_DIR / f"slow{k}.lock", process.pid) for k in range(2)):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the workers never took both slow cases"
            time.sleep(0.02)
        time.sleep(0.3)
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130, stderr
    # stderr opens with the banner: the model, the error map it shows, the intended-use note
    assert stderr.splitlines()[3:] == ["medcl-predict: interrupted"], stderr
    assert stdout.startswith("first: ") and "slow" not in stdout
    _check_complete(out, {"first": first})  # no temp, no lock file, no lock folder
