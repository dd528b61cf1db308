"""``mni152-tissue``: the MNI ICBM152 2009a T1 template with background/CSF/GM/WM labels.

Source: nilearn's bundled copies of the template's T1 and its grey- and white-matter probability maps (1 mm,
197x233x189, no download). There is no CSF map in that bundle, so CSF is what remains inside the skull-stripped brain:
``csf = clip(1 - gm - wm, 0, 1)``; every brain voxel (T1 > 0) takes the class of the largest of (csf, gm, wm), every
other voxel is background.

One subject cannot be split by subject, so the volume is split into contiguous axial blocks separated by gaps of
``gap_mm`` that are left out entirely: a block never has a slice within ``gap_mm`` of another block's slice, so a
model trained on some blocks and validated on another is validated on anatomy it has not seen within that distance.
Each block is one case, with its true physical position (the origin moves with the crop).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from napari_medcl.errors import UsageError
from napari_medcl.io import read_image, write_image
from napari_medcl.volume import Volume
from training.data.builders.msd_folder import new_msd_folder

CLASS_NAMES = ("background", "CSF", "GM", "WM")
_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LICENSE = """\
MNI ICBM152 non-linear symmetric 2009a template (McConnell Brain Imaging Centre, Montreal Neurological Institute),
as bundled by nilearn (BSD-3-Clause). The template's notice: "Copyright (C) 1993-2009 Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University. Permission to use, copy, modify, and distribute
this software and its documentation for any purpose and without fee is hereby granted, provided that the above
copyright notice appear in all copies. The authors and McGill University make no representations about the
suitability of this software for any purpose. It is provided "as is" without express or implied warranty."
"""


def nilearn_data_dir() -> Path:
    try:
        return Path(str(resources.files("nilearn.datasets") / "data"))
    except ModuleNotFoundError:
        raise UsageError("nilearn is not installed; install it with `pip install nilearn`") from None


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Labels 0 background, 1 CSF, 2 GM, 3 WM from the T1 (brain = T1 > 0) and GM/WM probabilities in [0, 1]."""
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    labels[t1 <= 0] = 0
    return labels


def load_mni152(downsample: int = 1) -> tuple[Volume, Volume]:
    """The T1 (float32, 0-1) and its tissue labels as Volumes with the template's geometry."""
    folder = nilearn_data_dir()
    t1 = read_image(folder / _FILES["t1"])
    gm = read_image(folder / _FILES["gm"]).array.astype(np.float32) / 255.0
    wm = read_image(folder / _FILES["wm"]).array.astype(np.float32) / 255.0
    t1_array = t1.array.astype(np.float32) / 255.0
    labels = tissue_labels(t1_array, gm, wm)
    image = t1.with_array(t1_array)
    label_volume = t1.with_array(labels)
    if downsample > 1:
        step = (slice(None, None, downsample),) * 3
        # Striding keeps voxel centres of the original grid, so the origin is unchanged and spacing scales.
        image = Volume(t1_array[step], tuple(s * downsample for s in t1.spacing), t1.origin, t1.direction)
        label_volume = image.with_array(labels[step])
    return image, label_volume


def axial_blocks(mask: np.ndarray, n_blocks: int, gap: int) -> list[tuple[int, int]]:
    """``n_blocks`` contiguous [start, stop) ranges along axis 0 covering the mask's extent, ``gap`` slices apart."""
    nonzero = np.flatnonzero(mask.any(axis=(1, 2)))
    first, last = int(nonzero[0]), int(nonzero[-1]) + 1
    usable = last - first - gap * (n_blocks - 1)
    if usable < n_blocks:
        raise UsageError(f"{n_blocks} blocks with {gap}-slice gaps do not fit in {last - first} slices")
    sizes = [usable // n_blocks + (1 if i < usable % n_blocks else 0) for i in range(n_blocks)]
    blocks, start = [], first
    for size in sizes:
        blocks.append((start, start + size))
        start += size + gap
    return blocks


def build_mni152_tissue(
    output: Path,
    *,
    n_blocks: int = 5,
    gap_mm: float = 6.0,
    downsample: int = 1,
    margin: int = 4,
    overwrite: bool = False,
) -> Path:
    output = new_msd_folder(output, overwrite=overwrite)
    image, labels = load_mni152(downsample)
    brain = labels.array > 0
    gap = int(np.ceil(gap_mm / image.spacing[0]))
    # In-plane crop to the brain's bounding box (plus a margin) keeps every case small.
    ys, xs = np.flatnonzero(brain.any(axis=(0, 2))), np.flatnonzero(brain.any(axis=(0, 1)))
    y_box = slice(max(int(ys[0]) - margin, 0), min(int(ys[-1]) + 1 + margin, brain.shape[1]))
    x_box = slice(max(int(xs[0]) - margin, 0), min(int(xs[-1]) + 1 + margin, brain.shape[2]))
    cases = []
    for index, (start, stop) in enumerate(axial_blocks(brain, n_blocks, gap)):
        box = (slice(start, stop), y_box, x_box)
        case = f"mni152_block{index}"
        write_image(image.crop(box), output / "imagesTr" / f"{case}_0000.nii.gz")
        write_image(labels.crop(box), output / "labelsTr" / f"{case}.nii.gz")
        counts = np.bincount(labels.crop(box).array.ravel(), minlength=len(CLASS_NAMES))
        cases.append({"case": case, "slices": [start, stop], "voxels_per_class": counts.tolist()})
    dataset = {
        "name": "mni152-tissue",
        "description": "MNI ICBM152 2009a T1 with CSF/GM/WM labels derived from the template's tissue maps",
        "channel_names": {"0": "T1"},
        "labels": {name: i for i, name in enumerate(CLASS_NAMES)},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "blocks": cases,
        "block_gap_mm": gap * image.spacing[0],
        "spacing_zyx_mm": list(image.spacing),
    }
    (output / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    (output / "README.md").write_text(_readme(cases, gap * image.spacing[0], image.spacing), encoding="utf-8")
    (output / "LICENSE.txt").write_text(LICENSE, encoding="utf-8")
    return output


def _readme(cases: list[dict], gap_mm: float, spacing: tuple[float, ...]) -> str:
    rows = "\n".join(
        f"| {c['case']} | {c['slices'][0]}-{c['slices'][1] - 1} | "
        + " | ".join(map(str, c["voxels_per_class"]))
        + " |"
        for c in cases
    )
    return f"""# mni152-tissue

Built by `medcl-data build mni152-tissue`.

- **Source**: the MNI ICBM152 non-linear symmetric 2009a T1 template and its GM and WM probability maps, as bundled
  in the nilearn package (`nilearn/datasets/data/`), spacing {" x ".join(f"{s:g}" for s in spacing)} mm (z, y, x).
- **Labels**: 0 background, 1 CSF, 2 GM, 3 WM. Inside the skull-stripped brain (T1 > 0) each voxel takes the
  largest of CSF = clip(1 - GM - WM, 0, 1), GM and WM; outside it is background. The template is a population
  average: smooth, without noise or bias field, so train with intensity augmentation.
- **Cases**: the brain's axial extent split into {len(cases)} contiguous blocks; {gap_mm:g} mm of slices between
  blocks are left out, so no slice of one block lies within {gap_mm:g} mm of another block. Use the blocks as folds.

| case | axial slices | background | CSF | GM | WM |
|---|---|---|---|---|---|
{rows}

- **Licence**: see `LICENSE.txt` (MNI template notice; nilearn BSD-3-Clause).
"""
