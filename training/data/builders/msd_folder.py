"""The output folder every builder starts from."""

from __future__ import annotations

import shutil
from pathlib import Path


def new_msd_folder(output: str | Path, *, overwrite: bool) -> Path:
    """An empty MSD dataset folder with ``imagesTr/`` and ``labelsTr/``; a non-empty ``output`` is replaced only
    with ``overwrite`` (FileExistsError otherwise), so a typo never deletes someone's data."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} exists and is not empty; pass overwrite=True (--overwrite)")
        shutil.rmtree(output)
    (output / "imagesTr").mkdir(parents=True)
    (output / "labelsTr").mkdir()
    return output
