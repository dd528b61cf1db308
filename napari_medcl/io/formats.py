"""The table of file formats: every extension read or written, and how each format is read, checked and written.

Reading and writing dispatch on this table (the format comes from the extension, never from probing the
content), and every other list of extensions in the product (napari's reader and writers, the save dialog,
error messages) is derived from it. ``napari.yaml`` cannot import it; a test holds it to the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from napari_medcl.io.header_guard import Budget, Findings
from napari_medcl.io.metaimage_header import check_metaimage
from napari_medcl.io.nifti_header import check_nifti
from napari_medcl.io.nrrd_header import check_nrrd
from napari_medcl.io.tiff_pages import check_tiff

HeaderGuard = Callable[[Path, str, Budget], Findings]
# What ``file_content.sniff`` says about a gzip file, and what a gzipped format's files should start as.
GZIP_CONTENT = "gzip-compressed data"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class ImageFormat:
    name: str  # Volume.format
    title: str  # as file dialogs and help texts name it
    image_io: str  # the SimpleITK ImageIO that reads and writes it
    extensions: tuple[str, ...]  # lower case, compound ones whole, in the order readers list them
    content: str  # what ``file_content.sniff`` says about a file of this format
    outputs: tuple[str, str]  # extension for (labels, float maps); "" keeps the input's extension
    guard: HeaderGuard | None = None  # checks in Python before ITK opens the file (see header_guard.py)
    # Header and voxels in two files: read, never written. One rename cannot move both atomically, and the
    # header names its data file, so renaming either breaks the pair.
    two_file: tuple[str, ...] = ()
    gzipped: tuple[str, ...] = ()  # extensions of files compressed whole (their first bytes are gzip's)
    picture: bool = False  # no origin or direction stored; a depth-1 volume is written as a 2D image
    write_dtypes: tuple[str, ...] | None = None  # None: whatever the ImageIO accepts
    compress: bool = False
    lossy: bool = False  # written voxels do not read back exactly: only the header is compared
    folder_files: str = ""  # read from a folder (no extensions of its own): the usual extension of its files
    magic: tuple[tuple[int, bytes], ...] = ()  # (offset, bytes) that start a file of this format
    write_first: str = ""  # the extension to write by default, when it is not the first one

    @property
    def written_extensions(self) -> tuple[str, ...]:
        """The extensions it can be written with, the default first (what save dialogs offer)."""
        written = [e for e in self.extensions if e not in self.two_file]
        if self.write_first:
            written.remove(self.write_first)
            written.insert(0, self.write_first)
        return tuple(written)

    @property
    def scan(self) -> bool:
        """A file format that stores a 3D scan's geometry (origin, direction): what napari's reader claims
        and its writers write (napari reads pictures itself)."""
        return bool(self.extensions) and not self.picture


FORMATS = (
    ImageFormat(
        "nifti",
        "NIfTI",
        "NiftiImageIO",
        (".nii", ".nii.gz"),
        "an uncompressed NIfTI file",
        ("", ""),
        check_nifti,
        gzipped=(".nii.gz",),
        compress=True,
        magic=((344, b"n+1\x00"), (4, b"n+2\x00")),
        write_first=".nii.gz",
    ),
    ImageFormat(
        "nrrd",
        "NRRD",
        "NrrdImageIO",
        (".nrrd", ".nhdr"),
        "a NRRD file",
        (".nrrd", ".nrrd"),
        check_nrrd,
        two_file=(".nhdr",),
        compress=True,
        magic=((0, b"NRRD"),),
    ),
    ImageFormat(
        "mha",
        "MetaImage",
        "MetaImageIO",
        (".mha", ".mhd"),
        "a MetaImage file",
        (".mha", ".mha"),
        check_metaimage,
        two_file=(".mhd",),
        compress=True,
        magic=((0, b"ObjectType"),),
    ),
    ImageFormat(
        "png",
        "PNG",
        "PNGImageIO",
        (".png",),
        "a PNG image",
        (".png", ".tif"),
        picture=True,
        write_dtypes=("uint8", "uint16"),
        magic=((0, b"\x89PNG\r\n\x1a\n"),),
    ),
    ImageFormat(
        "jpeg",
        "JPEG",
        "JPEGImageIO",
        (".jpg", ".jpeg"),
        "a JPEG image",
        (".png", ".tif"),
        picture=True,
        write_dtypes=("uint8",),
        lossy=True,
        magic=((0, b"\xff\xd8\xff"),),
    ),
    ImageFormat(
        "tiff",
        "TIFF",
        "TIFFImageIO",
        (".tif", ".tiff"),
        "a TIFF image",
        (".tif", ".tif"),
        check_tiff,
        picture=True,
        magic=((0, b"II*\x00"), (0, b"MM\x00*")),
    ),
    ImageFormat(
        "dicom",
        "DICOM series",
        "GDCMImageIO",
        (),
        "a DICOM file",
        (".nii.gz", ".nii.gz"),
        folder_files=".dcm",
        magic=((128, b"DICM"),),
    ),
)
BY_EXTENSION = {extension: fmt for fmt in FORMATS for extension in fmt.extensions}
BY_NAME = {fmt.name: fmt for fmt in FORMATS}

SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(BY_EXTENSION)
WRITABLE_EXTENSIONS = tuple(e for e in SUPPORTED_EXTENSIONS if e not in BY_EXTENSION[e].two_file)
SCAN_FORMATS = tuple(fmt for fmt in FORMATS if fmt.scan)
SCAN_EXTENSIONS = tuple(e for fmt in SCAN_FORMATS for e in fmt.extensions)
SCAN_WRITE_EXTENSIONS = tuple(e for fmt in SCAN_FORMATS for e in fmt.written_extensions)


def expected_content(extension: str) -> str | None:
    """What the first bytes of a file with this extension look like when its content matches."""
    for fmt in FORMATS:
        if extension in fmt.gzipped:
            return GZIP_CONTENT
        if extension in fmt.extensions or (fmt.folder_files and extension == fmt.folder_files):
            return fmt.content
    return None
