"""Checked dataset -> train/val cases that are cropped, normalised and resampled, cached on disk.

Per case, in nnU-Net's order: crop to the box of non-zero voxels (and labels), then
``napari_medcl.preprocess.to_model_grid``, the step inference runs on every scan: normalise each channel,
resample to the target spacing (images linear, labels nearest) on the same centre-aligned grids, so a model
sees the same intensities and voxel grid in training and in the product.

- Target spacing: the per-axis median over every usable case (spacing carries no label information, so all
  folds share it), an explicit value, or None (as is). folder2d pictures are unit-spacing pixel grids:
  "median" means None there, and an explicit value is in pixels. A 2D model on 3D volumes resamples in-plane only: axis
  0 (z) keeps each case's spacing, and patches are slices along it.
- Normalisation from the channel names: ``CT`` clips to the 0.5/99.5 percentiles of foreground intensities of
  the *training* cases and z-scores with their mean/std (nnU-Net); ``noNorm``/``none`` leaves values alone;
  anything else is a per-image z-score (over the non-zero mask when ``crop_nonzero``).
- Split: k-fold over subjects with ``split_seed`` (or one ``val_fraction`` split); ``fraction`` then keeps a
  seeded share of the training cases, at least one, nested across fractions for one seed.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.preprocess import full_target, mask_box, resampled_origin, to_model_grid
from napari_medcl.volume import Volume
from training.data.cache import CaseCache, digest
from training.data.check import (
    DatasetScan,
    default_cache_dir,
    fingerprint_key,
    parallel_map,
    read_case,
    scan_dataset,
)
from training.data.config import DataConfig
from training.data.layouts import CaseFiles, DatasetError, Layout, discover

__all__ = ["DatasetInfo", "PreparedCase", "prepare_dataset", "split_cases", "subsample_cases"]

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 3
CT_PERCENTILES = (0.5, 99.5)
RESCALE_PERCENTILES = (0.5, 99.5)
# Voxel positions remembered per foreground class of a case for foreground-centred patches (nnU-Net: 10,000).
LOCATIONS_PER_CLASS = 10_000


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and its ModelSpec need to know about the dataset.

    ``spacing``: the target spacing for the model's ``spatial_dims`` in array order (None: cases kept as is).
    ``normalization``: ModelSpec form, ``{"kind": "zscore", "use_nonzero_mask": bool}``,
    ``{"kind": "ct", "clip_low", "clip_high", "mean", "std"}`` or ``{"kind": "none"}``; channels normalised
    differently give ``{"kind": "per_channel", "channels": [one of those per channel]}``.
    ``median_shape``: median spatial shape of the prepared cases for the model's ``spatial_dims`` (in-plane
    for a 2D model on 3D volumes), a natural default patch size.
    ``nonzero_is_foreground``: in every case the label is background exactly where the image is zero in all
    channels (a skull-stripped scan labelled into tissues), so inference may rule background out inside
    the non-zero mask (ModelSpec field of the same name).
    """

    name: str
    num_classes: int
    class_names: list[str]
    channel_names: list[str]
    in_channels: int
    spacing: tuple[float, ...] | None
    normalization: dict
    median_shape: tuple[int, ...] | None = None
    nonzero_is_foreground: bool = False


@dataclass(frozen=True, eq=False)
class PreparedCase:
    """One preprocessed case. ``image`` (C, *S) float32 normalised; ``label`` (*S) uint8 class ids; both may be
    read-only memory maps of the cache. ``spacing`` one value per axis of ``label`` (a 3D volume keeps 3 even
    for a 2D model). ``source``: files, original shape/spacing, crop box and the geometry of the grid.
    ``locations``: {class: (n, label.ndim) int32 voxel positions}, up to 10,000 per foreground class (None:
    computed by whoever needs them, see :func:`class_locations`)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...]
    source: dict
    locations: dict[int, np.ndarray] | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------------ choices


def channel_kind(name: str) -> str:
    """Normalisation kind for a channel name (nnU-Net's names): "ct", "none" or "zscore"."""
    key = name.strip().lower()
    if key == "ct":
        return "ct"
    if key in ("nonorm", "none"):
        return "none"
    return "zscore"


def channel_normalizations(
    scan: DatasetScan, train: list[CaseFiles], *, crop_nonzero: bool, normalization: str = "zscore"
) -> list[dict[str, Any]]:
    """One ModelSpec-style normalisation dict per channel; CT statistics from the training cases only.

    ``normalization`` (``DataConfig.normalization``) says how channels that are neither CT nor "none" are
    normalised: ``zscore`` or ``rescale`` (percentiles ``RESCALE_PERCENTILES`` to 0 and 1).
    """
    out: list[dict[str, Any]] = []
    for c, name in enumerate(scan.channel_names):
        kind = channel_kind(name)
        if kind == "ct":
            pooled = np.concatenate([scan.fingerprints[case.case_id].foreground[c] for case in train])
            if pooled.size == 0:
                raise DatasetError(
                    [
                        f"channel {c} ({name}) is CT but the training cases have no foreground voxels to take its "
                        "intensity statistics from"
                    ],
                    root=scan.layout.root,
                )
            low, high = np.percentile(pooled.astype(np.float64), CT_PERCENTILES)
            out.append(
                {
                    "kind": "ct",
                    "clip_low": float(low),
                    "clip_high": float(high),
                    "mean": float(pooled.mean(dtype=np.float64)),
                    "std": float(pooled.std(dtype=np.float64)),
                }
            )
        elif kind == "none":
            out.append({"kind": "none"})
        elif normalization == "rescale":
            low, high = RESCALE_PERCENTILES
            out.append({"kind": "rescale", "low": low, "high": high, "use_nonzero_mask": bool(crop_nonzero)})
        else:
            out.append({"kind": "zscore", "use_nonzero_mask": bool(crop_nonzero)})
    return out


def spec_normalization(per_channel: list[dict[str, Any]]) -> dict[str, Any]:
    """The single ModelSpec normalisation when every channel shares one, else the per-channel form."""
    if all(d == per_channel[0] for d in per_channel):
        return dict(per_channel[0])
    return {"kind": "per_channel", "channels": [dict(d) for d in per_channel]}


def target_spacing(cfg: DataConfig, scan: DatasetScan, spatial_dims: int) -> tuple[float, ...] | None:
    """The model's target spacing (``spatial_dims`` values, array order) or None."""
    value = cfg.target_spacing
    if value is None:
        return None
    in_plane = scan.spatial_dims == 3 and spatial_dims == 2
    if value == "median" and scan.layout.pixel_grid:
        return None  # pictures are pixel grids: nothing to resample, and no spacing for inference to match
    if value == "median":
        spacings = np.array([fp.spacing for fp in scan.fingerprints.values()], dtype=np.float64)
        median = np.median(spacings, axis=0)
        return tuple(float(s) for s in (median[1:] if in_plane else median))
    if len(value) != spatial_dims:
        axes = "(y, x)" if spatial_dims == 2 else "(z, y, x)"
        raise DatasetError(
            [
                f"data.target_spacing has {len(value)} values; a {spatial_dims}D model takes {spatial_dims} {axes}"
            ],
            root=scan.layout.root,
        )
    return tuple(float(s) for s in value)


# ------------------------------------------------------------------------------------------------ splits


def split_cases(
    cases: list[CaseFiles],
    *,
    fold: int,
    num_folds: int,
    val_fraction: float | None,
    split_seed: int,
    val_cases: Sequence[str] | None = None,
) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """(train, val) over subjects: fold ``fold`` of a seeded k-fold split, or one seeded ``val_fraction`` split.

    ``val_cases`` (case ids or subjects) names the validation set outright; fold and val_fraction are then unused.
    """
    subjects = sorted({case.subject for case in cases})
    n = len(subjects)
    if val_cases is not None:
        wanted = set(val_cases)
        val_subjects = {case.subject for case in cases if case.case_id in wanted or case.subject in wanted}
        found = {case.case_id for case in cases} | {case.subject for case in cases}
        missing = sorted(wanted - found)
        if missing:
            raise DatasetError(
                [f"data.val_cases names case(s) the dataset does not hold: {', '.join(missing)}"]
            )
        if val_subjects == set(subjects):
            raise DatasetError(["data.val_cases holds every case: nothing is left to train on"])
        train = [case for case in cases if case.subject not in val_subjects]
        return train, [case for case in cases if case.subject in val_subjects]
    order = [subjects[i] for i in np.random.default_rng(split_seed).permutation(n)]
    if val_fraction is not None:
        if n < 2:
            raise DatasetError([f"{n} subject(s): a train/val split needs at least 2"])
        n_val = min(n - 1, max(1, round(n * val_fraction)))
        val_subjects = set(order[:n_val])
    else:
        if n < num_folds:
            raise DatasetError(
                [
                    f"{n} subject(s) cannot make {num_folds} folds; lower data.num_folds or set data.val_fraction"
                ]
            )
        val_subjects = set(np.array_split(np.array(order, dtype=object), num_folds)[fold].tolist())
    train = [case for case in cases if case.subject not in val_subjects]
    val = [case for case in cases if case.subject in val_subjects]
    return train, val


def subsample_cases(cases: list[CaseFiles], fraction: float, seed: int) -> list[CaseFiles]:
    """A seeded share ``fraction`` of ``cases`` (at least one), in their original order. For one seed a
    smaller fraction keeps a subset of what a larger one keeps."""
    if fraction >= 1.0:
        return list(cases)
    keep = max(1, round(fraction * len(cases)))
    chosen = set(np.random.default_rng(seed).permutation(len(cases))[:keep].tolist())
    return [case for i, case in enumerate(cases) if i in chosen]


# ------------------------------------------------------------------------------------------------ one case


def class_locations(label: np.ndarray, case_id: str) -> dict[int, np.ndarray]:
    """{class: (n, ndim) int32 voxel positions} of each foreground class in ``label`` (*S), at most
    LOCATIONS_PER_CLASS each, chosen with a generator seeded by the case id (the same every run)."""
    flat = np.asarray(label).ravel()
    index = np.flatnonzero(flat)
    values = flat[index]
    rng = np.random.default_rng(zlib.crc32(case_id.encode("utf-8")))
    out = {}
    for cls in np.unique(values):
        chosen = index[values == cls]
        if chosen.size > LOCATIONS_PER_CLASS:
            chosen = np.sort(rng.choice(chosen, LOCATIONS_PER_CLASS, replace=False))
        out[int(cls)] = np.stack(np.unravel_index(chosen, label.shape), axis=1).astype(np.int32)
    return out


def preprocess_case(
    image: Volume,
    label: np.ndarray,
    *,
    target: tuple[float, ...] | None,
    per_channel: list[dict[str, Any]],
    crop_nonzero: bool,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Crop, normalise and resample one case: (image (C, *S') float32, label (*S') uint8, geometry).

    ``target`` is the full per-axis spacing for this case (None: keep). ``geometry`` holds the crop box in
    the original grid, the spacing/origin/direction/shape of the result, and ``nonzero_is_foreground``
    (whether the label is background exactly where the original image is zero in every channel)."""
    nonzero = image.nonzero_mask()
    nonzero_is_foreground = labels_fill_nonzero(nonzero, label)
    full = tuple(slice(0, n) for n in image.spatial_shape)
    # The box of the voxels non-zero in some channel or labelled foreground.
    box = mask_box(nonzero | (label > 0)) if crop_nonzero else None
    box = full if box is None else box
    if box != full:
        image = image.crop(box)
        label = label[box]
    shape, spacing, origin = image.spatial_shape, image.spacing, image.origin
    data, label, scales = to_model_grid(
        image.array, spacing, spec_normalization(per_channel), target, label=label
    )  # (C, *S') float32, (*S')
    if scales is not None:
        out_shape = tuple(data.shape[1:])
        origin = resampled_origin(origin, spacing, image.direction, shape, out_shape, target)
        shape, spacing = out_shape, tuple(target)
    geometry = {
        "crop_box": [[s.start, s.stop] for s in box],
        "shape": list(shape),
        "spacing": list(spacing),
        "origin": list(origin),
        "direction": image.direction.tolist(),
        "nonzero_is_foreground": nonzero_is_foreground,
    }
    return np.ascontiguousarray(data, dtype=np.float32), np.ascontiguousarray(label, dtype=np.uint8), geometry


def labels_fill_nonzero(nonzero: np.ndarray, label: np.ndarray) -> bool:
    """nonzero (*S) bool (an image's ``Volume.nonzero_mask()``), label (*S): True when the label is background
    exactly where the image is zero, and both the zero and the non-zero region are present (an all-zero or
    zero-free image says nothing)."""
    if nonzero.shape != label.shape:
        raise ValueError(f"image {nonzero.shape} and label {label.shape} do not share a grid")
    return bool(nonzero.any() and not nonzero.all() and np.array_equal(nonzero, label != 0))


def prepare_case(
    case: CaseFiles,
    layout: Layout,
    scan: DatasetScan,
    cache: CaseCache,
    *,
    target: tuple[float, ...] | None,
    per_channel: list[dict[str, Any]],
    crop_nonzero: bool,
) -> PreparedCase:
    """The preprocessed case, from the cache when the files and settings are unchanged."""
    fp = scan.fingerprints[case.case_id]
    case_target = full_target(fp.spacing, target)
    key = digest(
        [PREPROCESS_VERSION, fingerprint_key(case, layout), case_target, per_channel, bool(crop_nonzero)]
    )
    cached = cache.load_case(case.case_id, key)
    if cached is not None:
        image, label, locations, meta = cached
        return PreparedCase(case.case_id, image, label, tuple(meta["spacing"]), meta["source"], locations)
    volume, label_array, problems = read_case(case, layout)
    if volume is None or label_array is None:  # the files changed since they were checked
        raise DatasetError(problems or [f"case {case.case_id}: cannot be read"], root=layout.root)
    image, label, geometry = preprocess_case(
        volume, label_array, target=case_target, per_channel=per_channel, crop_nonzero=crop_nonzero
    )
    source = {
        "layout": layout.kind,
        "images": [str(p) for p in case.images],
        "label": str(case.label),
        "subject": case.subject,
        "original_shape": list(volume.spatial_shape),
        "original_spacing": list(volume.spacing),
        **geometry,
    }
    locations = class_locations(label, case.case_id)
    meta = {"spacing": geometry["spacing"], "source": source}
    stored = cache.save_case(case.case_id, key, image, label, locations, meta)
    if stored is not None:
        image, label = stored
    return PreparedCase(case.case_id, image, label, tuple(geometry["spacing"]), source, locations)


# ------------------------------------------------------------------------------------------------ dataset


def prepare_dataset(
    cfg: DataConfig, *, spatial_dims: int, seed: int, cache_dir: Path | None = None
) -> tuple[DatasetInfo, list[PreparedCase], list[PreparedCase]]:
    """Check the dataset, split it, and preprocess every case: (info, train cases, val cases).

    Raises DatasetError listing every problem of the dataset before any case is preprocessed. ``seed``
    picks the ``fraction`` subset; the fold split uses ``cfg.split_seed``. The cache lives in
    ``cfg.cache_dir``, else ``cache_dir``, else ``<root>/.medcl-cache``.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    layout = discover(cfg.layout, cfg.root)
    if cfg.require_subjects and layout.subjects_from is None:
        raise DatasetError(
            [
                'data.require_subjects is true but the dataset names no subjects: add a "subjects" object '
                "(case id -> patient) to dataset.json, or a subjects.json / subjects.csv file to the dataset "
                "folder, so that one patient's cases never sit on both sides of the split"
            ],
            root=layout.root,
        )
    cache = CaseCache(default_cache_dir(cfg, cache_dir))
    workers = max(1, cfg.num_workers)
    scan = scan_dataset(layout, cache, workers=workers)
    if scan.spatial_dims == 2 and spatial_dims == 3:
        raise DatasetError(
            [
                f"the {layout.kind} dataset holds 2D images; a 3D model cannot train on them (set model.spatial_dims: 2)"
            ],
            root=layout.root,
        )
    train, val = split_cases(
        list(scan.cases),
        fold=cfg.fold,
        num_folds=cfg.num_folds,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        val_cases=cfg.val_cases,
    )
    train = subsample_cases(train, cfg.fraction, seed)
    target = target_spacing(cfg, scan, spatial_dims)
    per_channel = channel_normalizations(
        scan, train, crop_nonzero=cfg.crop_nonzero, normalization=cfg.normalization
    )

    def prepare(case: CaseFiles) -> PreparedCase:
        return prepare_case(
            case, layout, scan, cache, target=target, per_channel=per_channel, crop_nonzero=cfg.crop_nonzero
        )

    prepared = parallel_map(prepare, [*train, *val], workers)
    train_cases, val_cases = prepared[: len(train)], prepared[len(train) :]
    shapes = np.array([c.label.shape[-spatial_dims:] for c in prepared])
    info = DatasetInfo(
        name=layout.name,
        num_classes=len(scan.class_names),
        class_names=list(scan.class_names),
        channel_names=list(scan.channel_names),
        in_channels=len(scan.channel_names),
        spacing=target,
        normalization=spec_normalization(per_channel),
        median_shape=tuple(int(v) for v in np.median(shapes, axis=0)),
        nonzero_is_foreground=all(c.source.get("nonzero_is_foreground", False) for c in prepared),
    )
    log.info(
        "dataset %s: %d training and %d validation cases (fold %s, fraction %s), spacing %s",
        info.name,
        len(train_cases),
        len(val_cases),
        "val_fraction" if cfg.val_fraction is not None else cfg.fold,
        cfg.fraction,
        target,
    )
    return info, train_cases, val_cases
