"""Writing a run's outputs into layers that already hold earlier results, without losing the user's edits.

A region run (one slice, a box) changes only its region; a whole-image run is the region that is the whole
image. Inside the region, a voxel the user changed since the model last wrote it (the layer differs from the
model's last output there) is an *edit*: it is kept unless the user chose to overwrite edits. Pure numpy: the
widget asks the user, then applies a ``LabelsWrite`` as one undoable step of the layer's history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_medcl.region import plan_region
from napari_medcl.volume import Volume


def region_box(roi: Any, volume: Volume) -> tuple[slice, ...]:
    """The index box of ``volume``'s grid that a run with ``roi`` (see ``plan_region``) writes into."""
    plan = plan_region(roi, volume)
    return plan.paste if plan.paste is not None else tuple(slice(0, n) for n in volume.spatial_shape)


def describe_box(box: tuple[slice, ...], shape: tuple[int, ...]) -> str:
    """'z 39 (1 of 91 slices), y all, x 20-59' : a box in words, with each axis's extent (inclusive ranges)."""
    names = ("z", "y", "x")[-len(shape) :]
    parts = []
    for name, s, n in zip(names, box, shape):
        start, stop = s.start or 0, n if s.stop is None else s.stop
        if start == 0 and stop == n:
            parts.append(f"{name} all {n}")
        elif stop - start == 1:
            parts.append(f"{name} {start} (1 of {n})")
        else:
            parts.append(f"{name} {start}-{stop - 1} ({stop - start} of {n})")
    return ", ".join(parts)


def count_edits(current: np.ndarray, model_written: np.ndarray | None, box: tuple[slice, ...]) -> int:
    """How many voxels of ``box`` the user changed since the model wrote ``model_written``.

    current, model_written (*S) int, the layer's labels and the model's last output (None: nothing written
    by the model yet, so nothing counts as an edit).
    """
    if model_written is None:
        return 0
    _check_same_shape(current, model_written, "labels layer", "model's last output")
    return int(np.count_nonzero(current[box] != model_written[box]))


@dataclass(frozen=True)
class LabelsWrite:
    """The voxels a run changes in a labels layer: ``indices`` (one int array per axis, full-grid indices)
    and their new ``values``; ``kept_edits`` edited voxels the run left alone, ``overwritten_edits`` those it
    replaced."""

    indices: tuple[np.ndarray, ...]
    values: np.ndarray
    kept_edits: int
    overwritten_edits: int

    @property
    def changed(self) -> int:
        return int(self.values.size)


def plan_labels_write(
    current: np.ndarray,
    model_written: np.ndarray | None,
    new: np.ndarray,
    box: tuple[slice, ...],
    *,
    keep_edits: bool = True,
) -> LabelsWrite:
    """What writing ``new[box]`` into ``current`` changes.

    current, new (*S) int: the layer's labels and the run's full-grid output; model_written (*S) int or None:
    the model's last output in this layer. Voxels outside ``box`` are never touched; inside, the user's edits
    are kept when ``keep_edits``.
    """
    _check_same_shape(current, new, "labels layer", "new labels")
    region_now, region_new = current[box], new[box]
    write = region_now != region_new
    if model_written is None:
        edited = np.zeros_like(write)
    else:
        _check_same_shape(current, model_written, "labels layer", "model's last output")
        edited = region_now != model_written[box]
    edited_and_changed = int(np.count_nonzero(edited & write))
    if keep_edits:
        write &= ~edited
    local = np.nonzero(write)
    starts = [s.indices(n)[0] for s, n in zip(box, current.shape)]
    indices = tuple(index + start for index, start in zip(local, starts))
    return LabelsWrite(
        indices=indices,
        values=region_new[write],
        kept_edits=edited_and_changed if keep_edits else 0,
        overwritten_edits=0 if keep_edits else edited_and_changed,
    )


def record_model_write(
    model_written: np.ndarray | None, new: np.ndarray, box: tuple[slice, ...]
) -> np.ndarray:
    """The model's last output after a run wrote ``new[box]``: ``model_written`` updated in place (a copy of
    ``new`` when there was none)."""
    if model_written is None or model_written.shape != new.shape:
        return np.array(new, copy=True)
    model_written[box] = new[box]
    return model_written


def merged_map(current: np.ndarray, new: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """A map layer's data after a run: ``current`` with ``box`` taken from ``new`` (a new array; maps such as
    uncertainty hold no user edits)."""
    _check_same_shape(current, new, "map layer", "new map")
    merged = np.array(current, copy=True)
    merged[box] = new[box]
    return merged


def _check_same_shape(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"{a_name} shape {np.shape(a)} differs from {b_name} shape {np.shape(b)}")
