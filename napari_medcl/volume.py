"""Volume (an array with its physical geometry) and Prediction (what inference returns).

Geometry is kept in array order everywhere in the product: for a 3D array indexed ``[z, y, x]``, ``spacing``,
``origin`` and the rows/columns of ``direction`` are given for the axes in that same order. SimpleITK speaks
(x, y, z); ``napari_medcl.io`` reverses exactly once when reading and once when writing, nowhere else.

``direction`` follows ITK's meaning after the reversal: column ``j`` of ``direction`` is the unit vector (in
physical space, whose coordinates are also listed reversed, i.e. (z, y, x) for a 3D image) of array axis ``j``.
So the physical position of voxel index ``i`` (array order) is ``origin + direction @ (spacing * i)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medcl.provenance import Provenance

if TYPE_CHECKING:
    from napari_medcl.verdict import Verdict


@dataclass(frozen=True, eq=False)
class Volume:
    """An image or map with the geometry of the scan it belongs to.

    ``array`` has shape ``spatial_shape`` or, when ``channel_axis`` is True, ``(C, *spatial_shape)``.
    2D images have two spatial axes (y, x); 3D images three (z, y, x).
    ``source`` is the file or folder the volume was read from; ``format`` the reader that read it
    (``nifti``, ``nrrd``, ``mha``, ``dicom``, ``png``, ``jpeg``, ``tiff``), and ``metadata`` extra facts the
    writer may need (e.g. the DICOM series UID, the original pixel type).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    channel_axis: bool = False
    source: Path | None = None
    format: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ndim = self.spatial_dims
        if ndim not in (2, 3):
            raise ValueError(f"a Volume has 2 or 3 spatial axes, got array shape {self.array.shape}")
        spacing = tuple(float(s) for s in self.spacing)
        origin = tuple(float(o) for o in self.origin)
        direction = np.asarray(self.direction, dtype=np.float64)
        if len(spacing) != ndim or len(origin) != ndim or direction.shape != (ndim, ndim):
            raise ValueError(
                f"geometry does not match a {ndim}D array: spacing {spacing}, origin {origin}, "
                f"direction shape {direction.shape}"
            )
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)
        if self.source is not None:
            object.__setattr__(self, "source", Path(self.source))

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:] if self.channel_axis else self.array.shape)

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - (1 if self.channel_axis else 0)

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0]) if self.channel_axis else 1

    @property
    def channels(self) -> np.ndarray:
        """The array as (C, *S), a channel axis added when it has none (a view, no copy)."""
        return self.array if self.channel_axis else self.array[None]

    def nonzero_mask(self) -> np.ndarray:
        """(*S) bool: the voxels non-zero in some channel (the mask of a skull-stripped scan, for instance)."""
        return np.any(self.array != 0, axis=0) if self.channel_axis else self.array != 0

    def with_array(self, array: np.ndarray, *, channel_axis: bool = False, **changes: Any) -> Volume:
        """The same geometry (and source) around another array of the same spatial shape."""
        array = np.asarray(array)
        shape = array.shape[1:] if channel_axis else array.shape
        if tuple(shape) != self.spatial_shape:
            raise ValueError(
                f"array spatial shape {tuple(shape)} differs from the volume's {self.spatial_shape}"
            )
        return replace(self, array=array, channel_axis=channel_axis, **changes)

    def crop(self, box: tuple[slice, ...]) -> Volume:
        """The sub-volume ``array[box]`` (spatial slices with step 1) with its origin moved so that every voxel
        keeps its physical position."""
        if len(box) != self.spatial_dims:
            raise ValueError(f"crop box has {len(box)} axes, the volume {self.spatial_dims}")
        starts = []
        for axis, (s, n) in enumerate(zip(box, self.spatial_shape)):
            start, stop, step = s.indices(n)
            if step != 1 or stop <= start:
                raise ValueError(f"crop box axis {axis}: {s} is empty or strided for size {n}")
            starts.append(start)
        shift = self.direction @ (np.asarray(self.spacing) * np.asarray(starts, dtype=np.float64))
        array = self.array[(slice(None), *box)] if self.channel_axis else self.array[box]
        return replace(self, array=array, origin=tuple(np.asarray(self.origin) + shift))

    def same_geometry(self, other: Volume, *, atol: float = 1e-5) -> bool:
        """True when both volumes sit on the same voxel grid (shape, spacing, origin, direction within atol)."""
        return (
            self.spatial_shape == other.spatial_shape
            and np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )

    def geometry_dict(self) -> dict[str, Any]:
        """Geometry as plain JSON-friendly lists (array order), for sidecars and napari layer metadata."""
        return {
            "shape": list(self.spatial_shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.tolist(),
            "axis_order": ["z", "y", "x"][-self.spatial_dims :],
        }


def identity_geometry(spatial_shape: tuple[int, ...]) -> dict[str, Any]:
    """Unit spacing, zero origin and identity direction for an array without physical geometry."""
    n = len(spatial_shape)
    return {"spacing": (1.0,) * n, "origin": (0.0,) * n, "direction": np.eye(n)}


@dataclass(frozen=True, eq=False)
class Prediction:
    """Everything one inference returns, on the input's voxel grid.

    ``labels``: uint8 (uint16 above 255 classes) argmax of the stitched probabilities.
    ``uafr_uncertainty``: float32 in [0, 1], the map of the UAFR block nearest the output, the last of
    ``uncertainty_maps`` (None when the model has none); every block's map is in ``uncertainty_maps``.
    ``uncertainty_maps``: each UAFR map by its name in ``ModelSpec.uncertainty_maps``.
    ``entropy``: float32 in [0, 1], normalised predictive entropy of the stitched probabilities.
    ``top_class_error``: float32 in [0, 1], the model's own probability that each voxel's label is wrong,
    ``1 - p(label)`` for the class chosen (with a ``nonzero_is_foreground`` model, the likeliest foreground
    class where the rule applies); uncalibrated. Computed in the same pass as the labels, without the
    probabilities; None only for a Prediction built without it.
    ``error_likelihood``: float32 in [0, 1], the calibrated probability that each voxel's label is wrong,
    from the model's error model (``napari_medcl.error_model``, fitted out of fold); None for a model
    without one.
    ``probabilities``: float32 (K, *S) when asked for, else None.
    ``provenance``: tool version, model name and SHA-256, execution provider used, tiling, timings
    (``Provenance``; its ``to_dict()`` is the case's JSON sidecar).
    ``verdict``: whether the scan looks like the model's training data (``napari_medcl.verdict.Verdict``:
    ok / caution / out-of-distribution / unknown, with reasons), judged on the whole input scan; None only
    for a Prediction built without one.
    ``window_features``: float32 (N, F), the network's pooled bottleneck features of every window that ran,
    for a model with window features (``ModelSpec.features``), else None; the verdict's ``features`` check
    reads them (``napari_medcl.feature_distance``), and ``medcl-calibrate`` measures training cases with them.
    """

    labels: Volume
    entropy: Volume
    uafr_uncertainty: Volume | None = None
    uncertainty_maps: dict[str, Volume] = field(default_factory=dict)
    probabilities: Volume | None = None
    provenance: Provenance | None = None
    top_class_error: Volume | None = None
    verdict: Verdict | None = None
    error_likelihood: Volume | None = None
    window_features: np.ndarray | None = None

    @property
    def error_map(self) -> tuple[str, Volume] | None:
        """The map every consumer reads as the probability that each voxel's label is wrong, with its kind:
        ``("error_likelihood", map)``, the calibrated map, when the model has one; else
        ``("top_class_error", map)``, the model's own 1 - p(label) (uncalibrated); None without either."""
        if self.error_likelihood is not None:
            return "error_likelihood", self.error_likelihood
        if self.top_class_error is not None:
            return "top_class_error", self.top_class_error
        return None

    def crop(self, box: tuple[slice, ...]) -> Prediction:
        """Every output cut to ``box`` (spatial slices; see ``Volume.crop``)."""
        return self._each_output(lambda output, _background: output.crop(box))

    def pasted(self, grid: Volume, box: tuple[slice, ...]) -> Prediction:
        """Every output placed at ``box`` of the whole grid of ``grid`` (its shape and geometry), with each
        output's background value around it: label 0, probability 1 for class 0 and 0 for the others, zero
        entropy, top-class error and uncertainty."""

        def paste(output: Volume, background: np.ndarray) -> Volume:
            channels = output.array.shape[:1] if output.channel_axis else ()
            full = np.empty((*channels, *grid.spatial_shape), dtype=output.array.dtype)
            full[...] = background.reshape(background.shape + (1,) * grid.spatial_dims)
            full[(slice(None), *box) if output.channel_axis else box] = output.array
            return grid.with_array(full, channel_axis=output.channel_axis, metadata={})

        return self._each_output(paste)

    def set_background(self, where: np.ndarray) -> None:
        """Each output's background value (see ``pasted``) where ``where`` (spatial shape, bool) holds, in
        place: for a prediction's own fresh arrays, before it is handed out."""
        for output, background in self._outputs():
            index = (slice(None), where) if output.channel_axis else where
            output.array[index] = background[:, None] if output.channel_axis else background

    def _outputs(self) -> list[tuple[Volume, np.ndarray]]:
        """(output, background value: one per channel, or a scalar array) for every output present."""
        zero = np.zeros(())
        outputs = [(self.labels, zero), (self.entropy, zero)]
        if self.top_class_error is not None:
            outputs.append((self.top_class_error, zero))
        if self.error_likelihood is not None:
            outputs.append((self.error_likelihood, zero))
        if self.uafr_uncertainty is not None:
            outputs.append((self.uafr_uncertainty, zero))
        outputs += [(m, zero) for m in self.uncertainty_maps.values()]
        if self.probabilities is not None:
            background = np.zeros(self.probabilities.num_channels)
            background[0] = 1.0
            outputs.append((self.probabilities, background))
        return outputs

    def _each_output(self, change: Callable[[Volume, np.ndarray], Volume]) -> Prediction:
        changed = {id(output): change(output, background) for output, background in self._outputs()}

        def new(output: Volume | None) -> Any:
            return None if output is None else changed[id(output)]

        return replace(
            self,
            labels=new(self.labels),
            entropy=new(self.entropy),
            top_class_error=new(self.top_class_error),
            error_likelihood=new(self.error_likelihood),
            uafr_uncertainty=new(self.uafr_uncertainty),
            uncertainty_maps={name: new(m) for name, m in self.uncertainty_maps.items()},
            probabilities=new(self.probabilities),
        )
