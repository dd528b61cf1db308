"""What travels between medcl-serve and its clients: voxels with their geometry, and a prediction's outputs.

Both are ``.npz`` archives (numpy's zip of ``.npy`` arrays, deflate level 1: fast, and labels or CT
backgrounds shrink many times). Nothing else goes in them: no file path, no reader metadata (DICOM UIDs and
headers stay on the client), no pickled objects. A volume is ``voxels`` plus ``spacing``, ``origin``,
``direction`` (array order, float64, exact) and ``channel_axis``. A prediction's outputs are ``labels``
(uint8, uint16 above 255 classes; exact) and the maps as float16 (``entropy``, ``top_class_error``,
``error_likelihood`` for a model with a calibrated error map, each UAFR map as ``map/<name>``,
``probabilities`` when asked for): in [0, 1], float16 keeps them within 2.5e-4,
far below what a map is read for, at half the bytes. A region's outputs travel cut to their box; the client
pastes them back onto its grid, where everything outside is background as in a local run.

A labels update (an interactive step: a prompt, an undo, the user's brush edits) is ``box`` ((3, 2) int64
start/stop on the session's 3D grid), ``labels`` there (uint8 or uint16, exact) and a few numbers
(``changed``, ``seconds``, ``prompts``) as 0-d arrays: only the box travels, never the whole labels map.

Reading checks every array's header before its data is read: only the expected names, plain numeric dtypes,
and at most ``max_bytes`` per array, so a small archive cannot unpack into a huge allocation.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from napari_medcl.errors import InputError
from napari_medcl.volume import Prediction, Volume

VOLUME_KEYS = ("voxels", "spacing", "origin", "direction", "channel_axis")
MAP_PREFIX = "map/"
# Deflate level 1: most of the size reduction of level 6 at several times the speed (voxel data is noisy).
COMPRESS_LEVEL = 1
# The dtypes an uploaded image may have: what the readers produce (no object, string or complex arrays).
IMAGE_KINDS = "biuf"
LABELS_UPDATE_NUMBERS = ("changed", "seconds", "prompts")
LABELS_UPDATE_KEYS = ("box", "labels", *LABELS_UPDATE_NUMBERS)


def volume_to_npz(volume: Volume) -> bytes:
    """``volume``'s voxels and geometry as .npz bytes (its source, format and metadata stay here)."""
    return _write_npz(
        {
            "voxels": np.ascontiguousarray(volume.array),
            "spacing": np.asarray(volume.spacing, dtype=np.float64),
            "origin": np.asarray(volume.origin, dtype=np.float64),
            "direction": np.asarray(volume.direction, dtype=np.float64),
            "channel_axis": np.asarray(volume.channel_axis, dtype=np.bool_),
        }
    )


def volume_from_npz(data: bytes, *, max_bytes: int | None) -> Volume:
    """The Volume in ``data`` (from ``volume_to_npz``), without a source: InputError when it is not one."""
    arrays = _read_npz(data, allowed=lambda name: name in VOLUME_KEYS, max_bytes=max_bytes)
    missing = [key for key in VOLUME_KEYS if key not in arrays]
    if missing:
        raise InputError(None, f"the uploaded volume lacks {', '.join(missing)}")
    voxels = arrays["voxels"]
    if voxels.dtype.kind not in IMAGE_KINDS:
        raise InputError(None, f"the uploaded voxels have dtype {voxels.dtype}; send numbers")
    try:
        return Volume(
            voxels,
            tuple(arrays["spacing"].tolist()),
            tuple(arrays["origin"].tolist()),
            arrays["direction"],
            channel_axis=bool(arrays["channel_axis"]),
        )
    except (ValueError, TypeError) as error:
        raise InputError(None, f"the uploaded volume is not usable: {error}") from None


def prediction_to_npz(prediction: Prediction, box: tuple[slice, ...] | None = None) -> bytes:
    """``prediction``'s outputs inside ``box`` (None: everywhere) as .npz bytes: labels exact, maps float16."""
    part = prediction if box is None else prediction.crop(box)
    arrays: dict[str, np.ndarray] = {"labels": part.labels.array, "entropy": _half(part.entropy)}
    if part.top_class_error is not None:
        arrays["top_class_error"] = _half(part.top_class_error)
    if part.error_likelihood is not None:
        arrays["error_likelihood"] = _half(part.error_likelihood)
    for name, output in part.uncertainty_maps.items():
        arrays[MAP_PREFIX + name] = _half(output)
    if part.probabilities is not None:
        arrays["probabilities"] = _half(part.probabilities)
    return _write_npz(arrays)


def prediction_from_npz(
    data: bytes,
    volume: Volume,
    *,
    uncertainty_maps: tuple[str, ...] | list[str],
    box: tuple[slice, ...] | None,
    max_bytes: int | None = None,
) -> Prediction:
    """The Prediction in ``data`` on ``volume``'s grid, with its geometry, source and format, as a local run
    gives it. ``box``: where the outputs were cut from (None: the whole grid); outside it every output holds
    its background value (``Prediction.pasted``). ``uncertainty_maps``: the spec's map names, in network
    order (the last is ``uafr_uncertainty``). No provenance or verdict yet (``dataclasses.replace`` them in).
    Raises InputError when an array is missing or has the wrong shape."""
    names = {"labels", "entropy", "top_class_error", "error_likelihood", "probabilities"}
    names |= {MAP_PREFIX + name for name in uncertainty_maps}
    arrays = _read_npz(data, allowed=names.__contains__, max_bytes=max_bytes)
    grid = volume if box is None else volume.crop(box)

    def on_grid(key: str, channel_axis: bool = False) -> Volume | None:
        if key not in arrays:
            return None
        array = arrays[key]
        if array.dtype == np.float16:
            array = array.astype(np.float32)  # what a local run hands out
        try:
            return grid.with_array(array, channel_axis=channel_axis, metadata={})
        except ValueError as error:
            raise InputError(None, f"the server's {key} does not fit the image: {error}") from None

    labels, entropy = on_grid("labels"), on_grid("entropy")
    if labels is None or entropy is None:
        raise InputError(None, "the server's result lacks labels or entropy")
    maps = {name: on_grid(MAP_PREFIX + name) for name in uncertainty_maps}
    if any(output is None for output in maps.values()):
        raise InputError(None, "the server's result lacks a UAFR map the model has")
    last = maps[uncertainty_maps[-1]] if uncertainty_maps else None
    prediction = Prediction(
        labels=labels,
        entropy=entropy,
        top_class_error=on_grid("top_class_error"),
        error_likelihood=on_grid("error_likelihood"),
        uafr_uncertainty=None if last is None else last.with_array(last.array.copy(), metadata={}),
        uncertainty_maps=maps,  # type: ignore[arg-type]  (None ruled out above)
        probabilities=on_grid("probabilities", channel_axis=True),
    )
    return prediction if box is None else prediction.pasted(volume, box)


def labels_to_npz(
    box: tuple[slice, ...] | None, labels: np.ndarray | None = None, **numbers: float | int
) -> bytes:
    """A labels update as .npz bytes: ``box`` (None: nothing changed), ``labels`` inside it (None: not sent,
    the receiver has them) and ``numbers`` (``changed``, ``seconds``, ``prompts``)."""
    arrays: dict[str, np.ndarray] = {name: np.asarray(value) for name, value in numbers.items()}
    if box is not None:
        arrays["box"] = np.array([[s.start, s.stop] for s in box], dtype=np.int64)
        if labels is not None:
            arrays["labels"] = np.ascontiguousarray(labels)
    return _write_npz(arrays)


def labels_from_npz(
    data: bytes, grid: tuple[int, ...], *, max_bytes: int | None = None
) -> tuple[tuple[slice, ...] | None, np.ndarray | None, dict[str, float]]:
    """(box, labels, numbers) of a labels update for a grid of shape ``grid``: InputError when the box does
    not lie inside the grid, the labels do not fill the box, or they are not uint8 / uint16."""
    arrays = _read_npz(data, allowed=LABELS_UPDATE_KEYS.__contains__, max_bytes=max_bytes)
    numbers = {}
    for name in LABELS_UPDATE_NUMBERS:
        if name in arrays:
            if arrays[name].shape != ():
                raise InputError(None, f"the labels update's {name} is not one number")
            numbers[name] = arrays[name].item()
    if "box" not in arrays:
        if "labels" in arrays:
            raise InputError(None, "the labels update has labels but no box")
        return None, None, numbers
    pairs = arrays["box"]
    if pairs.shape != (len(grid), 2) or pairs.dtype.kind not in "iu":
        raise InputError(None, f"the labels update's box must be {len(grid)} (start, stop) pairs")
    if any(not 0 <= a < b <= n for (a, b), n in zip(pairs.tolist(), grid)):
        raise InputError(None, f"the labels update's box {pairs.tolist()} does not lie inside {tuple(grid)}")
    box = tuple(slice(int(a), int(b)) for a, b in pairs.tolist())
    labels = arrays.get("labels")
    if labels is not None:
        if labels.dtype not in (np.uint8, np.uint16):
            raise InputError(None, f"labels travel as uint8 or uint16, not {labels.dtype}")
        if labels.shape != tuple(s.stop - s.start for s in box):
            raise InputError(None, f"labels of shape {labels.shape} do not fill the box {pairs.tolist()}")
    return box, labels, numbers


def box_to_json(box: tuple[slice, ...] | None) -> list[list[int]] | None:
    """A box of slices as [[start, stop], ...] (JSON); None stays None."""
    return None if box is None else [[int(s.start), int(s.stop)] for s in box]


def box_from_json(pairs: Any, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """A box from [[start, stop], ...], checked to lie inside ``shape``: InputError otherwise."""
    if pairs is None:
        return None
    try:
        box = tuple(slice(int(a), int(b)) for a, b in pairs)
    except (TypeError, ValueError):
        raise InputError(None, f"the server's region {pairs!r} is not [[start, stop], ...]") from None
    if len(box) != len(shape) or any(not 0 <= s.start < s.stop <= n for s, n in zip(box, shape)):
        raise InputError(None, f"the server's region {pairs!r} does not lie inside an image of {shape}")
    return box


def _half(output: Volume) -> np.ndarray:
    return output.array.astype(np.float16)


def _write_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


def _read_npz(data: bytes, *, allowed: Any, max_bytes: int | None) -> dict[str, np.ndarray]:
    """The arrays of an .npz held in ``data``, by name (without ``.npy``); InputError for anything else
    than ``allowed(name)`` names of plain arrays, each at most ``max_bytes`` (None: no limit)."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if not allowed(name) or name in arrays:
                    raise InputError(None, f"unexpected entry {info.filename!r} in the archive")
                with archive.open(info) as entry:
                    arrays[name] = _read_array(entry, name, max_bytes)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(None, f"not a readable .npz archive ({error})") from None
    return arrays


def _read_array(entry: Any, name: str, max_bytes: int | None) -> np.ndarray:
    version = np.lib.format.read_magic(entry)
    read_header = (
        np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(entry)
    if dtype.hasobject or dtype.kind not in "biuf":
        raise InputError(None, f"array {name!r} has dtype {dtype}; only numbers travel")
    nbytes = math.prod(shape) * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise InputError(None, f"array {name!r} holds {nbytes:,} bytes, more than the limit of {max_bytes:,}")
    array = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    view = memoryview(array.reshape(-1, order="A")).cast("B") if nbytes else memoryview(b"")
    filled = 0
    while filled < nbytes:
        count = entry.readinto(view[filled:])
        if not count:
            raise InputError(None, f"array {name!r} is cut short ({filled:,} of {nbytes:,} bytes)")
        filled += count
    return array
