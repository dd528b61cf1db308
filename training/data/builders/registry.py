"""Name → builder table used by ``medcl-data build``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from napari_medcl.errors import UsageError
from training.data.builders.mni152 import build_mni152_tissue
from training.data.builders.pyradiomics_cases import build_pyradiomics_lesions

BUILDERS: dict[str, tuple[Callable[..., Path], str]] = {
    "mni152-tissue": (
        build_mni152_tissue,
        "MNI ICBM152 2009a T1 with background/CSF/GM/WM labels from nilearn's bundled tissue maps, "
        "split into axial blocks (one case per block) for held-out validation",
    ),
    "pyradiomics-lesions": (
        build_pyradiomics_lesions,
        "real patient MRI (brain lesions, breast) and CT (lung tumours) with binary masks from the pyradiomics "
        "3.0.1 source distribution (fetched with pip)",
    ),
}


def build_dataset(name: str, output: Path, **options) -> Path:
    if name not in BUILDERS:
        raise UsageError(f"unknown dataset {name!r}; available: {', '.join(BUILDERS)}")
    builder, _ = BUILDERS[name]
    return builder(Path(output), **options)
