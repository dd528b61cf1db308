"""Regions of a scan to segment: the whole image, a box, or one slice with the context a 3D model needs.

``predict_iter(..., region=...)`` plans the region here, runs the model on ``RegionPlan.compute`` and pastes
the part ``RegionPlan.inner`` of the result back at ``RegionPlan.paste`` of the whole grid
(``Prediction.crop`` then ``Prediction.pasted``). A caller only says which box or slice it wants, in voxel
indices; turning a drawn rectangle or the viewer's slice into one is the widget's job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from napari_medcl.errors import UsageError
from napari_medcl.spec import ModelSpec
from napari_medcl.volume import Volume


@dataclass(frozen=True)
class RegionPlan:
    """Where to run the model and where its output lands, as index boxes on the full image.

    ``compute`` is the box handed to the model (it may add context around the region, e.g. a slab for a 3D
    model asked for one slice); ``paste`` is the region that the result fills; ``inner`` is ``paste`` expressed
    inside ``compute``. ``None`` everywhere means the whole image.
    """

    compute: tuple[slice, ...] | None = None
    paste: tuple[slice, ...] | None = None
    inner: tuple[slice, ...] | None = None

    @property
    def whole(self) -> bool:
        return self.compute is None


def plan_region(
    roi: Any,
    volume: Volume,
    *,
    model_dims: int | None = None,
    context_mm: float | None = None,
) -> RegionPlan:
    """Turn a user ``roi`` into a RegionPlan for ``volume``.

    ``roi`` is None (whole image), one ``(start, stop)`` pair (or slice) of whole voxel indices per spatial
    axis (clipped to the image), or ``("slice", axis, index)`` for one slice of a 3D image (a 2D image is
    its own slice). For a slice and a 3D model, the model sees a slab ``context_mm`` thick around it (its
    patch extent) so that it has the context it was trained with; only the slice itself is pasted.
    """
    shape = volume.spatial_shape
    ndim = len(shape)
    if roi is None:
        return RegionPlan()
    if isinstance(roi, tuple | list) and len(roi) == 3 and roi[0] == "slice":
        _, axis, index = roi
        if ndim == 2:
            return RegionPlan()
        axis, index = int(axis), int(round(float(index)))
        if not -ndim <= axis < ndim:
            raise UsageError(f"roi slice axis {axis} does not exist in a {ndim}D image")
        axis %= ndim
        if not 0 <= index < shape[axis]:
            raise UsageError(f"roi slice index {index} is outside 0..{shape[axis] - 1} on axis {axis}")
        paste = tuple(slice(index, index + 1) if a == axis else slice(0, n) for a, n in enumerate(shape))
        half = 0
        if model_dims == 3 and context_mm:
            half = max(0, math.ceil(context_mm / volume.spacing[axis] / 2) - 1)
        lo, hi = max(0, index - half), min(shape[axis], index + half + 1)
        compute = tuple(slice(lo, hi) if a == axis else slice(0, n) for a, n in enumerate(shape))
        inner = tuple(
            slice(index - lo, index - lo + 1) if a == axis else slice(0, n) for a, n in enumerate(shape)
        )
        return RegionPlan(compute=compute, paste=paste, inner=inner)
    if not isinstance(roi, Sequence) or isinstance(roi, str) or len(roi) != ndim:
        raise UsageError(
            f"roi must be None, ('slice', axis, index) or {ndim} (start, stop) pairs for a {ndim}D image, "
            f"got {roi!r}"
        )
    box = []
    for axis, (item, n) in enumerate(zip(roi, shape)):
        start, stop = (item.start, item.stop) if isinstance(item, slice) else item
        start = 0 if start is None else max(0, _voxel_index(start, axis))
        stop = n if stop is None else min(n, _voxel_index(stop, axis))
        if stop <= start:
            raise UsageError(f"roi axis {axis}: ({start}, {stop}) is empty inside an image of size {n}")
        box.append(slice(start, stop))
    box = tuple(box)
    if all(s.start == 0 and s.stop == n for s, n in zip(box, shape)):
        return RegionPlan()
    inner = tuple(slice(0, s.stop - s.start) for s in box)
    return RegionPlan(compute=box, paste=box, inner=inner)


def _voxel_index(value: Any, axis: int) -> int:
    # Rounding a drawn shape to voxels is the caller's choice (the widget takes the voxels whose centres it
    # covers); a second rounding here would move the box.
    if not float(value).is_integer():
        raise UsageError(f"roi axis {axis}: {value!r} is not a whole voxel index")
    return int(value)


def plan_for_model(roi: Any, volume: Volume, spec: ModelSpec) -> RegionPlan:
    """``plan_region`` for ``spec``'s model: a slice of a 3D image given to a 3D model comes with a slab
    as thick as the model's patch (at the model's spacing, else the image's) around it."""
    context_mm = None
    if volume.spatial_dims == 3 and spec.spatial_dims == 3 and roi is not None:
        axis = int(roi[1]) % 3 if isinstance(roi, tuple | list) and roi and roi[0] == "slice" else 0
        model_spacing = spec.spacing[axis] if spec.spacing is not None else volume.spacing[axis]
        context_mm = spec.patch_size[axis] * model_spacing
    return plan_region(roi, volume, model_dims=spec.spatial_dims, context_mm=context_mm)
