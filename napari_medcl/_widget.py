"""napari dock widgets: segment an image with progress and cancel, then review where the model was unsure.

Thin on purpose: the array work is in ``layer_data`` (segment, layer data), ``review`` (ranking) and
``_writer`` (saving). This module gathers parameters, runs ``layer_data.segment_volume_iter`` in a napari thread
worker, turns its Progress events into progress bars, and puts the returned layers into the viewer (updating the
previous run's layers in place unless "keep previous" is ticked). Layers are only touched on the GUI thread.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    Select,
)

from napari_medcl import layer_data
from napari_medcl.crash_log import internal_error_message
from napari_medcl.errors import Cancelled, MedclError, UsageError

if TYPE_CHECKING:
    import napari

logger = logging.getLogger(__name__)

OPEN_FILE = "Open file..."
# The name internal errors are logged under (napari_medcl.crash_log).
PLUGIN = "napari-medcl"
REGION_WHOLE, REGION_SLICE, REGION_RECT = "Whole image", "Current slice", "Rectangle (Shapes layer)"
RANK_MODES = (
    ("mean uncertainty in labels", "mean_in_foreground"),
    ("uncertain volume > threshold", "volume_above"),
)
LIST_LENGTH = 50
OVERLAY_COLOR = "#00e5ff"
WARNING_STYLE = "color: #ffb000;"
ERROR_STYLE = "color: #ff5050;"


def _layer_choices(kind: str):
    """A magicgui choices callback listing the viewer's layers of one type (``image``, ``labels``, ``shapes``)."""

    def choices(widget: Any) -> list[tuple[str, Any]]:
        owner = getattr(widget, "_medcl_owner", None)
        viewer = owner.viewer if owner is not None else None
        if viewer is None:
            return []
        return [(layer.name, layer) for layer in viewer.layers if layer_data.layer_kind(layer) == kind]

    return choices


def _combo(label: str, kind: str, owner: Any, **kwargs: Any) -> ComboBox:
    combo = ComboBox(label=label, choices=_layer_choices(kind), **kwargs)
    combo._medcl_owner = owner
    combo.reset_choices()
    return combo


def _wrap(label: Label) -> Label:
    label.native.setWordWrap(True)
    return label


# ------------------------------------------------------------------------------------------------------------
# Review panel


class ReviewWidget(Container):
    """Rank slices by uncertainty, jump to them, outline voxels above a threshold, save the labels.

    Works on any pair of Labels + uncertainty Image layers on the same grid; ``SegmentWidget`` embeds one and
    points it at the layers of its last run.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        self.viewer = viewer
        self.scores: list[Any] = []
        self._entries: list[tuple[str, int]] = []
        self._labels_combo = _combo("Labels", "labels", self)
        self._uncertainty = _combo("Uncertainty", "image", self)
        self._axis = ComboBox(label="Slice axis", choices=[("z", 0), ("y", 1), ("x", 2)], value=0)
        self._mode = ComboBox(label="Rank by", choices=RANK_MODES, value="mean_in_foreground")
        self._threshold = FloatSlider(label="Threshold", min=0.0, max=1.0, step=0.01, value=0.5)
        self._show_overlay = CheckBox(text="Outline uncertainty above threshold", value=True)
        self._rank_button = PushButton(text="Rank slices")
        # choices come from a callback so that the container's reset_choices (on every layer change) keeps them
        self._slice_list = Select(label="Most uncertain", choices=self._slice_choices, allow_multiple=False)
        self._summary = _wrap(Label(value=""))
        self._save_button = PushButton(text="Save labels...")
        super().__init__(
            widgets=[
                Label(value="<b>Uncertainty review</b>"),
                self._labels_combo,
                self._uncertainty,
                self._axis,
                self._mode,
                self._threshold,
                self._show_overlay,
                self._rank_button,
                self._slice_list,
                self._summary,
                self._save_button,
            ]
        )
        self.overlay: Any = None
        self._slice_list.native.setSelectionMode(self._slice_list.native.SelectionMode.SingleSelection)
        self._slice_list.native.setMinimumHeight(140)
        self._slice_list.native.itemClicked.connect(
            lambda item: self.go_to(self._slice_list.native.row(item))
        )
        self._slice_list.native.currentRowChanged.connect(self.go_to)
        self._rank_button.changed.connect(self.refresh)
        self._mode.changed.connect(self.refresh)
        self._axis.changed.connect(self.refresh)
        self._threshold.changed.connect(self._on_threshold)
        self._show_overlay.changed.connect(self.update_overlay)
        self._save_button.changed.connect(self._on_save)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._on_layers_changed)

    # -- public API (used by SegmentWidget, tests and the screenshot script)

    def set_layers(self, labels_layer: Any, uncertainty_layer: Any) -> None:
        self.reset_choices()
        self._labels_combo.value = labels_layer
        self._uncertainty.value = uncertainty_layer
        self.refresh()

    def refresh(self, *_: Any) -> None:
        """Rank the slices again and refill the list (top ``LIST_LENGTH``)."""
        from napari_medcl.review import rank_slices

        pair = self._arrays()
        self.scores, self._entries = [], []
        if pair is None:
            self._slice_list.reset_choices()
            return
        labels, uncertainty, spacing = pair
        self._axis.visible = uncertainty.ndim == 3
        self.scores = rank_slices(
            uncertainty,
            labels,
            self._axis.value,
            mode=self._mode.value,
            threshold=self._threshold.value,
            spacing=spacing,
            limit=LIST_LENGTH,
        )
        unit = self._volume_unit(uncertainty.ndim)
        self._entries = [(self._describe(i, s, uncertainty.ndim, unit), i) for i, s in enumerate(self.scores)]
        self._slice_list.reset_choices()
        total = float((uncertainty > self._threshold.value).sum()) * float(np.prod(spacing))
        self._summary.value = (
            f"{len(self.scores)} slice(s) listed. Uncertain > {self._threshold.value:.2f}: {total:.0f} {unit} "
            f"in total. Click an entry to go there."
        )
        self.update_overlay()

    def go_to(self, row: int) -> None:
        """Move the viewer to the ``row``-th ranked slice and centre the camera on its uncertain region."""
        from napari_medcl.review import region_center

        if not 0 <= row < len(self.scores):
            return
        pair = self._arrays()
        if pair is None:
            return
        labels, uncertainty, _ = pair
        layer = self._uncertainty.value
        axis = self._axis.value if uncertainty.ndim == 3 else 0
        threshold = self._threshold.value if self._mode.value == "volume_above" else None
        center = region_center(uncertainty, labels, axis, self.scores[row].index, threshold=threshold)
        dims = self.viewer.dims
        offset = dims.ndim - layer.ndim
        world = list(dims.point)
        world[offset:] = list(layer.data_to_world(center))
        if uncertainty.ndim == 3:
            world_axis = offset + axis
            if dims.ndisplay == 2 and world_axis in dims.displayed:
                dims.order = (world_axis, *(a for a in dims.order if a != world_axis))
            dims.set_point(world_axis, world[world_axis])
        _camera(self.viewer).center = tuple(world[a] for a in dims.displayed)

    def update_overlay(self, *_: Any) -> None:
        """Show (or update) the "<image> uncertain > t" outline layer for the current threshold."""
        from napari_medcl.review import uncertain_mask

        layer = self._uncertainty.value
        if layer is None or not self._show_overlay.value:
            if self.overlay is not None and self.overlay in self.viewer.layers:
                self.overlay.visible = False
            return
        threshold = self._threshold.value
        mask = uncertain_mask(np.asarray(layer.data), threshold)
        name = f"{_base_name(layer.name)} uncertain > {threshold:.2f}"
        if self.overlay is not None and self.overlay in self.viewer.layers and self.overlay.ndim == mask.ndim:
            self.overlay.data = mask
            self.overlay.name = name
            self.overlay.visible = True
            return
        from napari.utils.colormaps import DirectLabelColormap

        self.overlay = self.viewer.add_labels(
            mask,
            name=name,
            scale=layer.scale,
            translate=layer.translate,
            units=layer.units,
            axis_labels=layer.axis_labels,
            metadata=dict(layer.metadata),
            colormap=DirectLabelColormap(
                color_dict={None: "transparent", 0: "transparent", 1: OVERLAY_COLOR}
            ),
            opacity=0.9,
        )
        self.overlay.contour = 1
        self.overlay.editable = False

    def save_labels(self, path: str | Path) -> Path:
        """Write the selected Labels layer with its source geometry (atomic). Raises MedclError."""
        from napari_medcl._writer import write_layer_data

        layer = self._labels_combo.value
        if layer is None:
            raise UsageError("no Labels layer selected to save")
        written = write_layer_data(layer, path)
        self._summary.value = f"Saved {layer.name!r} to {written}"
        return written

    # -- internals

    def _slice_choices(self, _widget: Any = None) -> list[tuple[str, int]]:
        return list(getattr(self, "_entries", []))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]] | None:
        labels_layer, u_layer = self._labels_combo.value, self._uncertainty.value
        if labels_layer is None or u_layer is None:
            self._summary.value = "Choose a Labels layer and an uncertainty layer (run a segmentation first)."
            return None
        labels, uncertainty = np.asarray(labels_layer.data), np.asarray(u_layer.data)
        if labels.shape != uncertainty.shape or uncertainty.ndim not in (2, 3):
            self._summary.value = f"{labels_layer.name!r} {labels.shape} and {u_layer.name!r} {uncertainty.shape} are not one 2D/3D grid."
            return None
        return labels, uncertainty, tuple(float(s) for s in u_layer.scale[-uncertainty.ndim :])

    def _volume_unit(self, ndim: int) -> str:
        """mm³/mm² when the layer is in millimetres, else voxels³/pixels² (a layer from another reader)."""
        units = getattr(self._uncertainty.value, "units", None) or ()
        metric = bool(units) and str(units[-1]) in ("millimeter", "mm")
        return ("mm" if metric else "px") + ("³" if ndim == 3 else "²")

    @staticmethod
    def _describe(rank: int, score: Any, ndim: int, unit: str) -> str:
        where = f"slice {score.index}" if ndim == 3 else "image"
        return (
            f"{rank + 1}. {where}: {score.mean_in_foreground:.2f} mean, {score.uncertain_mm:.0f} {unit} > t"
        )

    def _on_threshold(self, *_: Any) -> None:
        if self._mode.value == "volume_above":
            self.refresh()
        else:
            self.update_overlay()

    def _on_layers_changed(self, event: Any) -> None:
        if self.overlay is not None and self.overlay not in self.viewer.layers:
            self.overlay = None
        self.reset_choices()

    def _on_save(self, *_: Any) -> None:
        from qtpy.QtWidgets import QFileDialog

        from napari_medcl.io.formats import SCAN_FORMATS

        layer = self._labels_combo.value
        if layer is None:
            _notify_error(self._summary, "No Labels layer to save.")
            return
        default = _default_save_path(layer)
        save_filter = ";;".join(
            f"{fmt.title} ({' '.join(f'*{e}' for e in fmt.written_extensions)})" for fmt in SCAN_FORMATS
        )
        path, _ = QFileDialog.getSaveFileName(
            self.native,
            "Save labels with the scan's geometry",
            str(default),
            save_filter,
        )
        if not path:
            return
        try:
            self.save_labels(path)
        except MedclError as error:
            _notify_error(self._summary, str(error))
        except Exception as error:
            _notify_error(self._summary, internal_error_message(PLUGIN, error))


# ------------------------------------------------------------------------------------------------------------
# Segmentation widget


@dataclass(frozen=True)
class _Job:
    volume: Any
    model: Any
    model_key: tuple[str, str]
    name: str
    metadata: dict[str, Any]
    display: dict[str, Any]
    roi: Any


class SegmentWidget(Container):
    """Segment the chosen image with an ONNX model; labels, UAFR uncertainty and entropy appear as layers."""

    def __init__(self, viewer: napari.viewer.Viewer):
        self.viewer = viewer
        self._extra_models: list[str] = []
        self._previous_model: str | None = None
        self._loaded: tuple[tuple[str, str], Any] | None = None
        self._worker: Any = None
        self._cancel_event: threading.Event | None = None
        self.last_layers: list[Any] = []
        self.last_provenance: dict[str, Any] = {}
        self._job_key: tuple[str, str] | None = None
        self._review: ReviewWidget | None = None
        self._manifest_error: str | None = None
        self._image = _combo("Image", "image", self)
        self._model = ComboBox(label="Model", choices=self._model_choices)
        self._model_info = _wrap(Label(value=""))
        self._notice = _wrap(Label(value=""))
        devices, self._cuda_reason = _devices()
        self._device = ComboBox(label="Device", choices=devices, value="auto")
        self._device.tooltip = (
            "CUDA: available" if self._cuda_reason is None else f"CUDA: {self._cuda_reason}"
        )
        self._overlap = FloatSpinBox(label="Overlap", min=0.0, max=0.9, step=0.05, value=0.5)
        self._tta = CheckBox(text="Test-time augmentation (mirroring, slower)", value=False)
        self._region = ComboBox(label="Region", choices=[REGION_WHOLE, REGION_SLICE, REGION_RECT])
        self._shapes = _combo("Rectangle", "shapes", self, visible=False)
        self._maps = CheckBox(text="Add each UAFR map as a layer", value=False)
        self._keep = CheckBox(text="Keep previous results (new layers)", value=False)
        self._run = PushButton(text="Run")
        self._progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self._eta = Label(value="")
        self._status = _wrap(Label(value=""))
        self._device_note = _wrap(Label(value=""))
        self._review_button = PushButton(text="Open uncertainty review")
        super().__init__(
            widgets=[
                self._image,
                self._model,
                self._model_info,
                self._notice,
                self._device,
                self._overlap,
                self._tta,
                self._region,
                self._shapes,
                self._maps,
                self._keep,
                self._run,
                self._progress,
                self._eta,
                self._status,
                self._device_note,
                self._review_button,
            ]
        )
        self._model.changed.connect(self._on_model_changed)
        self._model.native.activated.connect(self._on_model_activated)
        self._region.changed.connect(lambda value: setattr(self._shapes, "visible", value == REGION_RECT))
        self._run.changed.connect(self._on_run_clicked)
        self._review_button.changed.connect(lambda: self.show_review())
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._on_layers_changed)
        self._on_model_changed(self._model.value)

    # -- public API (tests and the screenshot script drive the widget through these)

    @property
    def running(self) -> bool:
        return self._worker is not None

    def add_model_file(self, path: str | Path) -> None:
        """Add an .onnx file to the model picker and select it."""
        path = str(Path(path).expanduser().resolve())
        if path not in self._extra_models:
            self._extra_models.append(path)
        self._model.reset_choices()
        self._model.value = path

    def run(self, *, sync: bool = False) -> Any:
        """Start a segmentation (in a thread worker, or on this thread when ``sync``); returns the worker."""
        if self.running:
            return self._worker
        try:
            job = self._make_job()
        except MedclError as error:
            self._show_error(str(error))
            return None
        except Exception as error:
            self._show_error(internal_error_message(PLUGIN, error))
            return None
        self._cancel_event = threading.Event()
        kwargs = {
            "name": job.name,
            "device": self._device.value,
            "overlap": self._overlap.value,
            "tta": self._tta.value,
            "roi": job.roi,
            "cancel": self._cancel_event,
            "uncertainty_maps": self._maps.value,
            "metadata": job.metadata,
            "display": job.display,
        }
        self._set_running(True)
        self._job_key = job.model_key
        if sync:
            return self._run_sync(job, kwargs)
        from napari.qt.threading import create_worker

        worker = create_worker(
            _worker_steps,
            job.volume,
            job.model,
            **kwargs,
            _progress={"total": 0, "desc": f"napari-medcl: segmenting {job.name}"},
            _connect={
                "yielded": self._on_progress,
                "returned": self._on_returned,
                "errored": self._on_errored,
                "aborted": self._on_aborted,
                "finished": self._on_finished,
            },
            _start_thread=False,
        )
        self._worker = worker
        worker.start()
        return worker

    def show_review(self) -> ReviewWidget:
        """The uncertainty review panel, docked beside this widget (created, or shown again, on demand)."""
        window = getattr(self.viewer, "window", None)
        docked = getattr(window, "dock_widgets", None)
        if self._review is not None and docked is not None and self._review not in docked.values():
            self._review = None  # its dock was closed
        if self._review is None:
            self._review = ReviewWidget(self.viewer)
            if window is not None:
                window.add_dock_widget(self._review, name="Uncertainty review", area="right", tabify=False)
        else:
            _raise_dock(self._review)
        return self._review

    def cancel(self) -> None:
        """Ask the running segmentation to stop at the next window; it then adds nothing."""
        if self._cancel_event is not None:
            self._cancel_event.set()
        if self.running:
            self._run.text = "Cancelling..."
            self._run.enabled = False

    # -- building the job (GUI thread)

    def _make_job(self) -> _Job:
        image = self._image.value
        if image is None:
            raise UsageError("No image layer: open a scan first (File > Open, or File > Open Sample).")
        choice = self._model.value
        if not choice or choice == OPEN_FILE:
            raise UsageError("Choose a model: a bundled one, or 'Open file...' for an .onnx file.")
        volume = layer_data.volume_from_layer(image)
        key = (choice, self._device.value)
        model = self._loaded[1] if self._loaded is not None and self._loaded[0] == key else choice
        return _Job(
            volume=volume,
            model=model,
            model_key=key,
            name=image.name,
            metadata=dict(image.metadata),
            display=layer_data.layer_display(image, volume.spatial_dims),
            roi=self._roi(image, volume),
        )

    def _roi(self, image: Any, volume: Any) -> Any:
        region = self._region.value
        if region == REGION_WHOLE:
            return None
        spatial = volume.spatial_dims
        offset = image.ndim - spatial  # a leading channel axis (RGB layers have ndim 2 already)
        if region == REGION_SLICE:
            if spatial == 2:
                return None
            dims = self.viewer.dims
            if dims.ndisplay != 2:
                raise UsageError("'Current slice' needs the 2D view; switch off 3D or choose another region.")
            shift = dims.ndim - image.ndim
            sliced = [a - shift - offset for a in dims.not_displayed if 0 <= a - shift - offset < spatial]
            if len(sliced) != 1:
                raise UsageError(f"cannot tell which axis of {image.name!r} is sliced in this view")
            point = image.world_to_data(dims.point)
            return ("slice", sliced[0], int(round(float(point[offset + sliced[0]]))))
        shapes = self._shapes.value
        if shapes is None or len(shapes.data) == 0:
            raise UsageError("Draw a rectangle in a Shapes layer and pick it under 'Rectangle'.")
        selected = sorted(shapes.selected_data) or [len(shapes.data) - 1]
        vertices = np.asarray(shapes.data[selected[-1]], dtype=np.float64)
        world_point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        points = []
        for vertex in vertices:
            world = world_point.copy()
            world[-shapes.ndim :] = shapes.data_to_world(vertex)
            points.append(np.asarray(image.world_to_data(world), dtype=np.float64)[offset : offset + spatial])
        points = np.asarray(points)
        low, high = points.min(axis=0), points.max(axis=0)
        box = []
        for axis, n in enumerate(volume.spatial_shape):
            if high[axis] - low[axis] < 1.0:  # the rectangle lies in one slice: take the whole axis
                box.append((0, n))
            else:  # voxels whose centres lie inside the rectangle
                box.append((int(np.floor(low[axis] + 0.5)), int(np.ceil(high[axis] - 0.5)) + 1))
        return tuple(box)

    # -- running

    def _run_sync(self, job: _Job, kwargs: dict[str, Any]) -> None:
        steps = layer_data.segment_volume_iter(job.volume, job.model, **kwargs)
        try:
            while True:
                try:
                    self._on_progress(next(steps))
                except StopIteration as stop:
                    self._on_returned(stop.value)
                    break
        except Exception as error:  # the same handling as the worker's errored signal
            self._on_errored(error)
        finally:
            self._on_finished()

    def _on_run_clicked(self, *_: Any) -> None:
        if self.running:
            self.cancel()
        else:
            self.run()

    def _on_progress(self, event: Any) -> None:
        if event.stage != "infer":
            self._eta.value = f"{event.stage}..."
            return
        self._progress.max = max(1, event.total)
        self._progress.value = event.done
        remaining = event.elapsed / event.done * (event.total - event.done) if event.done else float("nan")
        eta = f", about {remaining:.0f} s left" if np.isfinite(remaining) else ""
        self._eta.value = f"{event.done}/{event.total} windows, {event.elapsed:.1f} s{eta}"
        pbar = getattr(self._worker, "pbar", None)
        if pbar is not None:
            if pbar.total != event.total:
                pbar.total = event.total
            pbar.update(event.done - pbar.n)

    def _on_returned(self, result: Any) -> None:
        self._loaded = (self._job_key, result.model)
        if self._cancel_event is not None and self._cancel_event.is_set():
            self._on_aborted()  # Cancel was pressed after the last window: still add nothing
            return
        self.last_provenance = result.provenance
        self.last_layers = self._show_layers(result.layers)
        provider = result.provenance.get("execution_provider", "?")
        roi = result.provenance.get("roi")
        where = "whole image" if roi is None else "region " + " x ".join(f"{a}:{b}" for a, b in roi)
        self._set_status(f"Done in {result.seconds:.1f} s on {provider} ({where}).")
        self._device_note.value = ""
        if provider == "CPUExecutionProvider" and self._device.value != "cpu":
            reason = self._cuda_reason or "ONNX Runtime did not create the CUDA provider"
            self._device_note.value = f"Warning: ran on the CPU, not a GPU ({reason})."
            self._device_note.native.setStyleSheet(WARNING_STYLE)
        by_kind = {
            layer.metadata.get(layer_data.PREDICTION_KEY, {}).get("output"): layer
            for layer in self.last_layers
        }
        uncertainty = by_kind.get("uafr_uncertainty") or by_kind.get("entropy")
        if by_kind.get("labels") is not None and uncertainty is not None:
            self.show_review().set_layers(by_kind["labels"], uncertainty)

    def _on_errored(self, error: BaseException) -> None:
        if isinstance(error, _WorkerFailure):
            error = error.__cause__ or error
        if isinstance(error, Cancelled):
            self._on_aborted()
            return
        if isinstance(error, MedclError):
            self._show_error(str(error))
        else:  # a bug, not the user's input: say so plainly, with where its traceback was logged
            logger.error("segmentation failed:\n%s", "".join(traceback.format_exception(error)))
            self._show_error(internal_error_message(PLUGIN, error))

    def _on_aborted(self) -> None:
        self._set_status("Cancelled; no layer was added or changed.")

    def _on_finished(self) -> None:
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        if not running:
            self._worker = None
            self._cancel_event = None
        self._run.text = "Cancel" if running else "Run"
        self._run.enabled = True
        for widget in (self._image, self._model, self._device, self._overlap, self._tta, self._region):
            widget.enabled = not running
        if running:
            self._progress.max, self._progress.value = 1, 0
            self._eta.value = "starting..."
            self._set_status("Running...")
        else:
            self._eta.value = ""

    def _show_layers(self, layer_tuples: list[Any]) -> list[Any]:
        """Add the result layers, or update the previous run's layers of the same name in place."""
        from napari.layers import Layer

        shown = []
        for data, kwargs, layer_type in layer_tuples:
            name = kwargs["name"]
            existing = (
                None if self._keep.value or name not in self.viewer.layers else self.viewer.layers[name]
            )
            if (
                existing is not None
                and layer_data.layer_kind(existing) == layer_type
                and existing.ndim == np.ndim(data)
            ):
                existing.data = data
                for key, value in kwargs.items():
                    # the user's display choices (visibility, opacity, blending) survive a re-run
                    if key not in ("name", "visible", "opacity", "blending", "rgb"):
                        setattr(existing, key, value)
                shown.append(existing)
            else:
                if existing is not None:
                    self.viewer.layers.remove(existing)
                shown.append(self.viewer.add_layer(Layer.create(data, kwargs, layer_type)))
        return shown

    def _on_layers_changed(self, _event: Any = None) -> None:
        self.reset_choices()

    # -- model picker

    def _model_choices(self, _widget: Any = None) -> list[str]:
        from napari_medcl.onnx_session import bundled_models

        try:
            bundled = [str(entry["name"]) for entry in bundled_models()]
            self._manifest_error = None
        except MedclError as error:  # shown by _describe_model; the picker still offers "Open file..."
            self._manifest_error = str(error)
            bundled = []
        return [*bundled, *self._extra_models, OPEN_FILE]

    def _on_model_changed(self, choice: Any) -> None:
        if choice != OPEN_FILE:
            self._previous_model = choice
        self._describe_model(choice)

    def _on_model_activated(self, _index: int) -> None:
        # "activated" fires on every user pick, also of the already selected entry: the file dialog opens
        # even when "Open file..." is the only choice. Programmatic changes never open a dialog.
        if self._model.value == OPEN_FILE:
            self._pick_model_file()

    def _pick_model_file(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(
            self.native, "Open an ONNX segmentation model", "", "ONNX (*.onnx)"
        )
        if path:
            self.add_model_file(path)
        elif self._previous_model is not None:
            self._model.value = self._previous_model

    def _describe_model(self, choice: str | None) -> None:
        self._model_info.value, self._notice.value = "", ""
        if self._manifest_error:
            self._set_status(self._manifest_error, ERROR_STYLE)
        if not choice or choice == OPEN_FILE:
            self._model_info.value = "Pick 'Open file...' to choose an .onnx model file."
            return
        try:
            spec = _read_spec(choice)
        except MedclError as error:
            self._model_info.value = ""
            self._set_status(str(error), ERROR_STYLE)
            return
        self._model_info.value = spec.summary()
        self._notice.value = f"<i>{spec.intended_use}</i>"

    # -- messages

    def _set_status(self, text: str, style: str = "") -> None:
        self._status.value = text
        self._status.native.setStyleSheet(style)

    def _show_error(self, message: str) -> None:
        _notify_error(self._status, message)


# ------------------------------------------------------------------------------------------------------------
# helpers


class _WorkerFailure(Exception):
    """Carries a RuntimeError (e.g. PredictionError) out of a thread worker as its ``__cause__``."""


PROGRESS_HZ = 20


def _worker_steps(*args: Any, **kwargs: Any) -> Any:
    """``segment_volume_iter`` for a superqt GeneratorWorker. The worker takes a RuntimeError from its
    generator for a deleted worker and ends without ``errored`` or ``finished``, which would leave the widget
    running forever; so RuntimeErrors leave as ``_WorkerFailure`` instead."""
    steps = layer_data.segment_volume_iter(*args, **kwargs)
    last = -math.inf
    try:
        while True:
            try:
                event = next(steps)
            except StopIteration as stop:
                return stop.value
            # Each yielded event is handled on the GUI thread (and napari's progress bar processes events
            # re-entrantly): a model with thousands of tiny windows would flood it, so progress goes out at most
            # PROGRESS_HZ times a second, plus the first and the last window and every stage change.
            now = time.monotonic()
            edge = event.stage != "infer" or event.done <= 1 or event.done >= event.total
            if edge or now - last >= 1.0 / PROGRESS_HZ:
                last = now
                yield event
    except RuntimeError as error:
        raise _WorkerFailure(str(error)) from error


def _devices() -> tuple[list[str], str | None]:
    """Devices to offer: auto and cpu always, cuda only when ONNX Runtime's CUDA provider really loads."""
    from napari_medcl.onnx_session import cuda_unavailable_reason

    try:
        reason = cuda_unavailable_reason()
    except Exception as error:  # a broken onnxruntime install must not break the widget
        reason = f"cannot probe CUDA ({error})"
    return (["auto", "cpu"] if reason else ["auto", "cpu", "cuda"]), reason


def _read_spec(choice: str) -> Any:
    """The ModelSpec of a bundled model name or an .onnx path, read without opening a session."""
    from napari_medcl.errors import ModelError
    from napari_medcl.onnx_session import MODELS_DIR, bundled_models, check_model_bytes

    path = Path(choice)
    if not path.is_file():
        entry = next((e for e in bundled_models() if e.get("name") == choice), None)
        if entry is None or "file" not in entry:
            raise ModelError(None, f"no model named {choice!r}")
        path = MODELS_DIR / str(entry["file"])
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelError(path, f"cannot be read ({error.strerror or error})") from None
    return check_model_bytes(data, path)


def _default_save_path(layer: Any) -> Path:
    from napari_medcl._writer import default_labels_path

    path = default_labels_path(layer)
    if path is None or not os.access(path.parent, os.W_OK):
        return Path.cwd() / f"{_base_name(layer.name).replace(' ', '_')}_labels.nii.gz"
    return path


def _raise_dock(widget: Container) -> None:
    from qtpy.QtWidgets import QDockWidget

    parent = widget.native.parent()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parent()
    if parent is not None:
        parent.show()
        parent.raise_()


def _camera(viewer: Any) -> Any:
    scene = getattr(viewer, "scene", None)  # napari >= 0.9 moved the camera to viewer.scene
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _base_name(name: str) -> str:
    for suffix in (" UAFR uncertainty", " entropy", " labels"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _notify_error(label: Label, message: str) -> None:
    label.value = message
    label.native.setStyleSheet(ERROR_STYLE)
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except Exception:  # no notification manager (e.g. outside a viewer): the label is enough
        logger.warning(message)
