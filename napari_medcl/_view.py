"""Moving napari's view to a region: shared by the review panel and the prompt panel."""

from __future__ import annotations

from typing import Any

import numpy as np


def show_box(viewer: Any, layer: Any, entry: Any, axis: int = 0) -> None:
    """Centre the view on ``entry`` (a ``box`` of index slices and a ``center`` in ``layer``'s data indices), on the
    slice through its centre along ``axis``, zoomed so that its box fills most of the canvas (relative to the
    zoom that frames the whole scene, so no canvas size is needed)."""
    dims = viewer.dims
    offset = dims.ndim - layer.ndim
    world = list(dims.point)
    world[offset:] = list(layer.data_to_world(entry.center))
    if len(entry.box) == 3:
        world_axis = offset + axis
        if dims.ndisplay == 2 and world_axis in dims.displayed:
            dims.order = (world_axis, *(a for a in dims.order if a != world_axis))
        dims.set_point(world_axis, world[world_axis])
    viewer.reset_view()
    camera = camera_of(viewer)
    scene = np.asarray(viewer.layers.extent.world, dtype=np.float64)  # (2, ndim): min, max
    low = np.asarray(layer.data_to_world([s.start - 0.5 for s in entry.box]), dtype=np.float64)
    high = np.asarray(layer.data_to_world([s.stop - 0.5 for s in entry.box]), dtype=np.float64)
    ratios = []
    for a in dims.displayed:
        if a >= offset:
            box = abs(high[a - offset] - low[a - offset])
            ratios.append((scene[1, a] - scene[0, a]) / max(box, 1e-6))
    if ratios:
        camera.zoom = camera.zoom * max(1.0, 0.6 * min(ratios))
    camera.center = tuple(world[a] for a in dims.displayed)


def camera_of(viewer: Any) -> Any:
    scene = getattr(viewer, "scene", None)  # napari >= 0.9 moved the camera to viewer.scene
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera
