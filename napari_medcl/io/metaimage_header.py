"""MetaImage (.mha, .mhd) header checks. MetaIO has memory-safety bugs reachable from a malformed header
(Kitware/MetaIO#150), follows ElementDataFile anywhere (../, absolute paths, links), zero-fills a short
compressed block and reports a short raw one as "No such file or directory"; so ITK only ever sees a header
that parsed here: MetaIO's own syntax (``Key = value`` or ``Key: value``, exact key names, the header ending
at ElementDataFile), with every field MetaIO reads into a fixed-size array validated.
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

_MAX_HEADER_LINE = 500  # MetaIO reads names and values into 500-byte buffers


_MET_ITEM_SIZES = {
    f"MET_{name}{suffix}": size
    for name, size in (
        ("CHAR", 1),
        ("UCHAR", 1),
        ("SHORT", 2),
        ("USHORT", 2),
        ("INT", 4),
        ("UINT", 4),
        ("LONG", 4),
        ("ULONG", 4),
        ("LONG_LONG", 8),
        ("ULONG_LONG", 8),
        ("FLOAT", 4),
        ("DOUBLE", 8),
    )
    for suffix in ("", "_ARRAY")
}
# Fields MetaIO reads as NDims numbers, and as NDims x NDims numbers.
_MET_VECTORS = (
    "DimSize",
    "ElementSpacing",
    "ElementSize",
    "Offset",
    "Origin",
    "Position",
    "CenterOfRotation",
    "ImagePosition",
    "ElementOrigin",
)
_MET_MATRICES = ("TransformMatrix", "Rotation", "Orientation", "ElementDirection")
_MET_LOCAL = ("LOCAL", "Local", "local")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def check_metaimage(path: Path, extension: str, budget: Budget) -> Findings:
    """Parse the header as MetaIO would, check the declared size against the budget and against the bytes
    present (inflating compressed data in chunks), and that a data file lies inside the header's folder."""
    try:
        fields, offset = _metaimage_header(path)
        dims, channels, itemsize = _metaimage_layout(fields)
    except ValueError as error:
        raise HeaderError(str(error)) from None
    if len(dims) == 4:
        raise InputError(path, "4D images (time series) are not supported; split the volume first")
    check_budget(path, dims, channels, itemsize, budget)
    declared = math.prod(dims) * channels * itemsize
    name = fields["ElementDataFile"]
    try:
        data, start = (path, offset) if name in _MET_LOCAL else (data_file(path, name, "ElementDataFile"), 0)
        skip = int(fields.get("HeaderSize", "0"))
        if skip > 0:
            start = skip  # MetaIO seeks from the beginning of the data file, LOCAL or not
        size = data.stat().st_size
        if fields.get("CompressedData", "False")[:1] in ("T", "t", "1"):
            compressed = size - start
            if "CompressedDataSize" in fields:
                compressed = int(fields["CompressedDataSize"])
                check_length(compressed, size - start, "compressed voxel data")
            check_inflated(data, start, compressed, declared)
        elif skip == -1:  # the data are the last bytes of the file
            check_length(declared, size)
        else:
            check_length(declared, size - start)
    except ValueError as error:
        raise InputError(path, str(error)) from None
    return Findings()


def _metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """The fields of a MetaImage header, in order, and the byte offset where its LOCAL data starts.

    Raises ValueError for anything MetaIO would parse differently or unsafely: a line that is not
    ``Key = value`` text, a line longer than MetaIO's buffers, a repeated key, no ElementDataFile."""
    with open(path, "rb") as file:
        head = file.read(MAX_TEXT_HEADER)
    fields: dict[str, str] = {}
    offset, number = 0, 0
    while "ElementDataFile" not in fields:
        end = head.find(b"\n", offset)
        if end < 0 and len(head) == MAX_TEXT_HEADER:
            raise ValueError(f"no ElementDataFile line in the first {MAX_TEXT_HEADER:,} bytes of the header")
        if offset >= len(head):
            raise ValueError("header has no ElementDataFile line")
        end = len(head) if end < 0 else end + 1
        line, offset, number = head[offset:end].rstrip(b"\r\n"), end, number + 1
        if not line.strip():
            continue
        text = line.decode("latin-1")
        if len(line) >= _MAX_HEADER_LINE or any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
            raise ValueError(f"header line {number} is not a MetaImage 'Key = value' line")
        separator = min((i for i in (text.find("="), text.find(":")) if i >= 0), default=-1)
        if separator < 0:
            raise ValueError(f"header line {number} has no '=': {text[:40]!r}")
        key = text[:separator].strip()
        if key in fields:
            raise ValueError(f"header repeats {key}")
        fields[key] = text[separator:].lstrip(" \t=:").rstrip()
    return fields, offset


def _metaimage_layout(fields: dict[str, str]) -> tuple[tuple[int, ...], int, int]:
    """(DimSize, channels, bytes per value) from validated MetaImage fields."""
    if fields.get("ObjectType", "Image") != "Image":
        raise ValueError(f"ObjectType is {fields['ObjectType']!r}, not Image")
    if not is_count(fields.get("NDims", "")):
        raise ValueError(f"NDims is {fields.get('NDims', 'missing')!r}")
    ndims = int(fields["NDims"])
    if ndims not in (2, 3, 4):
        raise ValueError(f"NDims is {ndims}: only 2D and 3D images are supported")
    keys = list(fields)
    for key in (*_MET_VECTORS, *_MET_MATRICES):
        if key not in fields:
            continue
        if keys.index(key) < keys.index("NDims"):
            raise ValueError(f"{key} comes before NDims")
        values = fields[key].split()
        count = ndims * ndims if key in _MET_MATRICES else ndims
        if len(values) != count or not all(_NUMBER.fullmatch(v) for v in values):
            raise ValueError(f"{key} must be {count} finite numbers, got {fields[key][:60]!r}")
        numbers = [float(v) for v in values]
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"{key} is not finite: {fields[key][:60]!r}")
        if key in ("ElementSpacing", "ElementSize") and 0.0 in numbers:
            raise ValueError(f"{key} is zero: {fields[key]!r}")
    if "DimSize" not in fields:
        raise ValueError("no DimSize")
    if not all(is_count(v) and int(v) > 0 for v in fields["DimSize"].split()):
        raise ValueError(f"DimSize must be positive integers, got {fields['DimSize'][:60]!r}")
    dims = tuple(int(v) for v in fields["DimSize"].split())
    element = fields.get("ElementType", "")
    if element not in _MET_ITEM_SIZES:
        raise ValueError(f"ElementType {element[:30]!r} is not supported")
    channels = fields.get("ElementNumberOfChannels", "1")
    for key, low in (("ElementNumberOfChannels", 1), ("HeaderSize", -1), ("CompressedDataSize", 0)):
        value = fields.get(key, str(low))
        if not re.fullmatch(r"-?[0-9]{1,18}", value) or int(value) < low:
            raise ValueError(f"{key} is {value[:30]!r}")
    name = fields["ElementDataFile"]
    if name.startswith("LIST") or "%" in name:
        raise ValueError(f"multi-file data (ElementDataFile = {name[:40]}) is not supported")
    if not name:
        raise ValueError("ElementDataFile is empty")
    return dims, int(channels), _MET_ITEM_SIZES[element]
