"""Atomic file writing: a file appears under its final name complete, or not at all.

Writers (SimpleITK, ``torch.save``, JSON sidecars) write into a temporary file in the *same* folder, which is
flushed to disk and then renamed over the final name with ``os.replace`` (atomic on POSIX and Windows). A crash,
Ctrl-C, full disk or exception in between leaves the previous file untouched and removes the temporary one.

The temporary name keeps the real extension at its end (``scan.nii.gz`` -> ``.scan.1a2b3c4d.nii.gz``) because
SimpleITK and friends choose the file format from the extension, and starts with a dot so that file browsers
and globbing for ``*.nii.gz`` do not pick up a half-written file. A process killed outright (SIGKILL, power
loss) cannot remove its temporary file; ``sweep_stale_temps`` removes such leftovers when the next run starts.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from napari_medcl.errors import OutputError

__all__ = [
    "atomic_path",
    "is_temp_name",
    "split_suffix",
    "sweep_stale_temps",
    "temp_stem",
    "write_bytes_atomic",
    "write_text_atomic",
]

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
# Keeps ".<stem>.<random>.<ext>" under the usual 255-byte file name limit.
_MAX_TEMP_STEM = 100
_TOKEN_BYTES = 4
# The names _create_temp gives: "." + stem + "." + 8 lowercase hex digits + what split_suffix calls the
# extension (nothing, ".ext", or ".ext" followed by a compression suffix).
_COMPRESSED = "|".join(re.escape(suffix) for suffix in _COMPRESSION_SUFFIXES)
_TEMP_NAME = re.compile(
    rf"\.(?P<stem>.+)\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}(?P<suffix>(?:\.[^.]+(?i:{_COMPRESSED})?)?)"
)
# How old (by mtime) a temporary file must be before a sweep removes it: a live writer touches its file
# continuously, and creates it just before writing.
STALE_TEMP_SECONDS = 60.0


def split_suffix(name: str) -> tuple[str, str]:
    """Split a file name into stem and extension, keeping a compressed extension whole.

    ``"scan.nii.gz"`` -> ``("scan", ".nii.gz")``, ``"ckpt.epoch3.pt"`` -> ``("ckpt.epoch3", ".pt")``,
    ``"README"`` -> ``("README", "")``.
    """
    path = Path(name)
    stem, suffix = path.stem, path.suffix
    if suffix.lower() in _COMPRESSION_SUFFIXES and Path(stem).suffix:
        stem, suffix = Path(stem).stem, Path(stem).suffix + suffix
    return stem, suffix


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; when the body succeeds, move it onto ``final`` durably.

    After the with-body: the file is fsync'd, renamed onto ``final`` with ``os.replace``, and the folder is
    fsync'd so that the rename itself survives a power loss. On any exception (including KeyboardInterrupt)
    the temporary file is removed and an existing ``final`` stays as it was. An ``OSError`` (read-only or
    missing folder, disk full, ``final`` is a folder) is raised as ``OutputError`` naming ``final``; other
    exceptions propagate unchanged.

    The file gets mode ``0o644 & ~umask`` (``tempfile.mkstemp`` would give ``0o600``), even when the writer
    replaced the temporary file instead of writing into it.
    """
    final = Path(final)
    if final.is_dir():
        raise OutputError(final, "is a folder; give a file name")
    temp, mode = _create_temp(final)
    try:
        yield temp
        os.chmod(temp, mode)
        _fsync_file(temp)
        os.replace(temp, final)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise OutputError(final, _describe(error, final)) from error
        raise
    _fsync_folder(final.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``) and return ``path``."""
    path = Path(path)
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return path


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_path``) and return ``path``."""
    return write_bytes_atomic(path, text.encode(encoding))


def is_temp_name(name: str) -> bool:
    """True when ``name`` has the form of ``atomic_path``'s temporary files (``.scan.1a2b3c4d.nii.gz``)."""
    return temp_stem(name) is not None


def temp_stem(name: str) -> str | None:
    """The stem of the final file a temporary file name stands for (``.scan_labels.1a2b3c4d.nii.gz`` ->
    ``scan_labels``; cut to its first 100 characters for long names), or None when ``name`` is not one."""
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return None
    stem, suffix = match["stem"], match["suffix"]
    # Only an extension split_suffix itself would produce: "a.b.1a2b3c4d" is not a temp of "a.b".
    if len(stem) <= _MAX_TEMP_STEM and split_suffix(f"x{suffix}") == ("x", suffix):
        return stem
    return None


def sweep_stale_temps(
    folder: str | Path,
    *,
    older_than_s: float = STALE_TEMP_SECONDS,
    keep: Callable[[str], bool] | None = None,
) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder``; return the paths removed.

    Only regular files directly in ``folder`` whose name is exactly an ``atomic_path`` temporary name
    (``is_temp_name``) and whose modification time is at least ``older_than_s`` seconds old are removed, so a
    writer still running beside this one keeps its file (``older_than_s=0`` removes every such file, for a
    folder that only this process writes). ``keep``: called with the stem of each candidate (``temp_stem``);
    True keeps the file (``medcl-predict`` keeps those of cases another process holds the lock of).
    Links, folders and every other name are left alone. Best effort:
    a file that vanishes or cannot be removed (permissions, Windows file in use) is skipped. A missing
    ``folder`` gives an empty list.
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    now = time.time()
    removed = []
    for entry in entries:
        stem = temp_stem(entry.name)
        if stem is None or (keep is not None and keep(stem)):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < older_than_s:
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(folder / entry.name)
    return sorted(removed)


def _create_temp(final: Path) -> tuple[Path, int]:
    """Create an empty, exclusive temporary file beside ``final``; return it and the mode it should keep.

    Opening with mode 0o644 lets the kernel apply the umask, so the process-wide umask never has to be read
    (reading it means setting it, which races with other threads)."""
    stem, suffix = split_suffix(final.name)
    for _ in range(100):
        temp = final.with_name(f".{stem[:_MAX_TEMP_STEM]}.{secrets.token_hex(_TOKEN_BYTES)}{suffix}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except FileExistsError:
            continue
        except OSError as error:
            raise OutputError(final, _describe(error, final)) from error
        try:
            mode = os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
        return temp, mode
    raise OutputError(final, f"cannot find a free temporary file name in {final.parent}")


def _describe(error: OSError, final: Path) -> str:
    """A one-line reason for an OSError met while writing ``final``."""
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        return f"disk full ({reason}); the previous file, if any, is unchanged"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write in folder {final.parent} ({reason})"
    if error.errno == errno.ENOENT and not final.parent.is_dir():
        return f"folder {final.parent} does not exist"
    if error.errno == errno.EISDIR or final.is_dir():
        return "is a folder; give a file name"
    return f"cannot write ({reason})"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable. Best effort: Windows cannot open a folder, and some network file systems
    refuse to fsync one; the file is already complete under its final name by then."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
