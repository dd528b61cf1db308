"""Cohorts for ``medcl-predict``: parts of an input list, per-case locks, finished cases, the temp sweep.

Several processes may write into one output folder at once (array-job parts on machines that share it, the
worker processes of ``--jobs``, or two runs started by hand). They never collide because each case is written
under its own lock, ``OUTDIR/.medcl-predict-locks/<case>.lock`` (``flock``; released by the OS when the
process ends, however it ends): a process that cannot take a case's lock at once leaves that case alone.

The inputs of a run are cut into parts by ``select_part``: sorted by case name, case ``i`` of the sorted list
belongs to part ``i % num_parts`` (interleaved, as nnU-Net's ``part_id::num_parts``), so every case is in
exactly one part whatever order the inputs were given in, and part sizes differ by at most one. Interleaving
rather than contiguous blocks also spreads cases whose names sort together (one site, one scanner, one
long series) over the parts, so the parts of an array job take about as long as each other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from napari_medcl.errors import OutputError

LOCKS_DIR = ".medcl-predict-locks"
LOCK_SUFFIX = ".lock"
_MAX_TEMP_STEM = 100  # atomic.py cuts temporary stems to this length

T = TypeVar("T")


class CaseBusy(Exception):
    """Another process holds the case's lock."""


# ---- parts ---------------------------------------------------------------------------------------------


def part_of(index: int, num_parts: int) -> int:
    """The part of the case at ``index`` in the list sorted by case name."""
    return index % num_parts


def select_part(cases: Sequence[tuple[T, str]], num_parts: int, part_id: int) -> list[tuple[T, str]]:
    """The (input, case name) pairs of part ``part_id`` of ``num_parts``: sorted by case name, every
    ``num_parts``-th one starting at ``part_id``. Case names must be distinct (``cli`` refuses duplicates)."""
    if not 0 <= part_id < num_parts:
        raise ValueError(f"part_id must be in [0, {num_parts}), got {part_id}")
    ordered = sorted(cases, key=lambda pair: pair[1])
    return [pair for i, pair in enumerate(ordered) if part_of(i, num_parts) == part_id]


# ---- per-case locks ------------------------------------------------------------------------------------


def lock_path(outdir: Path, case: str) -> Path:
    return outdir / LOCKS_DIR / f"{case}{LOCK_SUFFIX}"


@contextmanager
def case_lock(outdir: Path, case: str) -> Iterator[Path]:
    """Hold the lock of ``case`` in ``outdir`` while the body runs; CaseBusy if another process holds it.

    The lock file is removed at the end while still locked; a process that opened it just before then finds
    it gone after locking (its inode is no longer the path's) and locks a new file instead, so removing lock
    files never lets two processes hold one case. The lock folder is created when missing (and made again if
    another process removed it meanwhile). Windows: a byte lock with ``msvcrt.locking``, also dropped when
    the process ends; the file is removed after unlocking there."""
    path = lock_path(outdir, case)
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # no lock folder yet, or another process just removed the empty one
            make_lock_folder(outdir)
            continue
        except OSError as error:
            raise OutputError(outdir, f"cannot write in the output folder ({error.strerror})") from None
        try:
            _lock(fd)
        except OSError as error:
            os.close(fd)
            # flock says EWOULDBLOCK; msvcrt says EACCES or EDEADLOCK after its retries.
            if isinstance(error, BlockingIOError) or os.name == "nt":
                raise CaseBusy(path) from None
            raise OutputError(path, f"cannot lock the case ({error.strerror})") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise OutputError(path, "cannot lock the case: its lock file keeps disappearing")
    try:
        yield path
    finally:
        _release(fd, path)


def remove_lock_folder(outdir: Path) -> None:
    """Remove the lock folder when it is empty (no other process is writing a case); best effort."""
    with suppress(OSError):
        (outdir / LOCKS_DIR).rmdir()


def busy_cases(outdir: Path) -> set[str]:
    """The cases whose lock another process holds now. Lock files nobody holds (left by killed processes)
    are removed on the way, under their lock, so that the lock folder can go away at the end of a run."""
    folder = outdir / LOCKS_DIR
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return set()
    busy = set()
    for name in names:
        if not name.endswith(LOCK_SUFFIX):
            continue
        path = folder / name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            _lock(fd)
        except OSError:
            os.close(fd)
            busy.add(name[: -len(LOCK_SUFFIX)])
            continue
        _release(fd, path)
    return busy


def sweep_case_temps(outdir: Path) -> list[Path]:
    """``atomic.sweep_stale_temps`` for an output folder that other processes may be writing into: the
    temporary files of a case whose lock another process holds are kept whatever their age."""
    from napari_medcl.atomic import sweep_stale_temps

    busy = busy_cases(outdir)
    return sweep_stale_temps(outdir, keep=lambda stem: any(_may_belong(stem, case) for case in busy))


def clear_abandoned_case(outdir: Path, case: str) -> list[Path]:
    """Remove the temporary files of ``case``, whatever their age, once its writer has died (a ``--jobs``
    worker killed mid-case); return them. Done under the case's lock, so never while another process writes
    the case; files that may also belong to a case another process holds (``a_b_labels`` of case ``a_b``
    when clearing ``a``) are kept. Nothing is removed when the lock cannot be taken."""
    from napari_medcl.atomic import sweep_stale_temps

    try:
        with case_lock(outdir, case):
            others = busy_cases(outdir) - {case}
            return sweep_stale_temps(
                outdir,
                older_than_s=0,
                keep=lambda stem: not _may_belong(stem, case) or any(_may_belong(stem, o) for o in others),
            )
    except (CaseBusy, OutputError):
        return []


def _may_belong(stem: str, case: str) -> bool:
    """Whether a temporary file of stem ``stem`` may be one of ``case``'s (``<case>`` for the sidecar,
    ``<case>_<output>`` for the others, cut to 100 characters)."""
    return stem == case[:_MAX_TEMP_STEM] or stem.startswith(f"{case}_")


def make_lock_folder(outdir: Path) -> None:
    """Create ``OUTDIR/.medcl-predict-locks`` if needed; OutputError when the folder cannot be written."""
    try:
        (outdir / LOCKS_DIR).mkdir(exist_ok=True)
    except OSError as error:
        raise OutputError(outdir, f"cannot write in the output folder ({error.strerror})") from None


def _lock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _release(fd: int, path: Path) -> None:
    """Remove the lock file while holding its lock, then unlock (Windows: the other way round)."""
    if os.name == "nt":  # Windows cannot remove an open file
        os.close(fd)
        _remove(path)
    else:
        _remove(path)
        os.close(fd)


def _remove(path: Path) -> None:
    with suppress(OSError):  # best effort: a lock file left behind blocks nobody
        path.unlink(missing_ok=True)


# ---- finished cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """What a run would write for a case: a finished case must match it to be skipped."""

    model_sha256: str | None
    version: str
    overlap: float
    tta: bool
    probabilities: bool
    report_csv: bool
    dicom_seg: bool


def finished(outdir: Path, case: str, source: Path, wanted: Wanted) -> bool:
    """True when ``outdir`` holds case ``case`` complete, made from the same input with the same settings.

    Complete: its sidecar reads as JSON, and every output it lists is a file. Same: the sidecar records the
    SHA-256 of ``source`` (hashed here, last, as it is the slow part), the model's SHA-256, this napari-medcl
    version, the overlap and TTA setting, and at least the optional outputs asked for (probabilities,
    report CSV, DICOM SEG). Anything else (no sidecar, a damaged one, another model) is not finished."""
    from napari_medcl.case_writer import _input_sha256
    from napari_medcl.errors import InputError

    if wanted.model_sha256 is None:
        return False
    try:
        document = json.loads((outdir / f"{case}.json").read_text(encoding="utf-8"))
        outputs, tiling = document["outputs"], document["tiling"]
        same = (
            document["model"]["sha256"] == wanted.model_sha256
            and document["version"] == wanted.version
            and tiling["overlap"] == wanted.overlap
            and tiling["tta"] == wanted.tta
            and (outputs.get("probabilities") is not None or not wanted.probabilities)
            and (outputs.get("report_csv") is not None or not wanted.report_csv)
            and (outputs.get("dicom_seg") is not None or not wanted.dicom_seg)
        )
        recorded = document["input"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not same or not all((outdir / name).is_file() for name in _listed(outputs)):
        return False
    try:
        return _input_sha256(source) == recorded
    except InputError:
        return False  # the case itself will say why the input cannot be read


def _listed(outputs: dict[str, Any]) -> list[str]:
    names = []
    for value in outputs.values():
        names += list(value.values()) if isinstance(value, dict) else [value]
    return [str(name) for name in names]
