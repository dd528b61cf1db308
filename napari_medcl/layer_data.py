"""Volumes <-> napari layer data, and ``segment_layer``: segment an image layer into labels + uncertainty layers.

Everything here is pure: it reads napari Layer objects (or ``(data, kwargs, type)`` LayerDataTuples) and returns
LayerDataTuples, never touches Qt or a viewer. The reader, the writer and the widget all go through it, so the
geometry round trip (file -> layer -> outputs -> file) lives in one place.

A layer shows a volume with ``scale`` = spacing and ``translate`` = origin (array order, mm). The full source
geometry, including an oblique direction that napari cannot display, travels in ``metadata["medcl_geometry"]``;
it is trusted as long as the layer's shape, scale and translate still agree with it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medcl.errors import UsageError
from napari_medcl.volume import Volume

if TYPE_CHECKING:
    from napari_medcl.prediction import Progress
    from napari_medcl.session import InferenceSession
    from napari_medcl.volume import Prediction

LayerDataTuple = tuple[Any, dict[str, Any], str]

GEOMETRY_KEY = "medcl_geometry"
PREDICTION_KEY = "medcl_prediction"
# An image layer's stable id, and on each layer made from it {"image_id": ..., "output": kind}: results are
# found by these, never by name, so a renamed layer or a second scan with the same name cannot be mixed up.
IMAGE_ID_KEY = "medcl_image_id"
DERIVED_KEY = "medcl_derived"
AXIS_NAMES = ("z", "y", "x")
# Labels let the anatomy show through; the colours still tell the classes apart.
LABELS_OPACITY = 0.4
# Uncertainty maps share one fixed range so that cases and runs compare by eye. Low values are fully
# transparent and the colour ramps in with its opacity (translucent blending), so the map neither hides the
# anatomy where the model is sure nor washes out to white over bright tissue as additive blending did.
UNCERTAINTY_COLORS = (
    (1.0, 0.85, 0.0, 0.0),
    (1.0, 0.55, 0.0, 0.55),
    (1.0, 0.1, 0.55, 0.9),
    (0.85, 0.0, 1.0, 1.0),
)
UNCERTAINTY_COLORMAP = {"name": "medcl uncertainty", "colors": [list(c) for c in UNCERTAINTY_COLORS]}
UNCERTAINTY_DISPLAY = {
    "colormap": UNCERTAINTY_COLORMAP,
    "contrast_limits": (0.0, 1.0),
    "blending": "translucent",
    "opacity": 0.8,
    # In the 3D view a volume rendering of the map would hide everything behind a haze; a surface where the
    # map crosses 0.5 shows where the model hesitates and leaves the rest visible.
    "rendering": "iso",
    "iso_threshold": 0.5,
}


# What each map layer of a result is called after its image's name, by output kind (``DERIVED_KEY``).
MAP_LAYER_NAMES = {
    "error_likelihood": "error likelihood",
    "top_class_error": "error likelihood (uncalibrated)",
    "uafr_uncertainty": "UAFR uncertainty",
    "entropy": "entropy",
}
# The probability-of-error maps, the one a review prefers first (``Prediction.error_map``).
ERROR_MAP_KINDS = ("error_likelihood", "top_class_error")


class ObliqueGeometryWarning(UserWarning):
    """The scan's axes are not aligned with the patient axes; napari shows it de-obliqued."""


# --------------------------------------------------------------------------------------------------------------
# Volume -> layer data


def image_layer_data(volume: Volume, name: str | None = None) -> LayerDataTuple:
    """An Image LayerDataTuple showing ``volume`` at its physical size and position.

    RGB(A) 2D images (uint8, 3 or 4 channels) are shown as one RGB layer (channels last); other multi-channel
    volumes keep their channel axis first, so the layer is (C, *S) with a channel slider.
    Warns with ``ObliqueGeometryWarning`` when the direction is oblique: the display is then de-obliqued (scale
    and translate only) and the true direction stays in the metadata for the writer.
    """
    if name is None:
        name = _case_name(volume.source) if volume.source is not None else "image"
    warn_if_oblique(volume)
    rgb = _is_rgb(volume)
    data = np.moveaxis(volume.array, 0, -1) if rgb else volume.array
    kwargs = spatial_kwargs(volume, channel_axis=volume.channel_axis and not rgb)
    kwargs.update(name=name, rgb=rgb)
    return data, kwargs, "image"


def spatial_kwargs(volume: Volume, *, channel_axis: bool = False) -> dict[str, Any]:
    """scale/translate/units/axis_labels/metadata for a layer on ``volume``'s grid (leading channel axis if asked)."""
    n = volume.spatial_dims
    lead_scale, lead_translate = ((1.0,), (0.0,)) if channel_axis else ((), ())
    meta = {GEOMETRY_KEY: geometry_metadata(volume)}
    return {
        "scale": lead_scale + tuple(volume.spacing),
        "translate": lead_translate + tuple(volume.origin),
        "units": ("pixel",) * len(lead_scale) + ("mm",) * n,
        "axis_labels": ("c",) * len(lead_scale) + AXIS_NAMES[-n:],
        "metadata": meta,
    }


def geometry_metadata(volume: Volume) -> dict[str, Any]:
    """The JSON-friendly geometry record stored in ``metadata["medcl_geometry"]``."""
    geometry = volume.geometry_dict()
    geometry.update(
        channel_axis=bool(volume.channel_axis),
        source=None if volume.source is None else str(volume.source),
        format=volume.format,
        oblique=is_oblique(volume.direction),
    )
    return geometry


def is_oblique(direction: np.ndarray, *, atol: float = 1e-4) -> bool:
    """True unless ``direction`` only permutes and flips axes (every column is +-1 on one axis)."""
    d = np.abs(np.asarray(direction, dtype=np.float64))
    return not (np.allclose(d.max(axis=0), 1.0, atol=atol) and np.allclose(d.sum(axis=0), 1.0, atol=atol))


def warn_if_oblique(volume: Volume) -> None:
    if is_oblique(volume.direction):
        where = volume.source.name if volume.source is not None else "the image"
        warnings.warn(
            f"{where}: oblique orientation; shown de-obliqued (spacing and origin only). The true direction is "
            "kept and written back when saving.",
            ObliqueGeometryWarning,
            stacklevel=2,
        )


# --------------------------------------------------------------------------------------------------------------
# layer -> Volume


def volume_from_layer(layer: Any) -> Volume:
    """Rebuild the Volume behind an Image or Labels layer (a napari Layer or a LayerDataTuple).

    Uses ``metadata["medcl_geometry"]`` when it still matches the layer (shape, scale, translate), so oblique
    directions survive; otherwise the layer's own scale/translate with an identity direction (e.g. a layer
    opened by another reader, or one whose scale was edited by hand).
    """
    data, kwargs, layer_type = _unpack(layer)
    name = kwargs.get("name") or "layer"
    data = np.asarray(data)
    rgb = bool(kwargs.get("rgb", False)) and layer_type == "image"
    metadata = kwargs.get("metadata") or {}
    geometry = metadata.get(GEOMETRY_KEY) or {}
    channel_axis = rgb or bool(geometry.get("channel_axis", False))
    if rgb:
        data = np.moveaxis(data, -1, 0)
    spatial_ndim = data.ndim - (1 if channel_axis else 0)
    if spatial_ndim not in (2, 3):
        raise UsageError(
            f"layer {name!r}: need a 2D or 3D image (optionally RGB or with a channel axis), got shape "
            f"{data.shape}"
        )
    scale = _per_axis(kwargs.get("scale"), data.ndim - (1 if rgb else 0), 1.0)[-spatial_ndim:]
    translate = _per_axis(kwargs.get("translate"), data.ndim - (1 if rgb else 0), 0.0)[-spatial_ndim:]
    spatial_shape = data.shape[1:] if channel_axis else data.shape

    if _geometry_matches(geometry, spatial_shape, scale, translate):
        spacing, origin = tuple(geometry["spacing"]), tuple(geometry["origin"])
        direction = np.asarray(geometry["direction"], dtype=np.float64)
        source, fmt = geometry.get("source"), geometry.get("format")
    else:
        spacing, origin, direction = scale, translate, np.eye(spatial_ndim)
        source = geometry.get("source") if geometry else None
        fmt = None
    return Volume(
        array=data,
        spacing=spacing,
        origin=origin,
        direction=direction,
        channel_axis=channel_axis,
        source=None if source is None else Path(source),
        format=fmt,
    )


def layer_name(layer: Any) -> str:
    return _unpack(layer)[1].get("name") or "image"


def layer_display(layer: Any, spatial_dims: int) -> dict[str, tuple[str, ...]]:
    """The ``units`` and ``axis_labels`` of a layer's last ``spatial_dims`` axes, for outputs to match it
    (napari ignores units when the layers of a viewer disagree)."""
    kwargs = _unpack(layer)[1]
    display = {}
    for key in ("units", "axis_labels"):
        values = tuple(str(v) for v in (kwargs.get(key) or ()))
        if len(values) >= spatial_dims:
            display[key] = values[-spatial_dims:]
    return display


def _unpack(layer: Any) -> tuple[Any, dict[str, Any], str]:
    if isinstance(layer, tuple):
        if not 1 <= len(layer) <= 3:
            raise ValueError(f"a LayerDataTuple has 1 to 3 items, got {len(layer)}")
        data = layer[0]
        kwargs = dict(layer[1]) if len(layer) > 1 and layer[1] else {}
        layer_type = layer[2] if len(layer) > 2 else "image"
        return data, kwargs, layer_type
    if not hasattr(layer, "data") or not hasattr(layer, "scale"):
        raise TypeError(
            f"expected a napari layer or a (data, kwargs, type) tuple, got {type(layer).__name__}"
        )
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    kwargs = {
        "name": layer.name,
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "metadata": layer.metadata,
        "rgb": getattr(layer, "rgb", False),
        "units": tuple(str(u) for u in getattr(layer, "units", ()) or ()),
        "axis_labels": tuple(getattr(layer, "axis_labels", ()) or ()),
    }
    return data, kwargs, layer_kind(layer)


def layer_kind(layer: Any) -> str:
    """``image``, ``labels``, ``shapes``...: the layer's class name, also through napari's PublicOnlyProxy
    (which forwards ``__class__`` but not ``type()``)."""
    return layer.__class__.__name__.lower()


def _per_axis(values: Any, ndim: int, default: float) -> tuple[float, ...]:
    if values is None:
        return (default,) * ndim
    values = tuple(float(v) for v in np.atleast_1d(values))
    if len(values) < ndim:  # napari pads leading axes with the default
        values = (default,) * (ndim - len(values)) + values
    return values[-ndim:]


def _geometry_matches(geometry: dict, shape: tuple[int, ...], scale: tuple, translate: tuple) -> bool:
    try:
        return (
            tuple(geometry["shape"]) == tuple(shape)
            and np.allclose(geometry["spacing"], scale, rtol=1e-6, atol=1e-9)
            and np.allclose(geometry["origin"], translate, rtol=0, atol=1e-4)
            and np.asarray(geometry["direction"]).shape == (len(shape), len(shape))
        )
    except (KeyError, TypeError, ValueError):
        return False


def _is_rgb(volume: Volume) -> bool:
    return (
        volume.channel_axis
        and volume.spatial_dims == 2
        and volume.num_channels in (3, 4)
        and volume.array.dtype == np.uint8
    )


def _case_name(path: Path) -> str:
    try:
        from napari_medcl.io import case_name
    except ImportError:  # io not importable: fall back to the file name without its extensions
        return path.name.split(".")[0]
    return case_name(path)


# --------------------------------------------------------------------------------------------------------------
# segmentation


@dataclass(frozen=True)
class SegmentationResult:
    """What one segmentation run hands to the viewer: the layers, the model it used, and its provenance."""

    layers: list[LayerDataTuple]
    model: Any  # LoadedModel, kept so that a widget can reuse the ONNX session for the next run
    provenance: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    prediction: Prediction | None = None  # with its class probabilities, when the run was asked to keep them


def segment_layer(
    image_layer: Any,
    model: InferenceSession | str | Path | None = None,
    *,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    overlap: float = 0.5,
    tta: bool = False,
    roi: Any = None,
    progress: Callable[[Progress], Any] | None = None,
    cancel: Any = None,
    uncertainty_maps: bool = False,
) -> list[LayerDataTuple]:
    """Segment an Image layer (napari Layer or LayerDataTuple) and return the result as LayerDataTuples.

    Returns, in order: Labels ``"<image> labels"`` (class colours, class names in ``features``), Image
    ``"<image> UAFR uncertainty"`` (when the model has UAFR maps), Image ``"<image> entropy"`` (hidden), Image
    ``"<image> error likelihood (uncalibrated)"`` (1 - the probability of each voxel's label), Image
    ``"<image> error likelihood"`` (the calibrated map, when the model carries an error model) and, when
    ``uncertainty_maps`` is True, one Image ``"<image> UAFR <map>"`` per named map (hidden). One map is shown:
    the calibrated error likelihood when there is one, else the uncalibrated one, else the UAFR map. All carry
    the image's scale/translate/units/axis_labels and its geometry in metadata, plus the model's name,
    SHA-256, the execution provider actually used and the intended-use notice under
    ``metadata["medcl_prediction"]``.
    ``roi``: see ``plan_region``; outside it labels and uncertainties are 0. ``progress`` is called with each
    ``Progress``; ``cancel`` (threading.Event or callable) raises ``errors.Cancelled`` between windows.
    ``device``, ``backend``, ``precision``: how a model that is not a session yet is opened (``load_model``;
    ``onnx_session.available_backends()`` / ``available_precisions()`` list the choices on this machine).
    """
    volume = volume_from_layer(image_layer)
    steps = segment_volume_iter(
        volume,
        model,
        name=layer_name(image_layer),
        device=device,
        backend=backend,
        precision=precision,
        overlap=overlap,
        tta=tta,
        roi=roi,
        cancel=cancel,
        uncertainty_maps=uncertainty_maps,
        metadata=_unpack(image_layer)[1].get("metadata"),
        display=layer_display(image_layer, volume.spatial_dims),
    )
    while True:
        try:
            event = next(steps)
        except StopIteration as stop:
            return stop.value.layers
        if progress is not None:
            progress(event)


def segment_volume_iter(
    volume: Volume,
    model: InferenceSession | str | Path | None = None,
    *,
    name: str = "image",
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    overlap: float = 0.5,
    tta: bool = False,
    roi: Any = None,
    cancel: Any = None,
    uncertainty_maps: bool = False,
    metadata: dict[str, Any] | None = None,
    display: dict[str, tuple[str, ...]] | None = None,
    keep_prediction: bool = False,
) -> Generator[Progress, None, SegmentationResult]:
    """The generator behind ``segment_layer``: yields each ``Progress`` and returns a ``SegmentationResult``.

    The widget runs this in a napari ``thread_worker`` (the Volume is taken from the layer on the GUI thread
    first); ``model`` may be a LoadedModel, a bundled model name, a path, None for the default model, or a
    ``napari_medcl.remote.RemoteModel`` (a server's model; ``device``, ``backend`` and ``precision`` are then
    the server's).
    ``metadata`` is the image layer's (copied onto the outputs); ``display`` its ``layer_display``.
    ``keep_prediction``: the result carries the Prediction with its class probabilities (for prompts; a
    server's Prediction comes without them, as its prompts are answered on the server).
    """
    from napari_medcl.onnx_session import open_session
    from napari_medcl.prediction import predict_iter
    from napari_medcl.remote import RemoteModel

    start = time.perf_counter()
    if isinstance(model, RemoteModel):  # a medcl-serve model: the server's device, the same outputs
        loaded: Any = model
        # The server's session keeps the probabilities and answers the prompts: they need not travel.
        items = model.predict_iter(volume, region=roi, cancel=cancel, overlap=overlap, tta=tta)
    else:
        loaded = open_session(
            model, device=device, backend=backend, precision=precision
        )  # kept in the result for the widget's next run
        items = predict_iter(
            volume, loaded, device=device, overlap=overlap, tta=tta, cancel=cancel, region=roi,
            return_probabilities=keep_prediction,
        )  # fmt: skip

    prediction: Prediction | None = None
    for item in items:
        if hasattr(item, "labels"):
            prediction = item
        else:
            yield item
    if prediction is None:  # predict_iter's contract: its last item is the Prediction
        raise RuntimeError("predict_iter ended without a Prediction")

    provenance = prediction.provenance.to_dict()
    layers = prediction_layers(
        prediction,
        volume,
        loaded.spec,
        name=name,
        provenance=provenance,
        metadata=metadata,
        display=display,
        uncertainty_maps=uncertainty_maps,
    )
    return SegmentationResult(
        layers=layers,
        model=loaded,
        provenance=provenance,
        seconds=time.perf_counter() - start,
        prediction=prediction if keep_prediction else None,
    )


def prediction_layers(
    prediction: Prediction,
    volume: Volume,
    spec: Any,
    *,
    name: str,
    provenance: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    display: dict[str, tuple[str, ...]] | None = None,
    uncertainty_maps: bool = False,
) -> list[LayerDataTuple]:
    """LayerDataTuples for a Prediction made on ``volume`` (the whole image; a region run's outputs are
    background outside its region).

    Every output sits on the image's spatial grid: its scale/translate, ``display`` (units, axis labels;
    mm and z/y/x by default), the image's ``metadata`` with the spatial geometry and the provenance, and,
    when the image has an id (``IMAGE_ID_KEY``, see ``image_id``), ``DERIVED_KEY`` naming the image and output.
    """
    n = volume.spatial_dims
    geometry = {**geometry_metadata(volume), "channel_axis": False}
    own_keys = (GEOMETRY_KEY, PREDICTION_KEY, IMAGE_ID_KEY, DERIVED_KEY)
    base_meta = {k: v for k, v in (metadata or {}).items() if k not in own_keys}
    image_id = (metadata or {}).get(IMAGE_ID_KEY)
    display = {"units": ("mm",) * n, "axis_labels": AXIS_NAMES[-n:], **(display or {})}
    if provenance is None:  # the prediction's own, as a plain dict (built once for every layer)
        provenance = {} if prediction.provenance is None else prediction.provenance.to_dict()

    def kwargs_for(kind: str) -> dict[str, Any]:
        meta = {**base_meta, GEOMETRY_KEY: dict(geometry), PREDICTION_KEY: {**provenance, "output": kind}}
        if image_id is not None:
            meta[DERIVED_KEY] = {"image_id": image_id, "output": kind}
        return {
            "scale": tuple(volume.spacing),
            "translate": tuple(volume.origin),
            **display,
            "metadata": meta,
        }

    layers: list[LayerDataTuple] = [
        (
            np.asarray(prediction.labels.array),
            {
                **kwargs_for("labels"),
                "name": f"{name} labels",
                "colormap": label_colormap(spec),
                "opacity": LABELS_OPACITY,
                "features": {
                    "index": [c.index for c in spec.classes],
                    "name": [c.name for c in spec.classes],
                },
            },
            "labels",
        )
    ]

    def uncertainty_layer(array: np.ndarray, kind: str, layer_label: str, **extra: Any) -> LayerDataTuple:
        return (
            np.asarray(array, dtype=np.float32),
            {**kwargs_for(kind), **UNCERTAINTY_DISPLAY, "name": f"{name} {layer_label}", **extra},
            "image",
        )

    # The map shown is the one measured to find the model's mistakes best (docs/uncertainty.md): the
    # calibrated error likelihood when the model carries an error model, else the model's own (uncalibrated)
    # one; the others stay one click away (the default 3D model's UAFR map ranks wrong voxels below right
    # ones).
    error_map = prediction.error_map
    shown = None if error_map is None else error_map[0]
    if prediction.uafr_uncertainty is not None:
        layers.append(
            uncertainty_layer(
                prediction.uafr_uncertainty.array,
                "uafr_uncertainty",
                MAP_LAYER_NAMES["uafr_uncertainty"],
                visible=shown is None,
            )
        )
    layers.append(
        uncertainty_layer(prediction.entropy.array, "entropy", MAP_LAYER_NAMES["entropy"], visible=False)
    )
    for kind, output in (
        ("top_class_error", prediction.top_class_error),
        ("error_likelihood", prediction.error_likelihood),
    ):
        if output is not None:
            layers.append(uncertainty_layer(output.array, kind, MAP_LAYER_NAMES[kind], visible=kind == shown))
    if uncertainty_maps:
        for map_name, map_volume in prediction.uncertainty_maps.items():
            layers.append(
                uncertainty_layer(map_volume.array, f"uafr:{map_name}", f"UAFR {map_name}", visible=False)
            )
    return layers


def label_colormap(spec: Any) -> Any:
    """A DirectLabelColormap from the spec's class colours (background transparent); a plain dict without napari."""
    colors: dict[int | None, str] = {None: "transparent", 0: "transparent"}
    colors.update({c.index: c.color for c in spec.classes if c.index != 0})
    try:
        from napari.utils.colormaps import DirectLabelColormap
    except ImportError:
        return colors
    return DirectLabelColormap(color_dict=colors)


# --------------------------------------------------------------------------------------------------------------
# layers that belong to an image


def image_id(layer: Any) -> str:
    """The stable id of an Image layer, given to it (in its metadata) the first time it is asked for."""
    return stable_id(layer, IMAGE_ID_KEY)


def stable_id(layer: Any, key: str) -> str:
    """The id under ``metadata[key]`` of a layer, made the first time it is asked for (a layer object is no
    identity: napari hands plugins a new proxy on each access)."""
    import uuid

    metadata = layer.metadata
    if not isinstance(metadata.get(key), str):
        metadata[key] = uuid.uuid4().hex
    return metadata[key]


def derived_from(layer: Any) -> tuple[str | None, str | None]:
    """(image id, output kind) of a layer made from an image, else (None, None)."""
    record = (getattr(layer, "metadata", None) or {}).get(DERIVED_KEY)
    if not isinstance(record, dict):
        return None, None
    return record.get("image_id"), record.get("output")


def derived_layers(layers: Any, image_key: str) -> dict[str, Any]:
    """The layers made from the image with id ``image_key``, by output kind (the last one of each kind)."""
    found = {}
    for layer in layers:
        owner, kind = derived_from(layer)
        if owner == image_key and kind is not None:
            found[kind] = layer
    return found


def cursor_readout(world_point: Any, labels: Any, maps: list[tuple[str, Any]]) -> str | None:
    """'GM · UAFR 0.31 · entropy 0.12' at a world point: the class under the cursor and each map's value
    there, for one status line; None when the point is outside the labels layer.

    labels: a Labels layer with ``features`` "index"/"name" (the product's); maps: (short name, Image layer)
    on the same grid.
    """
    point = np.asarray(world_point, dtype=np.float64)[-labels.ndim :]
    index = tuple(int(round(v)) for v in np.asarray(labels.world_to_data(point))[-labels.ndim :])
    shape = np.shape(labels.data)
    if len(index) != len(shape) or not all(0 <= i < n for i, n in zip(index, shape)):
        return None
    value = int(np.asarray(labels.data)[index])
    names = class_names(labels)
    parts = [names.get(value, f"label {value}")]
    for short, layer in maps:
        data = np.asarray(layer.data)
        if data.shape == shape:
            parts.append(f"{short} {float(data[index]):.2f}")
    return " · ".join(parts)


def class_names(labels: Any) -> dict[int, str]:
    """index -> class name from the ``features`` columns ``index`` and ``name`` of a Labels layer or a
    LayerDataTuple (the product's labels carry them; a dict of lists or a DataFrame); {} without them."""
    if isinstance(labels, tuple):
        features = (labels[1] or {}).get("features") if len(labels) > 1 else None
    else:
        features = getattr(labels, "features", None)
    try:
        if features is None or "index" not in features or "name" not in features:
            return {}
        return {int(i): str(n) for i, n in zip(list(features["index"]), list(features["name"]))}
    except (TypeError, ValueError):
        return {}
