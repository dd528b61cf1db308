"""Read and write medical images with their geometry, with SimpleITK for every format.

Each file format is read and written by the SimpleITK ImageIO named in the format table (``formats.py``),
chosen from the extension (never by probing the content), so PNG bytes named ``.nii`` are an error rather than
a silently different image. Every failure a user can cause is an ``InputError`` (reading) or ``OutputError``
(writing) whose message is one line naming the file.

Untrusted files are checked in Python before ITK opens them: NIfTI, MetaImage and NRRD headers are parsed
(``nifti_header.py``, ``metaimage_header.py``, ``nrrd_header.py``), data files they name must lie inside the
header's folder (``data_files.py``), the declared size is checked against a voxel and byte budget and against
the bytes present, and multi-page TIFFs (``tiff_pages.py``) and DICOM folders (``dicom.py``) are checked for
what ITK and GDCM would silently get wrong. The policy for each bad input, and the test that pins it, is in
``docs/reliability.md``. Importing this package does not import SimpleITK: it is loaded on first read or write.
"""

from __future__ import annotations

from napari_medcl.errors import OutputFormatError
from napari_medcl.io.file_content import sha256_file
from napari_medcl.io.formats import SUPPORTED_EXTENSIONS
from napari_medcl.io.header_guard import MAX_BYTES, MAX_VOXELS
from napari_medcl.io.naming import case_name, is_supported, output_extension
from napari_medcl.io.reading import read_image
from napari_medcl.io.writing import write_image

__all__ = [
    "MAX_BYTES",
    "MAX_VOXELS",
    "SUPPORTED_EXTENSIONS",
    "OutputFormatError",
    "case_name",
    "is_supported",
    "output_extension",
    "read_image",
    "sha256_file",
    "write_image",
]
