"""Data files named by a header, and compressed data blocks"""

from __future__ import annotations

import os
import re
import stat
import zlib
from pathlib import Path

from napari_medcl.io.header_guard import CHUNK


def data_file(header: Path, name: str, field: str) -> Path:
    """The data file ``name`` (from the header's ``field``), which must lie in the header's folder or below
    it: no absolute path, no "..", no symbolic link leading out. Refused before any reader opens it."""
    name = os.fsdecode(name.encode("latin-1"))  # the header's bytes, as the C reader hands them to open()
    shown = name if len(name) <= 80 else name[:77] + "..."
    if not name:
        raise ValueError(f"{field} is empty")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise ValueError(
            f"{field} names an absolute path ({shown}); data files must be in the header's folder"
        )
    if ".." in re.split(r"[\\/]", name):
        raise ValueError(f"{field} ({shown}) leads out of the header's folder with '..'")
    folder = header.parent.resolve()
    target = header.parent / name
    try:
        resolved = target.resolve(strict=True)
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"the data file {shown} (named by {field}) does not exist") from None
    except (OSError, RuntimeError) as error:  # RuntimeError: a link loop, on Python < 3.13
        reason = getattr(error, "strerror", None) or "symbolic link loop"
        raise ValueError(f"the data file {shown} (named by {field}) cannot be opened ({reason})") from None
    if not resolved.is_relative_to(folder):
        raise ValueError(
            f"the data file {shown} (named by {field}) is a link to a file outside the header's folder"
        )
    if not stat.S_ISREG(mode):
        raise ValueError(f"the data file {shown} (named by {field}) is not a regular file")
    try:
        with open(resolved, "rb"):
            pass
    except OSError as error:
        raise ValueError(
            f"the data file {shown} (named by {field}) cannot be opened ({error.strerror})"
        ) from None
    return resolved


def check_inflated(path: Path, start: int, length: int, declared: int) -> None:
    """Inflate ``length`` bytes of zlib/gzip data from ``start`` in ``path`` (in chunks, never holding the
    output) and check they give at least ``declared`` bytes: readers allocate the declared size first and
    zero-fill or fail only afterwards."""
    produced = 0
    inflater = zlib.decompressobj(47)  # 32 + 15: zlib or gzip header
    with open(path, "rb") as file:
        file.seek(start)
        left = max(length, 0)
        while left > 0 and produced < declared:
            chunk = file.read(min(left, CHUNK))
            if not chunk:
                break
            left -= len(chunk)
            try:
                while chunk and produced < declared:
                    produced += len(inflater.decompress(chunk, CHUNK))
                    chunk = inflater.unconsumed_tail
                    if inflater.eof:  # a gzip file may hold several members one after another
                        chunk = inflater.unused_data + chunk
                        inflater = zlib.decompressobj(47)
            except zlib.error as error:
                raise ValueError(f"corrupt compressed voxel data ({error})") from None
    if produced < declared:
        raise ValueError(
            f"compressed voxel data hold {produced:,} bytes, the header declares {declared:,} "
            "(truncated or corrupt file?)"
        )
