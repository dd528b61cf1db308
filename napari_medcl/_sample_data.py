"""napari sample data: a real brain MRI (MNI ICBM152 2009a T1, 2 mm), shipped in the package (see data/LICENSE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SAMPLE_FILE = Path(__file__).parent / "data" / "mni152_t1_2mm.nii.gz"
SAMPLE_NAME = "MNI152 T1"


def mni152_t1() -> list[tuple[Any, dict[str, Any], str]]:
    """The sample scan as one Image LayerDataTuple, read with its geometry (2 mm spacing, RAS template)."""
    from napari_medcl.io import read_image
    from napari_medcl.layer_data import image_layer_data

    return [image_layer_data(read_image(SAMPLE_FILE), name=SAMPLE_NAME)]
