"""What a path holds, told from its first bytes or its bytes whole, and why it cannot be opened.

The first bytes name a file's real format in error messages ("the content looks like a PNG image: is the
extension wrong?"): a file is always read as its extension says, never as what its content looks like.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

from napari_medcl.io.formats import FORMATS, GZIP_CONTENT, GZIP_MAGIC, expected_content
from napari_medcl.io.header_guard import CHUNK


def os_problem(error: OSError, path: Path) -> str:
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if error.errno == errno.ENOENT:
        return (
            "broken symbolic link (its target does not exist)"
            if path.is_symlink()
            else "no such file or folder"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if error.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return f"cannot access ({error.strerror or error})"


_MAGIC = ((0, GZIP_MAGIC, GZIP_CONTENT), *((o, m, fmt.content) for fmt in FORMATS for o, m in fmt.magic))


def sniff(path: Path) -> str | None:
    """What a file's first bytes say it is (for error messages and the DICOM folder check)."""
    try:
        with open(path, "rb") as file:
            head = file.read(352)
    except OSError:
        return None
    return next((kind for offset, magic, kind in _MAGIC if head[offset : offset + len(magic)] == magic), None)


def not_readable_as(path: Path, extension: str, reason: str) -> str:
    return f"cannot be read as {extension}: {reason}{content_hint(path, extension)}"


def content_hint(path: Path, extension: str) -> str:
    content = sniff(path)
    if content is not None and content != expected_content(extension):
        return f" (the content looks like {content}: is the extension wrong?)"
    return ""


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
