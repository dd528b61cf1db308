"""NRRD (.nrrd, .nhdr) header checks. NrrdIO follows "data file:" anywhere, replaces a NaN spacing by 1, and
allocates the whole volume before finding that a gzip block is short; so the header's fields that matter are
read here first. Field names are case-insensitive and may be spelt without the space, as in NrrdIO; the
header ends at the first empty line.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from napari_medcl.errors import InputError
from napari_medcl.io.data_files import check_inflated, data_file
from napari_medcl.io.header_guard import (
    MAX_TEXT_HEADER,
    Budget,
    Findings,
    HeaderError,
    check_budget,
    check_length,
    is_count,
)

_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(
        ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort"), 2
    ),
    **dict.fromkeys(("unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32"), 4),
    **dict.fromkeys(("uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "int64", "int64_t"), 8),
    **dict.fromkeys(("signed long long int", "ulonglong", "unsigned long long", "uint64", "uint64_t"), 8),
    **dict.fromkeys(("unsigned long long int", "double"), 8),
}
_NRRD_ENCODINGS = {
    "raw": "raw",
    "gz": "gzip",
    "gzip": "gzip",
    "txt": "text",
    "text": "text",
    "ascii": "text",
    "hex": "hex",
    "bz2": "bzip2",
    "bzip2": "bzip2",
}
# Axis kinds NrrdIO treats as image axes (an unknown kind counts as one); the others hold components.
_NRRD_SPATIAL_KINDS = ("domain", "space", "time", "none", "???", "unknown")


def check_nrrd(path: Path, extension: str, budget: Budget) -> Findings:
    """Parse the header's fields that matter, check the declared size against the budget and against the bytes
    present, and that a data file lies inside the header's folder."""
    try:
        fields, offset = _nrrd_header(path)
        sizes, itemsize, encoding = _nrrd_layout(fields)
    except ValueError as error:
        raise HeaderError(str(error)) from None
    check_budget(path, sizes, 1, itemsize or 1, budget)
    if itemsize is None or encoding == "text" or encoding == "hex":
        return Findings()  # NrrdIO's own checks apply: it parses the numbers one by one
    declared = math.prod(sizes) * itemsize
    try:
        data, start = (path, offset)
        if "data file" in fields:
            data, start = data_file(path, fields["data file"], "data file"), 0
        skip = int(fields.get("byte skip", "0"))
        if int(fields.get("line skip", "0")) > 0:
            return Findings()  # line lengths unknown: NrrdIO's own checks apply
        size = data.stat().st_size
        if encoding == "gzip":
            check_inflated(data, start, size - start, declared + max(skip, 0))
        elif skip == -1:  # the data are the last bytes of the file
            check_length(declared, size)
        else:
            check_length(declared, size - start - skip)
    except ValueError as error:
        raise InputError(path, str(error)) from None
    return Findings()


def _nrrd_header(path: Path) -> tuple[dict[str, str], int]:
    """NRRD fields (lower-case names, "datafile" spelt "data file" and so on) and where attached data start."""
    with open(path, "rb") as file:
        head = file.read(MAX_TEXT_HEADER)
    if not head.startswith(b"NRRD"):
        raise ValueError("not a NRRD file (it does not start with NRRD)")
    fields: dict[str, str] = {}
    offset = head.find(b"\n") + 1
    while offset > 0 and offset < len(head):
        end = head.find(b"\n", offset)
        if end < 0 and len(head) == MAX_TEXT_HEADER:
            raise ValueError(f"header longer than {MAX_TEXT_HEADER:,} bytes")
        end = len(head) if end < 0 else end + 1
        line, offset = head[offset:end].rstrip(b"\r\n").decode("latin-1"), end
        if not line:
            break  # end of the header; attached data follow
        if line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        name = " ".join(name.lower().split())
        if name in ("data file", "datafile"):
            # Checked whatever else the line holds (NrrdIO may read it as a key/value pair if it holds
            # ":="; reading it as a data file here errs on the safe side).
            fields["data file"] = value.strip()
            if fields["data file"].startswith("LIST") or "%" in fields["data file"]:
                raise ValueError(f"multi-file data (data file: {fields['data file'][:40]}) is not supported")
            continue
        if not colon or value.startswith("="):
            continue  # key:=value pairs (and what NrrdIO rejects itself)
        fields[name.replace(" ", "")] = value.strip()
    fields = {_NRRD_NAMES.get(k, k): v for k, v in fields.items()}
    return fields, offset


_NRRD_NAMES = {"byteskip": "byte skip", "lineskip": "line skip"}


def _nrrd_layout(fields: dict[str, str]) -> tuple[tuple[int, ...], int | None, str]:
    """(sizes, bytes per value or None if the type is unknown here, encoding) from NRRD fields."""
    dimension = fields.get("dimension", "")
    if not is_count(dimension) or not 1 <= int(dimension) <= 16:
        raise ValueError(f"dimension is {dimension[:20]!r}")
    sizes_text = fields.get("sizes", "").split()
    if len(sizes_text) != int(dimension) or not all(is_count(s) and int(s) > 0 for s in sizes_text):
        raise ValueError(f"sizes must be {dimension} positive integers, got {fields.get('sizes', '')[:60]!r}")
    sizes = tuple(int(s) for s in sizes_text)
    encoding = _NRRD_ENCODINGS.get(fields.get("encoding", "").lower(), fields.get("encoding", ""))
    if encoding == "bzip2":
        raise ValueError("bzip2 encoding is not supported (ITK's NrrdIO lacks it); use gzip or raw")
    for key in ("byte skip", "line skip"):
        value = fields.get(key, "0")
        if not re.fullmatch(r"-?[0-9]{1,18}", value) or int(value) < (-1 if key == "byte skip" else 0):
            raise ValueError(f"{key} is {value[:30]!r}")
    if "spacings" in fields:
        _check_nrrd_spacings(fields, len(sizes))
    return sizes, _NRRD_TYPES.get(" ".join(fields.get("type", "").lower().split())), encoding


def _check_nrrd_spacings(fields: dict[str, str], dimension: int) -> None:
    """A NaN spacing means "unknown" in NRRD and NrrdIO reads it as 1 mm: refused on image axes."""
    spacings = fields["spacings"].split()
    kinds = fields.get("kinds", "").lower().split()
    for axis, text in enumerate(spacings[:dimension]):
        spatial = len(kinds) != dimension or kinds[axis] in _NRRD_SPATIAL_KINDS
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"spacings holds {text[:20]!r}") from None
        if spatial and not (math.isfinite(value) and value != 0):
            raise ValueError(f"spacing of axis {axis} is {text}: the voxel size is unknown")
