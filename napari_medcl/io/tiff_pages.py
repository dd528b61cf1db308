"""TIFF page check. ITK reads a multi-page TIFF as a stack of pages of the first page's size: pages of another
size (a thumbnail, a pyramid level) would be cut or padded silently.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from napari_medcl.errors import InputError
from napari_medcl.io.header_guard import Budget, Findings, HeaderError


def check_tiff(path: Path, extension: str, budget: Budget) -> Findings:
    """Every page must have the first page's size and samples (the size budget is ITK's header check's)."""
    try:
        pages = _tiff_pages(path)
    except (ValueError, struct.error) as error:
        raise HeaderError(f"broken TIFF structure ({error})") from None
    for number, page in enumerate(pages[1:], start=2):
        if page != pages[0]:
            raise InputError(
                path,
                f"page {number} is {_page(page)} but page 1 is {_page(pages[0])}: a multi-page TIFF is read as "
                "a stack of equal pages (is it a pyramid or does it hold a thumbnail?)",
            )
    return Findings()


def _page(page: tuple[int, int, int, int]) -> str:
    width, height, samples, bits = page
    return f"{width} x {height} with {samples} sample(s) of {bits} bits"


def _tiff_pages(path: Path) -> list[tuple[int, int, int, int]]:
    """(width, height, samples per pixel, bits per sample) of every page (IFD) of a classic or BigTIFF file."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        head = file.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 8:
            return []  # not a TIFF: the reader says what it is
        (version,) = struct.unpack(order + "H", head[2:4])
        if version == 42:
            offset_format, count_format, entry_size, value_size = "I", "H", 12, 4
            (offset,) = struct.unpack(order + "I", head[4:8])
        elif version == 43 and len(head) == 16:
            offset_format, count_format, entry_size, value_size = "Q", "Q", 20, 8
            (offset,) = struct.unpack(order + "Q", head[8:16])
        else:
            return []
        pages: list[tuple[int, int, int, int]] = []
        seen: set[int] = set()
        while offset:
            if offset in seen or offset >= size:
                raise ValueError(f"page {len(pages) + 1} lies at {offset}, outside the file or in a loop")
            seen.add(offset)
            file.seek(offset)
            count_size = struct.calcsize(count_format)
            (count,) = struct.unpack(order + count_format, file.read(count_size))
            if count * entry_size > size:
                raise ValueError(f"page {len(pages) + 1} declares {count} tags")
            entries = file.read(count * entry_size + value_size)
            tags = {}
            for index in range(count):
                entry = entries[index * entry_size : (index + 1) * entry_size]
                tag, kind = struct.unpack(order + "HH", entry[:4])
                if tag in (256, 257, 258, 277) and kind in (3, 4, 16):
                    item = {3: "H", 4: "I", 16: "Q"}[kind]
                    (values,) = struct.unpack_from(order + offset_format, entry, 4)
                    if values * struct.calcsize(item) <= value_size:
                        (tags[tag],) = struct.unpack_from(order + item, entry, 4 + value_size)
                    else:  # several values (BitsPerSample of RGB): the field holds their offset
                        (where,) = struct.unpack_from(order + offset_format, entry, 4 + value_size)
                        here = file.tell()
                        file.seek(where)
                        (tags[tag],) = struct.unpack(order + item, file.read(struct.calcsize(item)))
                        file.seek(here)
            (offset,) = struct.unpack(order + offset_format, entries[count * entry_size :])
            pages.append((tags.get(256, 0), tags.get(257, 0), tags.get(277, 1), tags.get(258, 1)))
    return pages
