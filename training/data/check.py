"""Read and check every case of a dataset before anything trains; report every problem at once.

:func:`read_case` is the one place where a case's files become arrays (through ``napari_medcl.io``, so the
geometry is read one way everywhere): the channel files are stacked, the label is checked against the image
(size, spacing, origin, direction) and its values are checked (integers, no 255 in a mask that is not 0/255).
:func:`scan_dataset` runs it over every case (results cached per case), then checks the dataset as a whole
(channel counts, label values against the declared classes, some foreground somewhere) and raises one
:class:`~training.data.layouts.DatasetError` listing every problem, each naming its case or file.
:func:`check_dataset` is ``medcl-train --check``: the same scan, and a short summary when all is well.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import InputError
from napari_medcl.volume import Volume, identity_geometry
from training.data.cache import CaseCache, digest, file_stamps
from training.data.config import DataConfig
from training.data.layouts import CaseFiles, DatasetError, Layout, discover

__all__ = ["CaseFingerprint", "DatasetScan", "check_dataset", "read_case", "scan_dataset"]

# Relative tolerance on spacing between an image and its label (or two channel files); origins may differ by
# this fraction of a voxel, direction cosines by this much.
GEOMETRY_RTOL = 1e-3
# Foreground intensities kept per case for CT statistics (nnU-Net keeps 10,000 per case too).
FOREGROUND_SAMPLES = 10_000
FINGERPRINT_VERSION = 1


@dataclass(frozen=True, eq=False)
class CaseFingerprint:
    """What reading case ``case_id`` found. ``shape``/``spacing`` are spatial, in array order; ``foreground``
    (C, n) float32 intensities at up to 10,000 labelled voxels; ``problems`` one line each (empty: usable)."""

    case_id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int
    label_values: tuple[int, ...]
    foreground: np.ndarray
    problems: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class DatasetScan:
    """A checked dataset: its layout, the usable cases with their fingerprints, and its classes/channels."""

    layout: Layout
    cases: tuple[CaseFiles, ...]
    fingerprints: dict[str, CaseFingerprint]
    class_names: tuple[str, ...]
    channel_names: tuple[str, ...]
    spatial_dims: int


# ------------------------------------------------------------------------------------------------ one case


def _read(path: Path, case_id: str, problems: list[str], *, pixel_grid: bool) -> Volume | None:
    from napari_medcl.io import read_image

    try:
        volume = read_image(path)
        return replace(volume, **identity_geometry(volume.spatial_shape)) if pixel_grid else volume
    except InputError as error:
        problems.append(f"case {case_id}: unreadable: {error}")
    except (OSError, RuntimeError, ValueError, MemoryError) as error:
        problems.append(f"case {case_id}: unreadable: {path}: {type(error).__name__}: {error}")
    return None


def geometry_mismatch(a: Volume, b: Volume) -> str | None:
    """How the voxel grids of ``a`` and ``b`` differ (size, then spacing, origin, direction), or None."""
    if a.spatial_shape != b.spatial_shape:
        return f"size {list(b.spatial_shape)} differs from {list(a.spatial_shape)}"
    spacing_a, spacing_b = np.asarray(a.spacing), np.asarray(b.spacing)
    if not np.allclose(spacing_b, spacing_a, rtol=GEOMETRY_RTOL, atol=0):
        return f"spacing {_fmt(spacing_b)} differs from {_fmt(spacing_a)}"
    origin_tol = GEOMETRY_RTOL * float(spacing_a.max())
    if not np.allclose(b.origin, a.origin, rtol=0, atol=origin_tol):
        return f"origin {_fmt(b.origin)} differs from {_fmt(a.origin)}"
    if not np.allclose(b.direction, a.direction, rtol=0, atol=GEOMETRY_RTOL):
        return f"direction {_fmt(b.direction.ravel())} differs from {_fmt(a.direction.ravel())}"
    return None


def _fmt(values: Any) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in np.ravel(values)) + "]"


def read_case(case: CaseFiles, layout: Layout) -> tuple[Volume | None, np.ndarray | None, list[str]]:
    """Read one case: (image Volume (C, *S) float32 with channel axis, label (*S) uint8, problems).

    The image and label are None when there is a problem. A folder2d mask that holds only 0 and 255 becomes
    0/1; an RGB mask whose channels are equal becomes one channel; folder2d pictures get unit spacing.
    """
    problems: list[str] = []
    cid = case.case_id
    volumes = [_read(path, cid, problems, pixel_grid=layout.pixel_grid) for path in case.images]
    label = _read(case.label, cid, problems, pixel_grid=layout.pixel_grid) if case.label is not None else None
    if case.label is None:
        problems.append(f"case {cid}: missing label")
    if problems or label is None or any(v is None for v in volumes):
        return None, None, problems

    first = volumes[0]
    if len(volumes) > 1:
        for path, volume in zip(case.images, volumes):
            if volume.channel_axis:
                problems.append(
                    f"case {cid}: {path.name} has {volume.num_channels} channels; one per file expected"
                )
            elif (why := geometry_mismatch(first, volume)) is not None:
                problems.append(f"case {cid}: image {path.name} does not match {case.images[0].name}: {why}")
        if problems:
            return None, None, problems
        array = np.stack([v.array for v in volumes]).astype(np.float32, copy=False)  # (C, *S)
    else:
        array = first.array if first.channel_axis else first.array[None]
        array = array.astype(np.float32, copy=False)  # (C, *S)
    if layout.kind == "folder2d" and first.spatial_dims != 2:
        problems.append(
            f"case {cid}: {case.images[0].name} is {first.spatial_dims}D; folder2d expects 2D images"
        )
        return None, None, problems
    image = first.with_array(array, channel_axis=True)

    label_array = label.array
    if label.channel_axis:
        colour = label_array[:3]  # an alpha channel, if any, says nothing about the class
        if not all(np.array_equal(colour[0], c) for c in colour[1:]):
            problems.append(
                f"case {cid}: label {case.label.name} has {label.num_channels} differing channels; "
                "a label map has one channel of class ids"
            )
            return None, None, problems
        label_array = label_array[0]
        label = label.with_array(label_array)
    if (why := geometry_mismatch(image, label)) is not None:
        problems.append(
            f"case {cid}: label {case.label.name} does not match image {case.images[0].name}: {why}"
        )
        return None, None, problems
    values, problem = _label_values(label_array)
    if problem is None and layout.binary_255 and 255 in values:
        if set(values) <= {0, 255}:
            label_array = (label_array == 255).astype(np.uint8)
            values = tuple(sorted({0 if v == 0 else 1 for v in values}))
        else:
            problem = (
                f"has values {_short(values)}: 255 in a mask that is not 0/255 binary "
                "(JPEG artefacts? save masks as PNG)"
            )
    if problem is not None:
        problems.append(f"case {cid}: label {case.label.name} {problem}")
        return None, None, problems
    return image, np.asarray(label_array).astype(np.uint8, copy=False), problems


def _short(values: tuple[int, ...] | list[Any], limit: int = 8) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _label_values(label: np.ndarray) -> tuple[tuple[int, ...], str | None]:
    """The class ids present in ``label`` or a problem (float ids that are not integers, negative, > 255)."""
    if label.dtype.kind == "b":
        return tuple(int(v) for v in np.flatnonzero(np.bincount(label.ravel().astype(np.uint8)))), None
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            return (), "has NaN or infinite values"
        fractional = label[label != np.round(label)]
        if fractional.size:
            return (
                (),
                f"has values that are not integers (e.g. {float(fractional.flat[0]):.6g}); float labels must hold whole class ids",
            )
    elif label.dtype.kind not in "iu":
        return (), f"has voxel type {label.dtype}, not integer class ids"
    low, high = float(label.min()), float(label.max())
    if low < 0:
        return (), f"has negative values (min {low:g})"
    if high > 255:
        return (), f"has values up to {high:g}; class ids above 255 are not supported"
    counts = np.bincount(label.ravel().astype(np.uint8), minlength=1)
    return tuple(int(v) for v in np.flatnonzero(counts)), None


def _foreground_samples(image: np.ndarray, label: np.ndarray, case_id: str) -> np.ndarray:
    """Intensities (C, n) at up to FOREGROUND_SAMPLES labelled voxels, the same ones every run."""
    index = np.flatnonzero(label.ravel() > 0)
    if index.size > FOREGROUND_SAMPLES:
        rng = np.random.default_rng(zlib.crc32(case_id.encode("utf-8")))
        index = np.sort(rng.choice(index, FOREGROUND_SAMPLES, replace=False))
    flat = image.reshape(image.shape[0], -1)  # (C, N)
    return flat[:, index].astype(np.float32)


def fingerprint_key(case: CaseFiles, layout: Layout) -> str:
    files = [*case.images, *([case.label] if case.label is not None else [])]
    return digest(
        [FINGERPRINT_VERSION, layout.kind, layout.binary_255, layout.pixel_grid, file_stamps(files)]
    )


def fingerprint_case(case: CaseFiles, layout: Layout, cache: CaseCache) -> CaseFingerprint:
    """The case's fingerprint, from the cache when its files have not changed, else by reading it."""
    key = fingerprint_key(case, layout)
    cached = cache.load_fingerprint(case.case_id, key)
    if cached is not None:
        meta, samples = cached
        return CaseFingerprint(
            case.case_id,
            tuple(meta["shape"]),
            tuple(meta["spacing"]),
            int(meta["channels"]),
            tuple(meta["label_values"]),
            samples,
            tuple(meta["problems"]),
        )
    image, label, problems = read_case(case, layout)
    if image is None or label is None:
        fp = CaseFingerprint(case.case_id, (), (), 0, (), np.zeros((0, 0), np.float32), tuple(problems))
    else:
        fp = CaseFingerprint(
            case.case_id,
            image.spatial_shape,
            image.spacing,
            image.num_channels,
            _label_values(label)[0],
            _foreground_samples(image.array, label, case.case_id),
            tuple(problems),
        )
    meta = {
        "shape": list(fp.shape),
        "spacing": list(fp.spacing),
        "channels": fp.channels,
        "label_values": list(fp.label_values),
        "problems": list(fp.problems),
    }
    cache.save_fingerprint(case.case_id, key, meta, fp.foreground)
    return fp


# ------------------------------------------------------------------------------------------------ dataset


def parallel_map(function: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    """``[function(x) for x in items]`` on up to ``workers`` threads (image decoding and numpy release the
    GIL); results in input order."""
    if workers <= 1 or len(items) <= 1:
        return [function(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(function, items))


def scan_dataset(layout: Layout, cache: CaseCache, *, workers: int = 1) -> DatasetScan:
    """Fingerprint every case and check the dataset; raise DatasetError listing every problem found."""
    problems = list(layout.problems)
    if not layout.cases and not problems:
        problems.append(f"no cases found under {layout.root} for the {layout.kind} layout")
    fingerprints = parallel_map(lambda c: fingerprint_case(c, layout, cache), list(layout.cases), workers)
    for fp in fingerprints:
        problems.extend(fp.problems)
    good = [(case, fp) for case, fp in zip(layout.cases, fingerprints) if not fp.problems]
    if layout.cases and not good and not problems:
        problems.append("no usable case")

    dims = Counter(len(fp.shape) for _, fp in good)
    spatial_dims = dims.most_common(1)[0][0] if dims else 0
    for case, fp in good:
        if len(fp.shape) != spatial_dims:
            problems.append(f"case {case.case_id}: is {len(fp.shape)}D, the other cases are {spatial_dims}D")

    channel_names = layout.channel_names
    counts = Counter(fp.channels for _, fp in good)
    expected = (
        len(channel_names) if channel_names is not None else (counts.most_common(1)[0][0] if counts else 0)
    )
    for case, fp in good:
        if fp.channels != expected:
            declared = (
                f"dataset.json lists {expected}"
                if channel_names is not None
                else f"most cases have {expected}"
            )
            problems.append(f"case {case.case_id}: has {fp.channels} channel(s), {declared}")
    if channel_names is None:
        channel_names = ("R", "G", "B") if expected == 3 else tuple(f"channel{i}" for i in range(expected))

    class_names = layout.class_names
    if class_names is None:
        highest = max((max(fp.label_values, default=0) for _, fp in good), default=0)
        class_names = (
            ("background", "foreground")
            if highest <= 1
            else ("background", *(f"class{i}" for i in range(1, highest + 1)))
        )
    for case, fp in good:
        unexpected = [v for v in fp.label_values if v >= len(class_names)]
        if unexpected:
            problems.append(
                f"case {case.case_id}: label {case.label.name if case.label else ''} has values {unexpected} "
                f"not in the dataset's labels 0..{len(class_names) - 1} ({', '.join(class_names)})"
            )
    if good and not any(any(v > 0 for v in fp.label_values) for _, fp in good):
        problems.append("no case has any foreground label: every label map is all background")
    if problems:
        raise DatasetError(problems, root=layout.root)
    return DatasetScan(
        layout,
        tuple(case for case, _ in good),
        {case.case_id: fp for case, fp in good},
        tuple(class_names),
        tuple(channel_names),
        spatial_dims,
    )


def default_cache_dir(cfg: DataConfig, cache_dir: Path | None) -> Path:
    """``cfg.cache_dir`` when set, else the ``cache_dir`` the caller offers, else ``<root>/.medcl-cache``."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(cfg.root).expanduser() / ".medcl-cache"


def check_dataset(cfg: DataConfig, *, cache_dir: Path | None = None) -> list[str]:
    """Check the dataset ``cfg`` describes: raise DatasetError listing every problem (one line each, naming
    the case or file), or return a few summary lines when it is usable."""
    layout = discover(cfg.layout, cfg.root)
    scan = scan_dataset(layout, CaseCache(default_cache_dir(cfg, cache_dir)), workers=max(1, cfg.num_workers))
    fps = list(scan.fingerprints.values())
    spacings = np.array([fp.spacing for fp in fps])
    shapes = np.array([fp.shape for fp in fps])
    empty = [fp.case_id for fp in fps if not any(v > 0 for v in fp.label_values)]
    present = Counter(v for fp in fps for v in fp.label_values if v > 0)
    subjects = {case.subject for case in scan.cases}
    lines = [
        f"dataset {layout.name!r} ({layout.kind}, {layout.root}): {len(fps)} cases from {len(subjects)} subjects, "
        f"{scan.spatial_dims}D",
        f"channels: {len(scan.channel_names)} ({', '.join(scan.channel_names)})",
        f"classes: {len(scan.class_names)} ({', '.join(scan.class_names)}); cases containing each: "
        + ", ".join(f"{scan.class_names[c]} {present.get(c, 0)}" for c in range(1, len(scan.class_names))),
        f"spacing (array order) median {_fmt(np.median(spacings, axis=0))}, min {_fmt(spacings.min(0))}, "
        f"max {_fmt(spacings.max(0))}",
        f"shape median {[int(v) for v in np.median(shapes, axis=0)]}, min {shapes.min(0).tolist()}, "
        f"max {shapes.max(0).tolist()}",
    ]
    if empty:
        lines.append(
            f"{len(empty)} case(s) with no foreground (used for background patches): {_short(empty, 5)}"
        )
    return lines
