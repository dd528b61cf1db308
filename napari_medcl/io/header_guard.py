"""What every format's header guard shares: the size budget it checks a header against, what it hands back,
and the errors and limits of parsing a hostile header.

A guard is called as ``guard(path, extension, budget)`` before ITK opens the file (see ``formats.py``). It
raises ``HeaderError`` when the header does not parse as its format's reader would need (reported as "cannot
be read as <extension>", with a hint when the content looks like another format), ``InputError`` for anything
else wrong, and returns ``Findings``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import InputError

# read_image's default budget: values (voxels x components) and bytes a header may declare.
MAX_VOXELS = 2**31
MAX_BYTES = 2**33

CHUNK = 1 << 20


# Header-parsing limits: real headers are a few kilobytes at most; these only bound the work on hostile files.
MAX_TEXT_HEADER = 1 << 20


class HeaderError(ValueError):
    """The header does not parse as its format's: the file cannot be read as its extension says."""


@dataclass(frozen=True)
class Budget:
    """The most a header may declare: values (voxels x components) and bytes; None means no limit."""

    voxels: int | None
    bytes: int | None


@dataclass(frozen=True)
class Findings:
    """What the pre-ITK checks of a file learnt: NaN/Inf voxels counted in the file itself (None: not
    counted) and a warning to give once the file is read."""

    nonfinite: int | None = None
    warning: str | None = None


def check_budget(path: Path, size: Sequence[int], components: int, itemsize: int, budget: Budget) -> None:
    values = math.prod(size) * components
    shape = " x ".join(str(n) for n in size)
    axes = ", ".join("xyztuvw"[: len(size)])
    per_voxel = f" with {components} components" if components > 1 else ""
    declared = f"header declares a {shape} ({axes}) image{per_voxel}"
    if budget.voxels is not None and values > budget.voxels:
        raise InputError(
            path, f"{declared} = {values:,} values, over the limit of {budget.voxels:,} (max_voxels)"
        )
    if budget.bytes is not None and values * itemsize > budget.bytes:
        raise InputError(
            path,
            f"{declared} of {itemsize}-byte values = {values * itemsize:,} bytes, over the limit of "
            f"{budget.bytes:,} (max_bytes)",
        )


def check_length(declared: int, present: int, what: str = "voxel data") -> None:
    if present < declared:
        raise ValueError(
            f"file is truncated: the header declares {declared:,} bytes of {what}, {max(present, 0):,} are present"
        )


def is_count(text: str) -> bool:
    """A plain decimal integer as C's stream extraction reads it (ASCII digits; at most 18 of them)."""
    return re.fullmatch(r"[0-9]{1,18}", text) is not None


def format_numbers(value: Any) -> str:
    return np.array2string(np.asarray(value, dtype=np.float64), precision=4, separator=", ").replace("\n", "")
