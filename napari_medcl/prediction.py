"""predict_iter(): read -> preprocess -> sliding windows through ONNX Runtime -> stitch -> postprocess.

The one inference path behind the Python API, the CLI and the napari widget. ``predict_iter`` is a generator:
it yields :class:`Progress` events (one per window while inferring) and, as its last item, the
:class:`~napari_medcl.volume.Prediction`; ``predict`` drains it. Everything runs on 3D grids ``(Z, Y, X)``:
a 2D image is a depth-1 volume, and a 2D model sees windows of depth 1, so a 2D model over a 3D volume runs
slice by slice through the same code.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl import __version__
from napari_medcl.errors import Cancelled, InputError, InputWarning, PredictionError, UsageError
from napari_medcl.io import MAX_BYTES, MAX_VOXELS
from napari_medcl.onnx_session import CUDA, open_session
from napari_medcl.preprocess import full_target, mask_box, resample_linear, to_model_grid
from napari_medcl.provenance import InputRecord, ModelRecord, PreprocessingRecord, Provenance, TilingRecord
from napari_medcl.region import plan_for_model
from napari_medcl.session import InferenceSession
from napari_medcl.spec import ModelSpec
from napari_medcl.tiling import (
    Accumulator,
    Box,
    StitchResult,
    argmax_entropy,
    label_dtype,
    padding,
    window_boxes,
    window_shape,
)
from napari_medcl.verdict import Verdict, assess, with_feature_distance
from napari_medcl.volume import Prediction, Volume

STAGES = ("preprocess", "infer", "postprocess")
# Output voxels per slab when the outputs are resampled back to the input grid (8 MiB of float32 a channel).
_POSTPROCESS_SLAB_VOXELS = 1 << 21
# Windows per model call on CUDA unless the caller says: as many as make up this many voxels (8 windows of the
# bundled 3D model, 80 of the 2D one's 128x128), at most CUDA_MAX_BATCH. On an H200 the 3D model's window took
# 1.79-1.89 / 1.63 ms at batch 8 / 32 against 5.46-6.78 at batch 1, the 2D model's 0.85-0.93 / 0.30 against
# 5.39-6.38; on the CT-size volume batch 32 gained 9-15% over 8 with the 3D model, for four times the
# activations per call, and 35% with the 2D one (docs/performance.md, "GPU check"). On a CPU one window at a
# time, as before.
CUDA_BATCH_VOXELS = 8 * 24 * 80 * 80
CUDA_MAX_BATCH = 32


def cuda_batch_size(window: tuple[int, ...]) -> int:
    """The default windows per model call on CUDA for windows of shape ``window``."""
    return max(1, min(CUDA_MAX_BATCH, CUDA_BATCH_VOXELS // math.prod(window)))


def stitch_threads(model_on_gpu: bool) -> int:
    """Threads for stitching and resampling the outputs: where the model runs on a CPU its own threads take
    the cores and the stitching is a small part of the time, so one; where it runs on a GPU the stitching is
    most of the wall time, so up to 4."""
    return min(4, os.cpu_count() or 1) if model_on_gpu else 1


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` steps of ``stage`` ("preprocess", "infer": windows, "postprocess");
    ``elapsed`` seconds since the prediction started."""

    done: int
    total: int
    stage: str
    elapsed: float


@dataclass(frozen=True, eq=False)
class _Prepared:
    """The normalised image on the model grid, padded for the windows.

    ``array`` (C, *grid) float32 with ``grid`` = (Z, Y, X) padded; ``crop`` the image inside the padding;
    ``model_shape`` the unpadded model grid; ``scales`` target / input spacing per axis (None: not
    resampled); ``window`` the window shape on the 3D grid (depth 1 for a 2D model)."""

    array: np.ndarray
    crop: tuple[slice, slice, slice]
    model_shape: tuple[int, int, int]
    scales: tuple[float, float, float] | None
    window: tuple[int, int, int]


def predict(
    image: Volume | str | Path, model: InferenceSession | str | Path | None = None, **options: Any
) -> Prediction:
    """Run :func:`predict_iter` to the end and return its Prediction (same arguments)."""
    result: Any = None
    for result in predict_iter(image, model, **options):  # noqa: B007  (the last item is the result)
        pass
    return result


def predict_iter(
    image: Volume | str | Path,
    model: InferenceSession | str | Path | None = None,
    *,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    overlap: float = 0.5,
    tta: bool = False,
    batch_size: int | None = None,
    return_probabilities: bool = False,
    cancel: Any = None,
    series: str | None = None,
    max_voxels: int | None = MAX_VOXELS,
    max_bytes: int | None = MAX_BYTES,
    scan_is_masked: bool | None = None,
    region: Any = None,
) -> Iterator[Progress | Prediction]:
    """Segment ``image`` with ``model``; yield Progress events, then the Prediction as the last item.

    ``image``: a Volume or a path (file or DICOM folder; ``series`` picks a DICOM series). ``model``: a
    LoadedModel or any other ``InferenceSession``, a bundled model name or an .onnx path; None = the
    default bundled model. ``device`` (auto/cpu/cuda), ``backend`` (auto/onnxruntime/openvino) and
    ``precision`` (auto/fp32/bf16): how to open the model when it still has to be loaded (``load_model``).
    ``overlap`` in [0, 1) between windows; ``tta`` averages over mirroring along every spatial axis (2^d
    passes per window); ``batch_size`` windows per model call (None: ``cuda_batch_size`` on CUDA, else 1);
    ``return_probabilities`` adds the (K, *S) class probabilities. ``cancel``: a threading.Event or a
    zero-argument callable, checked between windows; when set, Cancelled is raised. ``max_voxels`` and
    ``max_bytes`` (None: no limit) bound what a file may declare (``read_image``) and the image resampled to
    the model spacing (values x channels, and their float32 bytes), which is checked before it is allocated.
    ``scan_is_masked``: whether the scan is zero outside its anatomy, which a ``nonzero_is_foreground`` model
    needs for its rule (architecture.md 4.4); None judges it from ``image`` (some voxel is zero). A caller
    that passes a part of a scan passes what holds for the whole scan (with ``region`` the whole scan is here,
    and None judges all of it). ``region``: None (the whole image), one ``(start, stop)`` voxel-index pair per
    spatial axis, or ``("slice", axis, index)``; the model runs on that box (a slice of a 3D image given to a
    3D model gets a slab of its patch's thickness around it, ``napari_medcl.region``) and every output is
    background outside it (label 0, zero uncertainty); provenance ``roi`` records the box.

    The Prediction's ``verdict`` (also in its provenance) says whether the whole scan looks like the model's
    training data (``napari_medcl.verdict.assess``; ``unknown`` for a model without a training-data profile);
    it is information only and never stops a prediction.

    All outputs sit on the input's voxel grid with its geometry. Raises InputError (unusable image),
    ModelError (unusable model), PredictionError (NaN/Inf from the model), Cancelled.
    """
    if not 0.0 <= float(overlap) < 1.0:
        raise UsageError(f"overlap must be in [0, 1), got {overlap!r}")
    if batch_size is not None:
        batch_size = int(batch_size)
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {batch_size!r}")
    cancelled = _cancel_check(cancel)
    start = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - start

    timings: dict[str, float] = {}
    yield Progress(0, 1, "preprocess", elapsed())
    t = time.perf_counter()
    if isinstance(image, (str, Path)):
        from napari_medcl.io import read_image  # SimpleITK: imported only when a path is given

        volume = read_image(image, series=series, max_voxels=max_voxels, max_bytes=max_bytes)
    elif isinstance(image, Volume):
        volume = image
    else:
        raise TypeError(f"image must be a Volume or a path, got {type(image).__name__}")
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    session = open_session(model, device=device, backend=backend, precision=precision)
    timings["load_model"] = time.perf_counter() - t
    on_gpu = session.provider == CUDA
    if batch_size is None:
        batch_size = cuda_batch_size(session.spec.patch_size) if on_gpu else 1
    threads = stitch_threads(on_gpu)
    spec = session.spec
    t = time.perf_counter()
    plan = plan_for_model(region, volume, spec)
    masked_normalisation = normalises_over_mask(spec)
    nonzero = volume.nonzero_mask() if masked_normalisation or spec.nonzero_is_foreground else None
    if scan_is_masked is None and nonzero is not None and not plan.whole:
        # A region inside the anatomy has no zero voxel; whether the scan is masked is a property of all of it.
        scan_is_masked = not nonzero.all()
    part = volume if plan.whole else volume.crop(plan.compute)
    if nonzero is not None and not plan.whole:
        nonzero = nonzero[plan.compute]
    nonzero_region = _nonzero_region(nonzero, part.spatial_shape) if masked_normalisation else None
    box, outside = (None, None) if nonzero_region is None else nonzero_region
    model_input = part if box is None else part.crop(box)
    prepared = _prepare(model_input, spec, max_voxels=max_voxels, max_bytes=max_bytes)
    foreground = _foreground_mask(nonzero, box, part, spec, scan_is_masked)
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    verdict = assess(volume, spec)  # the whole scan, whatever the region: it is the scan that is judged
    timings["verdict"] = time.perf_counter() - t
    yield Progress(1, 1, "preprocess", elapsed())

    t = time.perf_counter()
    stitched, windows, window_features = yield from _infer(
        session, prepared, overlap=overlap, tta=tta, batch_size=batch_size,
        keep_probabilities=return_probabilities, cancelled=cancelled, elapsed=elapsed,
        foreground=foreground if prepared.scales is None else None, threads=threads, timings=timings,
    )  # fmt: skip
    timings["inference"] = time.perf_counter() - t
    feature_stats = spec.feature_stats
    if window_features is not None and feature_stats is not None and feature_stats.measured:
        # The network's view of the windows that ran (the region's, for a region run) joins the image checks.
        verdict = with_feature_distance(verdict, feature_stats.case_distance(window_features), feature_stats)

    yield Progress(0, 1, "postprocess", elapsed())
    t = time.perf_counter()
    prediction = _postprocess(
        stitched, model_input, prepared, spec, return_probabilities, foreground, threads
    )
    if outside is not None:
        prediction.set_background(outside)
    if box is not None:
        prediction = prediction.pasted(part, box)
    timings["postprocess"] = time.perf_counter() - t
    if spec.error_model is not None:
        t = time.perf_counter()
        eligible = nonzero if masked_normalisation else None
        prediction = with_error_likelihood(prediction, spec, eligible, cancelled, image=part, verdict=verdict)
        timings["error_map"] = time.perf_counter() - t
    t = time.perf_counter()
    if not plan.whole:
        prediction = prediction.crop(plan.inner).pasted(volume, plan.paste)
    timings["postprocess"] += time.perf_counter() - t
    timings["total"] = elapsed()
    provenance = _provenance(
        volume, session, prepared, device=device, overlap=overlap, tta=tta, batch_size=batch_size,
        windows=windows, timings=timings, nonzero_box=box, nonzero_is_foreground=foreground is not None,
        roi=None if plan.whole else plan.paste, verdict=verdict,
    )  # fmt: skip
    yield Progress(1, 1, "postprocess", elapsed())
    yield dataclasses.replace(
        prediction, provenance=provenance, verdict=verdict, window_features=window_features
    )


def _infer(
    model: InferenceSession,
    prepared: _Prepared,
    *,
    overlap: float,
    tta: bool,
    batch_size: int,
    keep_probabilities: bool,
    cancelled: Callable[[], bool],
    elapsed: Callable[[], float],
    foreground: np.ndarray | None = None,
    threads: int = 1,
    timings: dict[str, float] | None = None,
) -> Generator[Progress, None, tuple[StitchResult, int, np.ndarray | None]]:
    """Run every window through the model into an Accumulator, yielding one Progress per window.
    ``foreground``: voxels of the grid never labelled background (see ``tiling.argmax_entropy``);
    ``threads``: for the stitching (``stitch_threads``). ``timings`` receives ``ort_seconds`` (in the model's
    calls), ``stitch_seconds`` (this thread adding and reducing windows) and ``wait_seconds`` (this thread
    waiting for the model): where the model and the stitching overlap, the window stage takes about the
    larger of the first two, and a large wait says the model is the limit.

    Returns (via ``yield from``) the StitchResult, the number of windows and, for a model with window
    features (``spec.features``), those of every window (N, F), else None."""
    spec = model.spec
    grid = prepared.array.shape[1:]
    accumulator = Accumulator(
        grid,
        prepared.window,
        spec.num_classes,
        len(spec.uncertainty_maps),
        crop=prepared.crop,
        keep_probabilities=keep_probabilities,
        reduce=prepared.scales is None,
        foreground=foreground,
        threads=threads,
    )
    boxes = window_boxes(grid, prepared.window, overlap)
    groups = [boxes[first : first + batch_size] for first in range(0, len(boxes), batch_size)]
    ort_seconds = stitch_seconds = wait_seconds = 0.0
    features: list[np.ndarray] | None = [] if spec.features is not None else None

    def run_group(group: list[Box]) -> tuple[np.ndarray, np.ndarray | None, float]:
        batch = np.stack([prepared.array[(slice(None), *box)] for box in group])  # (n, C, wz, wy, wx)
        if len(group) < batch_size < len(boxes):
            # Keep one batch shape per session (the CUDA provider tunes convolutions per shape).
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(group), axis=0)])
        if spec.spatial_dims == 2:
            batch = batch[:, :, 0]  # depth-1 windows -> (n, C, wy, wx)
        start = time.perf_counter()
        probs, maps = _run(model, batch, tta, features)
        seconds = time.perf_counter() - start
        if features is not None:
            features[-1] = features[-1][: len(group)]  # not the repeats that fill the last batch
        _check_finite(model, probs, maps)
        if spec.spatial_dims == 2:  # back to depth-1 windows: (n, K, 1, wy, wx)
            probs = probs[:, :, None]
            maps = None if maps is None else maps[:, :, None]
        accumulator.weigh(probs, maps)  # here, in the worker, so the thread that stitches only sums
        return probs, maps, seconds

    def submit(pool: ThreadPoolExecutor, index: int, done: int) -> Future:
        if cancelled():
            raise Cancelled(f"prediction cancelled after {done} of {len(boxes)} windows")
        return pool.submit(run_group, groups[index])

    # The model runs the next batch in a worker thread while this thread stitches the last one: on a GPU
    # the stitching then hides behind the network instead of adding to it. One batch ahead at most, so
    # the outputs held are two batches whatever the number of windows.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcl-windows") as pool, closing(accumulator):
        pending = submit(pool, 0, 0) if groups else None
        for index, group in enumerate(groups):
            start = time.perf_counter()
            probs, maps, seconds = pending.result()
            wait_seconds += time.perf_counter() - start
            ort_seconds += seconds
            pending = submit(pool, index + 1, index * batch_size) if index + 1 < len(groups) else None
            for j, box in enumerate(group):
                start = time.perf_counter()
                accumulator.add(box, probs[j], None if maps is None else maps[j], weighted=True)
                stitch_seconds += time.perf_counter() - start
                yield Progress(index * batch_size + j + 1, len(boxes), "infer", elapsed())
        start = time.perf_counter()
        stitched = accumulator.finish()
        stitch_seconds += time.perf_counter() - start
    if timings is not None:
        timings.update(ort_seconds=ort_seconds, stitch_seconds=stitch_seconds, wait_seconds=wait_seconds)
    window_features = None if features is None else np.concatenate(features)
    return stitched, len(boxes), window_features


def with_error_likelihood(
    prediction: Prediction,
    spec: ModelSpec,
    eligible: np.ndarray | None,
    cancelled: Callable[[], bool] | None = None,
    *,
    image: Volume | None = None,
    verdict: Verdict | None = None,
) -> Prediction:
    """``prediction`` with its ``error_likelihood`` from the spec's error model (``napari_medcl.error_model``),
    computed on its own grid from its labels, top-class error, entropy and UAFR maps, and from ``image`` (the
    scan on that grid) for a model that reads it. ``eligible`` (spatial bool): the voxels whose label can be
    wrong (None: all); the map is 0 elsewhere. ``verdict``: the scan's, for a consensus that weighs its
    intensity model by it (None: not assessed)."""
    error_model = spec.error_map_model
    if error_model is None or prediction.top_class_error is None:
        return prediction
    if cancelled is not None and cancelled():
        raise Cancelled("prediction cancelled before the error map")
    likelihood = error_model.apply(
        prediction.labels.array,
        prediction.top_class_error.array,
        prediction.entropy.array,
        {name: m.array for name, m in prediction.uncertainty_maps.items()},
        prediction.labels.spacing,
        eligible,
        image=image.channels if image is not None and error_model.needs_image else None,
        verdict_level=None if verdict is None else verdict.level,
    )
    return dataclasses.replace(
        prediction, error_likelihood=prediction.labels.with_array(likelihood, channel_axis=False, metadata={})
    )


def _cancel_check(cancel: Any) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return cancel
    raise TypeError(f"cancel must be a threading.Event or a callable, got {type(cancel).__name__}")


def normalises_over_mask(spec: ModelSpec) -> bool:
    """Whether the model normalises over the non-zero mask: it then runs on the box of the non-zero voxels
    and labels every zero voxel background (architecture.md 4.4)."""
    norm = spec.normalization
    masks = (
        [c.get("use_nonzero_mask", False) for c in norm["channels"]]
        if norm.get("kind") == "per_channel"
        else [norm.get("use_nonzero_mask", False)]
    )
    return any(masks)


def _nonzero_region(
    nonzero: np.ndarray, shape: tuple[int, ...]
) -> tuple[tuple[slice, ...] | None, np.ndarray | None] | None:
    """``(box, outside)`` for a model that normalises over the non-zero mask (``nonzero``, the image's
    ``nonzero_mask()`` of spatial ``shape``).

    Such a model was trained on cases cropped to the box of their non-zero voxels (any channel; nnU-Net's
    preprocessing, and ``medcl-train``'s with ``crop_nonzero``): it runs on the same crop here, and everything
    outside the mask is background. ``box``: that box, None when it is the whole image; ``outside``: the zero
    voxels inside the box (its shape), None when there are none. None as a whole when no voxel is non-zero."""
    box = mask_box(nonzero)
    if box is None:
        return None
    outside = ~nonzero[box]
    whole = all(b.start == 0 and b.stop == n for b, n in zip(box, shape))
    return (None if whole else box), (outside if outside.any() else None)


def _foreground_mask(
    nonzero: np.ndarray | None,
    box: tuple[slice, ...] | None,
    full_volume: Volume,
    spec: ModelSpec,
    scan_is_masked: bool | None,
) -> np.ndarray | None:
    """(Z, Y, X) bool of the non-zero voxels inside ``box`` (the whole image when None) when the model's
    training labels were background exactly where the scan was zero (``spec.nonzero_is_foreground``): those
    voxels take the likeliest foreground class, since the network alone blurs that edge. ``nonzero``: the
    whole image's ``nonzero_mask()``. None otherwise, and None with an InputWarning when the scan is not
    masked (``scan_is_masked`` False, or None and no voxel of the image is zero): such a scan is not masked
    the way the model's training scans were (not skull-stripped, say), and labelling every voxel foreground
    would be wrong."""
    if not spec.nonzero_is_foreground or nonzero is None:
        return None
    judged = scan_is_masked is None
    if judged:
        scan_is_masked = not nonzero.all()
    if not scan_is_masked:
        where = "" if full_volume.source is None else f"{full_volume.source}: "
        why = "no voxel is zero" if judged else "the scan is not masked"
        warnings.warn(
            f"{where}{why}, but model {spec.name!r} was trained on scans that are zero outside the labelled "
            "anatomy (skull-stripped, for instance); mask the scan the same way for reliable labels",
            InputWarning,
            stacklevel=4,
        )
        return None
    mask = nonzero if box is None else nonzero[box]
    return mask if mask.ndim == 3 else mask[None]  # a 2D image is a depth-1 volume from here on


def _as_channels_3d(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The volume's array as (C, Z, Y, X) (a view; depth 1 for 2D images) and its spacing on that grid."""
    array = volume.array if volume.channel_axis else volume.array[None]
    if volume.spatial_dims == 2:
        return array[:, None], (1.0, *volume.spacing)
    return array, tuple(volume.spacing)


def _prepare(
    volume: Volume, spec: ModelSpec, *, max_voxels: int | None = None, max_bytes: int | None = None
) -> _Prepared:
    """Check the image against the spec, normalise, resample to the model spacing and pad for the windows.

    The resampled grid must hold at most ``max_voxels`` values (voxels x channels) and ``max_bytes`` bytes of
    float32 (None: no limit): a fine-spacing model on a large field of view would otherwise allocate far
    more than the file's own budget allowed."""
    if volume.spatial_dims == 2 and spec.spatial_dims == 3:
        raise InputError(
            volume.source, f"is a 2D image but model {spec.name!r} is a 3D model; use a 2D model"
        )
    if volume.num_channels != spec.in_channels:
        raise InputError(
            volume.source,
            f"has {volume.num_channels} channel(s) but model {spec.name!r} expects {spec.in_channels}",
        )
    array, spacing = _as_channels_3d(volume)
    if array.dtype.kind not in "biuf":
        raise InputError(volume.source, f"has voxel type {array.dtype}, not a number type")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(volume.source, "contains NaN or infinite voxel values")

    def check_size(shape: tuple[int, ...]) -> None:
        _check_budget(volume, spec, shape, array.shape[0], max_voxels, max_bytes)

    target = full_target(spacing, spec.spacing)
    data, _, scales = to_model_grid(array, spacing, spec.normalization, target, check_size=check_size)
    shape = tuple(data.shape[1:])  # (Z, Y, X), a 2D image's depth 1 kept

    window = window_shape(spec.patch_size, spec.divisor)
    window = window if spec.spatial_dims == 3 else (1, *window)
    pads = padding(shape, window)
    crop = tuple(slice(before, before + n) for (before, _), n in zip(pads, shape))
    if any(before or after for before, after in pads):
        padded = np.zeros((data.shape[0], *(n + b + a for n, (b, a) in zip(shape, pads))), dtype=np.float32)
        padded[(slice(None), *crop)] = data
        data = padded
    return _Prepared(array=data, crop=crop, model_shape=shape, scales=scales, window=window)


def _check_budget(
    volume: Volume,
    spec: ModelSpec,
    shape: tuple[int, int, int],
    channels: int,
    max_voxels: int | None,
    max_bytes: int | None,
) -> None:
    """InputError when the image resampled to ``shape`` (Z, Y, X) x ``channels`` exceeds the budget."""
    values = channels * math.prod(shape)
    over = []
    if max_voxels is not None and values > max_voxels:
        over.append(f"{values} values > max_voxels {max_voxels}")
    if max_bytes is not None and 4 * values > max_bytes:
        over.append(f"{4 * values} bytes of float32 > max_bytes {max_bytes}")
    if over:
        grid = shape[-volume.spatial_dims :]
        raise InputError(
            volume.source,
            f"resampled to the spacing of model {spec.name!r} ({_mm(spec.spacing)} mm) it would be "
            f"{'x'.join(map(str, grid))} voxels x {channels} channel(s), over the budget "
            f"({'; '.join(over)})",
        )


def _mm(values: Any) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _run(
    model: InferenceSession, batch: np.ndarray, tta: bool, features: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """One ORT pass, or the mean over every mirroring of the spatial axes when ``tta``. ``features``: a list
    that the unmirrored pass's window features (N, F) are appended to (a model with ``spec.features``)."""

    def run(x: np.ndarray, first: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if features is None or not first:
            return model.run(x)
        probs, maps, window_features = model.run(x, with_features=True)
        features.append(window_features)
        return probs, maps

    if not tta:
        return run(batch, True)
    axes = tuple(range(2, batch.ndim))
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    probs_sum = maps_sum = None
    for flip in flips:
        probs, maps = run(np.ascontiguousarray(np.flip(batch, flip)) if flip else batch, not flip)
        if flip:
            probs = np.flip(probs, flip)
            maps = None if maps is None else np.flip(maps, flip)
        probs_sum = probs.copy() if probs_sum is None else np.add(probs_sum, probs, out=probs_sum)
        if maps is not None:
            maps_sum = maps.copy() if maps_sum is None else np.add(maps_sum, maps, out=maps_sum)
    scale = np.float32(1.0 / len(flips))
    return probs_sum * scale, None if maps_sum is None else maps_sum * scale


def _check_finite(model: InferenceSession, probs: np.ndarray, maps: np.ndarray | None) -> None:
    # A sum of values in [0, 1] is finite unless a value is NaN/Inf (float32 cannot overflow below 1e38 of
    # them), and needs no temporary array; in float32 it is 4x faster than in float64 on these batches.
    for name, array in (("probabilities", probs), ("uafr_uncertainty", maps)):
        if array is not None and not math.isfinite(float(array.sum())):
            raise PredictionError(
                f"model {model.spec.name!r} ({model.path}) produced NaN or infinite {name}; "
                "the model is broken or the input is far outside what it was trained on"
            )


def _postprocess(
    stitched: StitchResult,
    volume: Volume,
    prepared: _Prepared,
    spec: ModelSpec,
    keep_probabilities: bool,
    foreground: np.ndarray | None = None,
    threads: int = 1,
) -> Prediction:
    """The outputs on the grid of ``volume`` (what the model was given): resampled back from the model grid
    first when needed (slabs shared by ``threads``), then the argmax (never background where
    ``foreground``, (Z, Y, X) bool), the entropy and the top-class error."""
    labels, entropy, top_error, maps, probabilities = (
        stitched.labels,
        stitched.entropy,
        stitched.top_class_error,
        stitched.maps,
        stitched.probabilities,
    )
    if prepared.scales is not None:
        shape = tuple(_as_channels_3d(volume)[0].shape[1:])
        back = tuple(1.0 / s for s in prepared.scales)
        k = spec.num_classes
        labels = np.zeros(shape, dtype=label_dtype(k))
        entropy = np.zeros(shape, dtype=np.float32)
        top_error = np.zeros(shape, dtype=np.float32)
        probabilities = np.zeros((k, *shape), dtype=np.float32) if keep_probabilities else None
        if spec.uncertainty_maps:
            maps = np.zeros((len(spec.uncertainty_maps), *shape), dtype=np.float32)
        # Slab by slab along z: every temporary is a few planes of the output grid, which keeps them in cache
        # and off the page-fault path that whole-volume temporaries of a CT-size grid take; slabs are
        # independent, so threads can share them.
        step = max(1, _POSTPROCESS_SLAB_VOXELS // math.prod(shape[1:]))

        def slab(rows: slice) -> None:
            def planes() -> Iterator[np.ndarray]:
                # One class at a time: memory for two planes of the slab, whatever the class count.
                for c in range(k):
                    plane = resample_linear(stitched.probabilities[c : c + 1], shape, back, rows)[0]
                    if probabilities is not None:
                        probabilities[c, rows] = plane
                    yield plane

            mask = None if foreground is None else foreground[rows]
            argmax_entropy(planes(), k, labels[rows], entropy[rows], mask, top_error[rows])
            if spec.uncertainty_maps:
                maps[:, rows] = resample_linear(stitched.maps, shape, back, rows)

        slabs = [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]
        if threads > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="medcl-resample") as pool:
                list(pool.map(slab, slabs))
        else:
            for rows in slabs:
                slab(rows)
    if volume.spatial_dims == 2:  # drop the depth-1 axis again
        labels, entropy, top_error = labels[0], entropy[0], top_error[0]
        maps = None if maps is None else maps[:, 0]
        probabilities = None if probabilities is None else probabilities[:, 0]

    def on_grid(array: np.ndarray, channel_axis: bool = False) -> Volume:
        # Outputs are new images on the input's grid: keep its geometry, source and format, not the
        # reader's notes about the input's own pixels.
        return volume.with_array(array, channel_axis=channel_axis, metadata={})

    return Prediction(
        labels=on_grid(labels),
        entropy=on_grid(entropy),
        top_class_error=on_grid(top_error),
        # The block nearest the output (maps are in network order) sees the decision itself, at full
        # resolution: its map marks the voxels the network hesitates on, where deeper blocks' maps are flat.
        uafr_uncertainty=on_grid(maps[-1].copy()) if len(spec.uncertainty_maps) else None,
        uncertainty_maps={name: on_grid(maps[i]) for i, name in enumerate(spec.uncertainty_maps)},
        probabilities=None if probabilities is None else on_grid(probabilities, True),
    )


def _provenance(
    volume: Volume,
    model: InferenceSession,
    prepared: _Prepared,
    *,
    device: str,
    overlap: float,
    tta: bool,
    batch_size: int,
    windows: int,
    timings: dict[str, float],
    nonzero_box: tuple[slice, ...] | None,
    nonzero_is_foreground: bool,
    roi: tuple[slice, ...] | None,
    verdict: Verdict | None = None,
) -> Provenance:
    spec = model.spec
    dims = volume.spatial_dims
    return Provenance(
        version=__version__,
        model=ModelRecord(
            name=spec.name,
            path=str(model.path),
            sha256=model.sha256,
            spatial_dims=spec.spatial_dims,
            classes=tuple(spec.class_names),
            uncertainty_maps=tuple(spec.uncertainty_maps),
        ),
        execution_provider=model.provider,
        device_requested=device,
        intended_use=spec.intended_use,
        input=InputRecord(
            path=None if volume.source is None else str(volume.source),
            format=volume.format,
            channels=volume.num_channels,
            geometry=volume.geometry_dict(),
        ),
        preprocessing=PreprocessingRecord(
            normalization=dict(spec.normalization),
            resampled=prepared.scales is not None,
            model_grid_shape=tuple(prepared.model_shape[-dims:]),
            model_spacing=None if spec.spacing is None else tuple(spec.spacing),
        ),
        tiling=TilingRecord(
            patch=tuple(spec.patch_size),
            window=tuple(prepared.window[-spec.spatial_dims :]),
            overlap=float(overlap),
            windows=windows,
            tta=bool(tta),
            forward_passes=windows * (2**spec.spatial_dims if tta else 1),
            batch_size=int(batch_size),
            padded_grid=tuple(prepared.array.shape[1:][-dims:]),
            importance="gaussian, sigma = patch / 8",
        ),
        timings={key: round(value, 4) for key, value in timings.items()},
        nonzero_box=None if nonzero_box is None else tuple((b.start, b.stop) for b in nonzero_box),
        nonzero_is_foreground=nonzero_is_foreground,
        roi=None if roi is None else tuple((b.start, b.stop) for b in roi),
        verdict=None if verdict is None else verdict.to_dict(),
    )
