"""Tiny synthetic datasets in each layout the trainer reads, for everyone's tests.

The images are learnable: each foreground class is a blob with its own mean intensity (plus noise) inside
a "body" region, so a few iterations of any network move the Dice up. Everything is written through
``napari_medcl.io.write_image``, so the files carry exactly the geometry asked for.

- :func:`make_msd_dataset`: ``imagesTr/<case>_0000.nii.gz`` (+ ``_0001``...), ``labelsTr``, ``dataset.json``.
- :func:`make_folder2d_dataset`: ISIC style ``images/`` + ``masks/<stem>_segmentation.png``.
- :func:`make_acdc_dataset`: ``patientXXX/patientXXX_frameYY.nii.gz`` + ``_gt`` (background, RV, MYO, LV).
- :func:`write_volume`: one image file with a given geometry (for tests that break a dataset on purpose).

Import as ``from tests.dataset_factory import make_msd_dataset``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_medcl.io import write_image
from napari_medcl.volume import Volume


def write_volume(
    path: str | Path,
    array: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: np.ndarray | None = None,
    channel_axis: bool = False,
) -> Path:
    """Write ``array`` ((*S) or (C, *S) with ``channel_axis``) with the given geometry (array order)."""
    array = np.asarray(array)
    ndim = array.ndim - (1 if channel_axis else 0)
    spacing = tuple(spacing) if spacing is not None else (1.0,) * ndim
    origin = tuple(origin) if origin is not None else (0.0,) * ndim
    direction = np.eye(ndim) if direction is None else np.asarray(direction)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_image(Volume(array, spacing, origin, direction, channel_axis=channel_axis), path)


def blob_labels(shape: Sequence[int], num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """(*shape) uint8: one ellipsoidal blob per foreground class, side by side along the last axis."""
    shape = tuple(shape)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    label = np.zeros(shape, dtype=np.uint8)
    bins = num_classes - 1
    for c in range(1, num_classes):
        centre = [n / 2 + rng.uniform(-n / 10, n / 10) for n in shape]
        width = shape[-1] / bins
        centre[-1] = width * (c - 0.5) + rng.uniform(-width / 10, width / 10)
        radius = [max(1.2, n / 5) for n in shape]
        radius[-1] = max(1.2, min(radius[-1], width / 2.5))
        inside = sum(((g - m) / r) ** 2 for g, m, r in zip(grid, centre, radius)) <= 1.0
        label[inside] = c
    return label


def blob_image(
    label: np.ndarray, rng: np.random.Generator, *, modality: str = "MRI", body_margin: int = 1
) -> np.ndarray:
    """(*S) float32 intensities for ``label``: zero outside a body box (MRI) or -1000 air (CT), a body
    value inside, and a class-specific mean on each blob, with Gaussian noise."""
    ct = modality.strip().lower() == "ct"
    body = np.zeros(label.shape, dtype=bool)
    body[tuple(slice(min(body_margin, n // 4), n - min(body_margin, n // 4)) for n in label.shape)] = True
    body |= label > 0
    if ct:
        image = np.full(label.shape, -1000.0)
        image[body] = 20.0 + rng.normal(0, 15, size=int(body.sum()))
        for c in range(1, int(label.max()) + 1):
            image[label == c] = 20.0 + 80.0 * c + rng.normal(0, 15, size=int((label == c).sum()))
    else:
        image = np.zeros(label.shape)
        image[body] = 100.0 + rng.normal(0, 10, size=int(body.sum()))
        for c in range(1, int(label.max()) + 1):
            image[label == c] = 100.0 + 60.0 * c + rng.normal(0, 10, size=int((label == c).sum()))
    return image.astype(np.float32)


def make_msd_dataset(
    root: str | Path,
    *,
    n_cases: int = 4,
    shape: Sequence[int] = (12, 20, 18),
    spacing: Sequence[float] = (2.0, 1.0, 1.2),
    num_classes: int = 3,
    channels: int = 1,
    modality: str = "MRI",
    seed: int = 0,
    spacings: Sequence[Sequence[float]] | None = None,
    labels_form: str = "v2",
    ct_outliers: bool = True,
) -> Path:
    """An MSD / nnU-Net v2 dataset under ``root``: cases ``case_000``..., ``channels`` files each.

    ``spacings`` gives each case its own spacing (default: all ``spacing``). ``labels_form`` "v2" writes
    ``labels`` as ``{"background": 0, ...}`` and ``channel_names``; "msd" writes ``{"0": "background"}`` and
    ``modality``. With ``modality="CT"`` and ``ct_outliers``, 0.25% of foreground voxels are 3000 HU (metal), so
    percentile clipping has something to clip."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    class_names = ["background", *(f"class{c}" for c in range(1, num_classes))]
    names = {str(i): (modality if i == 0 else f"{modality}{i}") for i in range(channels)}
    meta: dict = {"name": root.name, "file_ending": ".nii.gz", "numTraining": n_cases}
    if labels_form == "v2":
        meta["labels"] = {name: i for i, name in enumerate(class_names)}
        meta["channel_names"] = names
    else:
        meta["labels"] = {str(i): name for i, name in enumerate(class_names)}
        meta["modality"] = names
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    for k in range(n_cases):
        case = f"case_{k:03d}"
        case_spacing = tuple(spacings[k]) if spacings is not None else tuple(spacing)
        label = blob_labels(shape, num_classes, rng)
        for ch in range(channels):
            image = blob_image(label, rng, modality=modality)
            if ch > 0:  # a second contrast: the same anatomy, other intensities
                image = np.where(image != 0, 400.0 - image, 0.0).astype(np.float32)
            if modality.lower() == "ct" and ct_outliers:
                fg = np.flatnonzero(label.ravel() > 0)
                hit = rng.choice(fg, max(1, fg.size // 400), replace=False)
                image.ravel()[hit] = 3000.0
            write_volume(root / "imagesTr" / f"{case}_{ch:04d}.nii.gz", image, spacing=case_spacing)
        write_volume(root / "labelsTr" / f"{case}.nii.gz", label, spacing=case_spacing)
    return root


def make_folder2d_dataset(
    root: str | Path,
    *,
    n_cases: int = 6,
    shape: Sequence[int] = (40, 48),
    rgb: bool = True,
    mask_style: str = "0/255",
    num_classes: int = 2,
    image_ext: str = ".png",
    mask_suffix: str = "_segmentation",
    seed: int = 0,
) -> Path:
    """An ISIC-style dataset: ``images/img_XXX<image_ext>`` (uint8 RGB or gray) and
    ``masks/img_XXX<mask_suffix>.png`` with 0/255 (``mask_style="0/255"``, binary) or class ids ("ids")."""
    if mask_style not in ("0/255", "ids"):
        raise ValueError(f"mask_style must be '0/255' or 'ids', got {mask_style!r}")
    if mask_style == "0/255" and num_classes != 2:
        raise ValueError("0/255 masks are binary: num_classes must be 2")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for k in range(n_cases):
        stem = f"img_{k:03d}"
        label = blob_labels(shape, num_classes, rng)
        gray = np.clip(blob_image(label, rng, body_margin=0), 0, 255)
        if rgb:  # skin-like background, darker lesion; channels differ so RGB carries information
            image = np.stack([gray, gray * 0.8 + 20, 255 - gray]).clip(0, 255).astype(np.uint8)
        else:
            image = gray.astype(np.uint8)
        write_volume(root / "images" / f"{stem}{image_ext}", image, channel_axis=rgb)
        mask = (label > 0).astype(np.uint8) * 255 if mask_style == "0/255" else label
        write_volume(root / "masks" / f"{stem}{mask_suffix}.png", mask)
    return root


def make_acdc_dataset(
    root: str | Path,
    *,
    n_patients: int = 3,
    frames: Sequence[int] = (1, 12),
    shape: Sequence[int] = (6, 24, 20),
    spacing: Sequence[float] = (10.0, 1.5, 1.5),
    seed: int = 0,
) -> Path:
    """An ACDC-style dataset: ``patient001/patient001_frame01.nii.gz`` + ``_gt`` per frame, with RV (1),
    MYO (2, a ring around the LV) and LV (3) on every slice, and an ``Info.cfg`` per patient."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.meshgrid(np.arange(y), np.arange(x), indexing="ij")
    for p in range(1, n_patients + 1):
        folder = root / f"patient{p:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Info.cfg").write_text(f"ED: {frames[0]}\nES: {frames[-1]}\nGroup: NOR\n")
        for frame in frames:
            label = np.zeros(shape, dtype=np.uint8)
            cy, cx = y / 2 + rng.uniform(-1, 1), x * 0.6 + rng.uniform(-1, 1)
            for s in range(z):
                r_lv = max(
                    1.5, min(y, x) / 6 * (1 - 0.4 * abs(s - z / 2) / z) * (0.8 if frame != frames[0] else 1)
                )
                dist = np.hypot(yy - cy, xx - cx)
                label[s][dist <= r_lv + 2] = 2
                label[s][dist <= r_lv] = 3
                rv = np.hypot(yy - cy, xx - (cx - r_lv - 4.5)) <= r_lv * 0.9
                label[s][rv & (label[s] == 0)] = 1
            image = np.full(shape, 50.0) + rng.normal(0, 8, size=shape)
            means = {1: 180.0, 2: 90.0, 3: 220.0}
            for c, m in means.items():
                image[label == c] = m + rng.normal(0, 8, size=int((label == c).sum()))
            name = f"patient{p:03d}_frame{frame:02d}"
            write_volume(folder / f"{name}.nii.gz", image.astype(np.float32), spacing=spacing)
            write_volume(folder / f"{name}_gt.nii.gz", label, spacing=spacing)
    return root


def make_noisy_label_dataset(root: Path) -> Path:
    """An MSD-style dataset of two 6x14x12 cases (spacing 3 x 1 x 0.5 mm) whose intensities are the labels
    (background, a, b) plus uniform noise of +-0.2: a nearest-class model segments it exactly."""
    rng = np.random.default_rng(0)
    for k in range(2):
        label = np.zeros((6, 14, 12), dtype=np.uint8)
        label[1:4, 2:7, 3:8] = 1
        label[2:5, 8:12, 2:6] = 2
        image = label.astype(np.float32) + rng.uniform(-0.2, 0.2, label.shape).astype(np.float32)
        write_volume(root / "imagesTr" / f"c{k}_0000.nii.gz", image, spacing=(3.0, 1.0, 0.5))
        write_volume(root / "labelsTr" / f"c{k}.nii.gz", label, spacing=(3.0, 1.0, 0.5))
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "MRI"}})
    )
    return root
