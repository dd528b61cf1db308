"""napari dock widgets: segment an image with progress and cancel, then review where the model was unsure.

Thin on purpose: the array work is in ``layer_data`` (segment, layer data), ``review`` (ranking) and
``_writer`` (saving). This module gathers parameters, runs ``layer_data.segment_volume_iter`` in a napari thread
worker, turns its Progress events into progress bars, and puts the returned layers into the viewer (updating the
previous run's layers in place unless "keep previous" is ticked). Layers are only touched on the GUI thread.
"""

from __future__ import annotations

import html
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
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
)

from napari_medcl import layer_data, region_merge
from napari_medcl._learning_panel import LearningPanel
from napari_medcl._prompt_panel import PromptPanel
from napari_medcl._server_panel import ServerPanel
from napari_medcl._view import camera_of, show_box
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
    ("expected errors per slice (sum of the map)", "expected_errors"),
    ("expected errors per 3D region (map > threshold)", "regions"),
    ("mean of the map in the labels", "mean_in_foreground"),
    ("volume of the map > threshold", "volume_above"),
)
LIST_LENGTH = 50
OVERLAY_COLOR = "#00e5ff"
OUTLINE_KIND = "review_outline"
LAYER_ID_KEY = "medcl_layer_id"
# The maps the cursor line reads, by output kind, with their short names.
_MAP_NAMES = {
    "error_likelihood": "error likelihood",
    "top_class_error": "error likelihood (uncalibrated)",
    "uafr_uncertainty": "UAFR",
    "entropy": "entropy",
}
WARNING_STYLE = "color: #ffb000;"
ERROR_STYLE = "color: #ff5050;"
OOD_STYLE = "color: #ffffff; background-color: #a01818; padding: 4px; font-weight: bold;"
COMBO_MIN_CHARACTERS = 14  # a layer or model combo box is at least this wide, in characters


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
    combo = _compact(ComboBox(label=label, choices=_layer_choices(kind), **kwargs))
    combo._medcl_owner = owner
    combo.reset_choices()
    return combo


def _compact(combo: ComboBox) -> ComboBox:
    """A combo box of names (layers, models) that long names do not widen: a box as wide as its longest
    choice widens the whole dock past the screen's edge, where the scroll area clips every line of text. A long
    name is elided in its middle (its start and its kind, e.g. "... error likelihood", stay readable); the
    hover text gives it whole."""
    from qtpy.QtCore import QEvent, QObject, Qt
    from qtpy.QtWidgets import QComboBox

    class WholeNameTip(QObject):
        # set when the tip is asked for: choices are refreshed without signals when layers come and go
        def eventFilter(self, watched: Any, event: Any) -> bool:
            if event.type() == QEvent.Type.ToolTip:
                watched.setToolTip(watched.currentText())
            return False

    native = combo.native
    native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    native.setMinimumContentsLength(COMBO_MIN_CHARACTERS)
    native.view().setTextElideMode(Qt.TextElideMode.ElideMiddle)
    native.installEventFilter(WholeNameTip(native))
    return combo


def _wrap(label: Label) -> Label:
    """A label whose text wraps at the dock's width. Qt sizes a wrapped label's minimum width by its text (a
    long verdict or model summary asks for hundreds of pixels), which would widen the dock past the screen's
    edge and clip every line, so the label takes the width it is given and grows in height instead."""
    from qtpy.QtWidgets import QSizePolicy

    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
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
        # called with the saved labels layer and file; returns the prompts file it wrote beside it, or None
        self.after_save: Callable[[Any, Path], Path | None] | None = None
        self._entries: list[str] = []
        self._labels_combo = _combo("Labels", "labels", self)
        self._uncertainty = _combo("Uncertainty", "image", self)
        self._axis = ComboBox(label="Slice axis", choices=[("z", 0), ("y", 1), ("x", 2)], value=0)
        self._mode = _compact(ComboBox(label="Rank by", choices=RANK_MODES, value="expected_errors"))
        self._threshold = FloatSlider(label="Threshold", min=0.0, max=1.0, step=0.01, value=0.5)
        self._show_overlay = CheckBox(text="Outline uncertainty above threshold", value=True)
        self._rank_button = PushButton(text="Rank slices")
        self._slice_list = _RankedList()
        self._summary = _wrap(Label(value=""))
        self._save_button = PushButton(text="Save labels...")
        self._report = _wrap(Label(value=""))
        self._report_button = PushButton(text="Export case report (CSV)...")
        super().__init__()
        self._body = _scrolling_body(
            self,
            [
                Label(value="<b>Uncertainty review</b>"),
                self._labels_combo,
                self._uncertainty,
                self._axis,
                self._mode,
                self._threshold,
                self._show_overlay,
                self._rank_button,
                self._summary,
                self._save_button,
                Label(value="<b>Case report</b>"),
                self._report,
                self._report_button,
            ],
        )
        self.overlay: Any = None
        _insert_after(self._body, self._rank_button, self._slice_list.native)
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
        self._report_button.changed.connect(self._on_export_report)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._on_layers_changed)
        viewer.dims.events.ndisplay.connect(self.update_overlay)

    # -- public API (used by SegmentWidget, tests and the screenshot script)

    def set_layers(self, labels_layer: Any, uncertainty_layer: Any) -> None:
        self.reset_choices()
        self._labels_combo.value = labels_layer
        self._uncertainty.value = uncertainty_layer
        self.refresh()

    def refresh(self, *_: Any) -> None:
        """Rank the slices (or regions) again and refill the list (top ``LIST_LENGTH``)."""
        from napari_medcl.review import rank_regions, rank_slices

        pair = self._arrays()
        self.scores, self._entries = [], []
        if pair is None:
            self._slice_list.show([])
            return
        labels, uncertainty, spacing = pair
        regions = self._mode.value == "regions"
        self._axis.visible = uncertainty.ndim == 3
        if regions:
            self.scores = rank_regions(
                uncertainty, labels, threshold=self._threshold.value, spacing=spacing, limit=LIST_LENGTH
            )
        else:
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
        self._entries = [
            self._describe(i, s, uncertainty.ndim, unit, self._mode.value) for i, s in enumerate(self.scores)
        ]
        self._slice_list.show(self._entries)
        voxel = float(np.prod(spacing))
        above = float((uncertainty > self._threshold.value).sum()) * voxel
        expected = float(uncertainty.sum(dtype=np.float64)) * voxel
        what = "region(s)" if regions else "slice(s)"
        self._summary.native.setStyleSheet("")
        self._summary.value = (
            f"{len(self.scores)} {what} listed. Sum of the map: {expected:.0f} {unit} (the expected wrong "
            f"volume when the map is an error likelihood); above {self._threshold.value:.2f}: {above:.0f} "
            f"{unit}. Click an entry to go there."
        )
        self.update_overlay()
        self.update_report()

    def case_report(self) -> Any:
        """The CaseReport of the labels under review as they are now (the user's edits included), with the
        error map of the same image: the calibrated error likelihood when the run produced it, else the
        model's top-class error (uncalibrated), else the entropy (named as such, without expected wrong
        volume). Raises UsageError without a labels layer."""
        from napari_medcl.case_report import ENTROPY_NAME, ERROR_MAP_NAMES, case_report

        labels = self._labels_combo.value
        if labels is None:
            raise UsageError("no Labels layer selected for the report")
        owner, _ = layer_data.derived_from(labels)
        maps = layer_data.derived_layers(self.viewer.layers, owner) if owner is not None else {}
        data = np.asarray(labels.data)
        error, name, is_probability = None, None, True
        for kind, map_name, probability in (
            *((k, ERROR_MAP_NAMES[k], True) for k in layer_data.ERROR_MAP_KINDS),
            ("entropy", ENTROPY_NAME, False),
        ):
            layer = maps.get(kind)
            if layer is not None and np.shape(layer.data) == data.shape:
                error, name, is_probability = np.asarray(layer.data), map_name, probability
                break
        provenance = labels.metadata.get(layer_data.PREDICTION_KEY) or None
        classes = layer_data.class_names(labels) or {0: "background"}
        return case_report(
            data,
            tuple(float(v) for v in labels.scale[-data.ndim :]),
            classes,
            error_likelihood=error,
            error_likelihood_name=name or ENTROPY_NAME,
            error_is_probability=is_probability,
            provenance=provenance,
            verdict=(provenance or {}).get("verdict"),
            case=_base_name(labels.name),
        )

    def update_report(self, *_: Any) -> None:
        try:
            self._report.value = self.case_report().to_text().replace("\n", "<br>")
        except MedclError:
            self._report.value = ""
        except ValueError as error:  # labels and maps that do not fit together: say so, no report
            self._report.value = f"No report: {error}"

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
        entry = self.scores[row]
        if hasattr(entry, "box"):  # a 3D region: its centre, on the slice through it, zoomed to its box
            show_box(self.viewer, layer, entry, axis)
            return
        threshold = self._threshold.value if self._mode.value == "volume_above" else None
        center = region_center(uncertainty, labels, axis, entry.index, threshold=threshold)
        dims = self.viewer.dims
        offset = dims.ndim - layer.ndim
        world = list(dims.point)
        world[offset:] = list(layer.data_to_world(center))
        if uncertainty.ndim == 3:
            world_axis = offset + axis
            if dims.ndisplay == 2 and world_axis in dims.displayed:
                dims.order = (world_axis, *(a for a in dims.order if a != world_axis))
            dims.set_point(world_axis, world[world_axis])
        camera_of(self.viewer).center = tuple(world[a] for a in dims.displayed)

    def update_overlay(self, *_: Any) -> None:
        """Show (or update) the "<image> uncertain > t" outline layer for the current threshold.

        The outline belongs to the image the uncertainty map was made from (found by its id, never by name)
        and always takes that map's geometry; in the 3D view it is hidden, where an outline would fill space.
        """
        from napari_medcl.review import uncertain_mask

        layer = self._uncertainty.value
        owner = self._overlay_owner(layer)
        self.overlay = None
        for candidate in self.viewer.layers:
            if layer_data.derived_from(candidate) == (owner, OUTLINE_KIND) and owner is not None:
                self.overlay = candidate
        shown = layer is not None and self._show_overlay.value and self.viewer.dims.ndisplay == 2
        for candidate in self.viewer.layers:  # only the outline of the map under review is shown
            if layer_data.derived_from(candidate)[1] == OUTLINE_KIND and candidate != self.overlay:
                candidate.visible = False
        if not shown:
            if self.overlay is not None:
                self.overlay.visible = False
            return
        threshold = self._threshold.value
        mask = uncertain_mask(np.asarray(layer.data), threshold)
        kind = layer_data.derived_from(layer)[1]
        what = {
            "error_likelihood": "error likelihood",
            "top_class_error": "error likelihood",
            "uafr_uncertainty": "UAFR",
            "entropy": "entropy",
        }
        name = f"{_base_name(layer.name)} {what.get(kind, 'uncertain')} > {threshold:.2f}"
        geometry = {
            "scale": layer.scale,
            "translate": layer.translate,
            "units": layer.units,
            "axis_labels": layer.axis_labels,
            "metadata": {
                **{k: v for k, v in layer.metadata.items() if k != layer_data.DERIVED_KEY},
                layer_data.DERIVED_KEY: {"image_id": owner, "output": OUTLINE_KIND},
            },
        }
        if self.overlay is not None and self.overlay.ndim == mask.ndim:
            self.overlay.data = mask
            for key, value in geometry.items():
                setattr(self.overlay, key, value)
            self.overlay.name = name
            self.overlay.visible = True
            return
        from napari.utils.colormaps import DirectLabelColormap

        self.overlay = self.viewer.add_labels(
            mask,
            name=name,
            **geometry,
            colormap=DirectLabelColormap(
                color_dict={None: "transparent", 0: "transparent", 1: OVERLAY_COLOR}
            ),
            opacity=0.9,
        )
        self.overlay.contour = 1
        self.overlay.editable = False

    def reset_choices(self, *args: Any) -> None:
        _reset_keeping_layers(self, self._body.reset_choices, (self._labels_combo, self._uncertainty), *args)

    def mark_stale(self, message: str) -> None:
        """The results under review are being replaced: empty the list and say so until ``refresh``."""
        self.scores, self._entries = [], []
        self._slice_list.show([])
        self._summary.value = message
        self._summary.native.setStyleSheet(WARNING_STYLE)

    def save_labels(self, path: str | Path) -> Path:
        """Write the selected Labels layer with its source geometry (atomic). Raises MedclError."""
        from napari_medcl._writer import write_layer_data

        layer = self._labels_combo.value
        if layer is None:
            raise UsageError("no Labels layer selected to save")
        written = write_layer_data(layer, path)
        self._summary.value = f"Saved {layer.name!r} to {written}"
        if self.after_save is not None:
            prompts = self.after_save(layer, written)
            if prompts is not None:
                self._summary.value += f" and its prompts to {prompts.name}"
        return written

    # -- internals

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
    def _describe(rank: int, score: Any, ndim: int, unit: str, mode: str) -> str:
        if hasattr(score, "box"):
            where = ", ".join(
                f"{name} {s.start}-{s.stop - 1}" for name, s in zip(("z", "y", "x")[-ndim:], score.box)
            )
            return f"{rank + 1}. {where}: {score.expected_wrong_mm:.0f} {unit} expected wrong"
        where = f"slice {score.index}" if ndim == 3 else "image"
        area = unit.replace("³", "²")
        if mode == "expected_errors":
            return (
                f"{rank + 1}. {where}: {score.expected_wrong_mm:.0f} {unit} expected wrong, "
                f"{score.labelled_mm:.0f} {area} labelled"
            )
        return (
            f"{rank + 1}. {where}: {score.mean_in_foreground:.2f} mean, {score.uncertain_mm:.0f} {unit} > t"
        )

    def _on_threshold(self, *_: Any) -> None:
        self.refresh()  # the summary (and, by region or volume, the ranking) follows the threshold

    def _overlay_owner(self, layer: Any) -> str | None:
        """The id of the image an uncertainty layer was made from (a map from elsewhere is its own image)."""
        if layer is None:
            return None
        owner, _ = layer_data.derived_from(layer)
        return owner if owner is not None else layer_data.image_id(layer)

    def _on_layers_changed(self, event: Any) -> None:
        if self.overlay is not None and self.overlay not in self.viewer.layers:
            self.overlay = None
        self.reset_choices()

    def _on_export_report(self, *_: Any) -> None:
        from qtpy.QtWidgets import QFileDialog

        layer = self._labels_combo.value
        if layer is None:
            _notify_error(self._summary, "No Labels layer to report on.")
            return
        default = _default_save_path(layer)
        default = default.with_name(default.name.split(".")[0].removesuffix("_labels") + "_report.csv")
        path, _ = QFileDialog.getSaveFileName(
            self.native, "Export the case report", str(default), "CSV (*.csv)"
        )
        if not path:
            return
        try:
            written = self.case_report().to_csv(path)
            self._summary.native.setStyleSheet("")
            self._summary.value = f"Report saved to {written}"
        except MedclError as error:
            _notify_error(self._summary, str(error))
        except Exception as error:
            _notify_error(self._summary, internal_error_message(PLUGIN, error))

    def _on_save(self, *_: Any) -> None:
        from qtpy.QtWidgets import QFileDialog

        from napari_medcl.io.formats import SCAN_FORMATS

        layer = self._labels_combo.value
        if layer is None:
            _notify_error(self._summary, "No Labels layer to save.")
            return
        from napari_medcl._writer import DICOM_SEG_FILTER, can_save_dicom_seg

        default = _default_save_path(layer)
        filters = [
            f"{fmt.title} ({' '.join(f'*{e}' for e in fmt.written_extensions)})" for fmt in SCAN_FORMATS
        ]
        if can_save_dicom_seg(layer):  # a scan from a DICOM series: its labels can go back as a DICOM SEG
            filters.insert(0, DICOM_SEG_FILTER)
            default = default.with_name(default.name.split(".")[0] + "_seg.dcm")
        save_filter = ";;".join(filters)
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
    image: Any  # the Image layer (its id owns the results)
    image_key: str
    volume: Any
    model: Any
    model_key: tuple[str, str]
    name: str
    metadata: dict[str, Any]
    display: dict[str, Any]
    roi: Any
    box: tuple[slice, ...]  # where the run writes, on the image's grid
    keep_edits: bool


KEEP, OVERWRITE, CANCEL = "keep", "overwrite", "cancel"


class SegmentWidget(Container):
    """Segment the chosen image with an ONNX model; labels, UAFR uncertainty and entropy appear as layers.

    A run writes into the layers of that image's earlier run (found by the image's id) and only inside its
    region; voxels the user edited there are kept unless the user chooses to overwrite them, and the labels
    change is one undoable step (Ctrl+Z). ``confirm_edits(count, where)`` asks; tests and scripts replace it.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        self.viewer = viewer
        self._extra_models: list[str] = []
        self._previous_model: str | None = None
        self._loaded: tuple[tuple[str, str], Any] | None = None
        self._worker: Any = None
        self._cancel_event: threading.Event | None = None
        self._job: _Job | None = None
        self._stale: list[tuple[Any, str, bool]] = []
        # labels layer's id -> the model's last output in it, to tell the user's edits from the model's writes
        # (keyed by an id in the layer's metadata: napari hands plugins proxies, a new one on each access)
        self._model_written: dict[str, np.ndarray] = {}
        self.confirm_edits = self._ask_about_edits
        self.last_layers: list[Any] = []
        self.last_provenance: dict[str, Any] = {}
        self._review: ReviewWidget | None = None
        self._manifest_error: str | None = None
        self._image = _combo("Image", "image", self)
        self._model = _compact(ComboBox(label="Model", choices=self._model_choices))
        self._model_info = _wrap(Label(value=""))
        self._notice = _wrap(Label(value=""))
        devices, self._cuda_reason = _devices()
        self._device = ComboBox(label="Device", choices=devices, value="auto")
        self._backend = ComboBox(label="Backend", choices=_backends(), value="auto")
        self._backend.tooltip = (
            "auto: OpenVINO on the CPU when installed (bf16 where the CPU has it), else ONNX Runtime"
        )
        self._device.tooltip = (
            "CUDA: available" if self._cuda_reason is None else f"CUDA: {self._cuda_reason}"
        )
        # This computer or a medcl-serve server: the whole choice lives in _server_panel.
        self._where = ServerPanel(on_change=self._on_where_changed)
        self._overlap = FloatSpinBox(label="Overlap", min=0.0, max=0.9, step=0.05, value=0.5)
        self._tta = CheckBox(text="Test-time augmentation (mirroring, slower)", value=False)
        self._region = ComboBox(label="Region", choices=[REGION_WHOLE, REGION_SLICE, REGION_RECT])
        self._shapes = _combo("Rectangle", "shapes", self, visible=False)
        self._region_info = _wrap(Label(value=""))
        self._maps = CheckBox(text="Add each UAFR map as a layer", value=False)
        self._keep = CheckBox(text="Keep previous results (new layers)", value=False)
        self._run = PushButton(text="Run")
        self._progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self._eta = Label(value="")
        self._status = _wrap(Label(value=""))
        self._device_note = _wrap(Label(value=""))
        self._verdict = _wrap(Label(value=""))
        self._cursor = _wrap(Label(value=""))
        self._review_button = PushButton(text="Open uncertainty review")
        self.prompts = PromptPanel(viewer)
        self.learning = LearningPanel(viewer, self)
        super().__init__()
        self._body = _scrolling_body(
            self,
            [
                self._verdict,  # first: the banner stays in view whatever the dock's height
                self._image,
                self._model,
                self._model_info,
                self._notice,
                self._where,
                self._device,
                self._backend,
                self._overlap,
                self._tta,
                self._region,
                self._shapes,
                self._region_info,
                self._maps,
                self._keep,
                self._run,
                self._progress,
                self._eta,
                self._status,
                self._device_note,
                self._cursor,
                self._review_button,
                self.prompts,
                self.learning,
            ],
        )
        self._model.changed.connect(self._on_model_changed)
        self._model.native.activated.connect(self._on_model_activated)
        self._region.changed.connect(self._on_region_changed)
        self._shapes.changed.connect(self._on_region_changed)
        self._image.changed.connect(self._on_region_changed)
        self._image.changed.connect(self._show_verdict)
        viewer.dims.events.current_step.connect(self._on_region_changed)
        self._run.changed.connect(self._on_run_clicked)
        self._review_button.changed.connect(lambda: self.show_review())
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._on_layers_changed)
        viewer.cursor.events.position.connect(self._on_cursor)
        viewer.dims.events.ndisplay.connect(self._on_ndisplay)
        self._hidden_in_3d: list[Any] = []
        default = _default_model_choice(self._model.choices)
        if default is not None:
            self._model.value = default
        self._on_model_changed(self._model.value)
        self._on_where_changed()

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

    def offer_model_file(self, path: str | Path) -> None:
        """Add an .onnx file to the model picker, leaving the selection as it is."""
        path = str(Path(path).expanduser().resolve())
        if path not in self._extra_models:
            self._extra_models.append(path)
            chosen = self._model.value
            self._model.reset_choices()
            if chosen is not None and chosen in self._model.choices:
                self._model.value = chosen

    def current_image(self) -> Any:
        return self._image.value

    def select_image(self, layer: Any) -> None:
        self._image.value = layer

    def current_model(self) -> str:
        choice = self._model.value
        if not choice or choice == OPEN_FILE:
            raise UsageError("Choose a model: a bundled one, or 'Open file...' for an .onnx file.")
        return str(choice)

    def model_labels_of(self, labels: Any) -> np.ndarray | None:
        """What the model last wrote into the labels layer ``labels`` (None: no run of this widget made it)."""
        written = self._model_written.get(_layer_id(labels))
        return None if written is None or written.shape != np.shape(labels.data) else written

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
        if job is None:  # the user cancelled at the question about their edits
            self._set_status("Not run: your edits are untouched.")
            return None
        self._cancel_event = threading.Event()
        kwargs = {
            "name": job.name,
            "device": self._device.value,
            "backend": self._backend.value,
            "overlap": self._overlap.value,
            "tta": self._tta.value,
            "roi": job.roi,
            "cancel": self._cancel_event,
            "uncertainty_maps": self._maps.value,
            "metadata": job.metadata,
            "display": job.display,
            "keep_prediction": True,  # its probabilities are what prompts refine
        }
        self._job = job
        self._set_running(True)
        self._mark_stale(job)
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
            self._review.after_save = self.prompts.save_beside
            if window is not None:
                window.add_dock_widget(self._review, name="Uncertainty review", area="right", tabify=False)
                _share_height((self, 0.45), (self._review, 0.55))
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

    def reset_choices(self, *args: Any) -> None:
        _reset_keeping_layers(self, self._body.reset_choices, (self._image, self._shapes), *args)

    def results_of(self, image: Any) -> dict[str, Any]:
        """The layers made from ``image`` (an Image layer), by output kind: "labels", "uafr_uncertainty"..."""
        return layer_data.derived_layers(self.viewer.layers, layer_data.image_id(image))

    # -- building the job (GUI thread)

    def _make_job(self) -> _Job | None:
        image = self._image.value
        if image is None:
            raise UsageError("No image layer: open a scan first (File > Open, or File > Open Sample).")
        choice = self._model.value
        if not choice or choice == OPEN_FILE:
            raise UsageError("Choose a model: a bundled one, or 'Open file...' for an .onnx file.")
        volume = layer_data.volume_from_layer(image)
        if self._where.on_server:  # the server's model; it keeps each image's session between runs
            key, model = (choice, self._where.run_key()), self._where.model_for(choice)
        else:
            key = (choice, f"{self._device.value}/{self._backend.value}")
            model = self._loaded[1] if self._loaded is not None and self._loaded[0] == key else choice
        roi = self._roi(image, volume)
        box = region_merge.region_box(roi, volume)
        image_key = layer_data.image_id(image)  # before the metadata is copied onto the outputs
        keep_edits = True
        labels = None if self._keep.value else self.results_of(image).get("labels")
        if labels is not None:
            written = self._model_written.get(_layer_id(labels))
            if written is not None and written.shape == np.shape(labels.data):
                edits = region_merge.count_edits(np.asarray(labels.data), written, box)
                if edits:
                    where = region_merge.describe_box(box, volume.spatial_shape)
                    answer = self.confirm_edits(edits, where)
                    if answer == CANCEL:
                        return None
                    keep_edits = answer != OVERWRITE
        return _Job(
            image=image,
            image_key=image_key,
            volume=volume,
            model=model,
            model_key=key,
            name=image.name,
            metadata=dict(image.metadata),
            display=layer_data.layer_display(image, volume.spatial_dims),
            roi=roi,
            box=box,
            keep_edits=keep_edits,
        )

    def _ask_about_edits(self, count: int, where: str) -> str:
        from qtpy.QtWidgets import QMessageBox

        box = QMessageBox(self.native)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle("Your edits in this region")
        box.setText(
            f"You changed {count:,} voxel(s) of the labels in the region this run writes ({where}) since the "
            "model last wrote them."
        )
        box.setInformativeText("Keep your edits and let the model fill in only the rest, or overwrite them?")
        keep = box.addButton("Keep my edits", QMessageBox.ButtonRole.AcceptRole)
        overwrite = box.addButton("Overwrite them", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)
        box.exec()
        clicked = box.clickedButton()
        return KEEP if clicked is keep else OVERWRITE if clicked is overwrite else CANCEL

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

    def _on_region_changed(self, *_: Any) -> None:
        """State the region the next run writes, and draw a chosen rectangle without a fill."""
        self._shapes.visible = self._region.value == REGION_RECT
        shapes = self._shapes.value if self._region.value == REGION_RECT else None
        if shapes is not None:
            _outline_only(shapes)
        image = self._image.value
        if image is None or self._region.value == REGION_WHOLE:
            self._region_info.value = ""
            return
        try:
            volume = layer_data.volume_from_layer(image)
            box = region_merge.region_box(self._roi(image, volume), volume)
        except MedclError as error:
            self._region_info.value = f"Region: {error}"
            return
        except Exception:  # a half-drawn shape or a view being rebuilt: say nothing rather than fail
            self._region_info.value = ""
            return
        text = "Writes " + region_merge.describe_box(box, volume.spatial_shape)
        if (
            self._region.value == REGION_RECT
            and volume.spatial_dims == 3
            and box[0] == slice(0, volume.spatial_shape[0])
        ):
            text += " (the rectangle lies in one slice, so it spans every slice)"
        self._region_info.value = text

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
        self._loaded = (self._job.model_key, result.model)
        if self._cancel_event is not None and self._cancel_event.is_set():
            self._on_aborted()  # Cancel was pressed after the last window: still add nothing
            return
        job = self._job
        self._unmark_stale()
        self.last_provenance = result.provenance
        self.last_layers, kept = self._show_layers(result.layers, job)
        provider = result.provenance.get("execution_provider", "?")
        where = region_merge.describe_box(job.box, job.volume.spatial_shape)
        where = "whole image" if job.roi is None else f"region {where}"
        note = f" Kept {kept:,} voxel(s) you had edited." if kept else ""
        self._set_status(f"Done in {result.seconds:.1f} s on {provider} ({where}).{note}")
        self._device_note.value = ""
        on_cpu = provider == "CPUExecutionProvider" or str(provider).startswith("OpenVINO CPU")
        if on_cpu and self._device.value != "cpu" and not self._where.on_server:
            reason = self._cuda_reason or "ONNX Runtime did not create the CUDA provider"
            self._device_note.value = f"Warning: ran on the CPU, not a GPU ({reason})."
            self._device_note.native.setStyleSheet(WARNING_STYLE)
        self._show_verdict()
        by_kind = {layer_data.derived_from(layer)[1]: layer for layer in self.last_layers}
        preferred = (*layer_data.ERROR_MAP_KINDS, "uafr_uncertainty", "entropy")
        uncertainty = next((by_kind[k] for k in preferred if by_kind.get(k) is not None), None)
        if by_kind.get("labels") is not None and uncertainty is not None:
            self.show_review().set_layers(by_kind["labels"], uncertainty)
        if by_kind.get("labels") is not None and result.prediction is not None:
            self.prompts.take_run(job.image, by_kind["labels"], job.volume, result.model, result.prediction)

    def _on_errored(self, error: BaseException) -> None:
        self._unmark_stale()
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
        self._unmark_stale()
        self._progress.max, self._progress.value = 1, 0
        self._set_status("Cancelled; no layer was added or changed.")

    def _on_finished(self) -> None:
        self._unmark_stale()
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        if not running:
            self._worker = None
            self._cancel_event = None
        self._run.text = "Cancel" if running else "Run"
        self._run.enabled = True
        for widget in (
            self._image,
            self._model,
            self._device,
            self._backend,
            self._overlap,
            self._tta,
            self._region,
        ):
            widget.enabled = not running
        self._where.set_running(running)
        if running:
            self._progress.max, self._progress.value = 1, 0
            self._eta.value = "starting..."
            self._set_status("Running...")
        else:
            self._eta.value = ""

    def _mark_stale(self, job: _Job) -> None:
        """The results this run replaces say so while it runs, and their labels cannot be edited meanwhile
        (an edit made now would race the model's write)."""
        if self._keep.value:
            return
        for layer in self.results_of(job.image).values():
            self._stale.append((layer, layer.name, bool(layer.editable)))
            layer.name = f"{layer.name} (being replaced)"
            if layer_data.layer_kind(layer) == "labels":
                layer.editable = False
        if self._review is not None and self._stale:
            self._review.mark_stale("These results are being recomputed; the list returns when the run ends.")

    def _unmark_stale(self) -> None:
        stale, self._stale = self._stale, []
        for layer, name, editable in stale:
            if layer in self.viewer.layers:
                layer.name = name
                layer.editable = editable
        if stale and self._review is not None:
            self._review.refresh()

    def _show_layers(self, layer_tuples: list[Any], job: _Job) -> tuple[list[Any], int]:
        """Add the result layers, or write them into the image's earlier results inside the run's region.

        Returns the layers and how many edited voxels were kept.
        """
        from napari.layers import Layer

        existing_by_kind = {} if self._keep.value else self.results_of(job.image)
        produced = {kwargs["metadata"][layer_data.DERIVED_KEY]["output"] for _, kwargs, _ in layer_tuples}
        # Which error map is shown changes when the calibrated one comes or goes (a model with or without an
        # error model): the maps then take this run's visibility instead of keeping the earlier choice.
        calibrated = "error_likelihood"
        swapped = (calibrated in produced) != (calibrated in existing_by_kind)
        stale = existing_by_kind.pop(calibrated, None) if calibrated not in produced else None
        if stale is not None:  # an earlier model's calibrated map no longer describes these labels
            self.viewer.layers.remove(stale)
        shown, kept = [], 0
        for data, kwargs, layer_type in layer_tuples:
            kind = kwargs["metadata"][layer_data.DERIVED_KEY]["output"]
            existing = existing_by_kind.get(kind)
            if (
                existing is not None
                and layer_data.layer_kind(existing) == layer_type
                and np.shape(existing.data) == np.shape(data)
            ):
                if swapped and layer_type == "image" and kind in layer_data.MAP_LAYER_NAMES:
                    existing.visible = bool(kwargs.get("visible", True))
                if layer_type == "labels":
                    kept += self._write_labels(existing, np.asarray(data), job)
                else:
                    existing.data = region_merge.merged_map(np.asarray(existing.data), data, job.box)
                for key, value in kwargs.items():
                    # the user's display choices (visibility, opacity, blending) survive a re-run; the
                    # geometry always comes from the image
                    if key not in ("name", "visible", "opacity", "blending", "rgb") and not (
                        key == "colormap" and layer_type == "image"
                    ):
                        if key == "metadata":  # the layer keeps its own id
                            value = {**value, LAYER_ID_KEY: _layer_id(existing)}
                        setattr(existing, key, value)
                shown.append(existing)
            else:
                layer = self.viewer.add_layer(Layer.create(data, kwargs, layer_type))
                if layer_type == "labels":
                    self._model_written[_layer_id(layer)] = np.array(data, copy=True)
                shown.append(layer)
        return shown, kept

    def _write_labels(self, layer: Any, new: np.ndarray, job: _Job) -> int:
        """Write the run's labels into ``layer`` inside the job's region as one undoable step."""
        written = self._model_written.get(_layer_id(layer))
        current = np.asarray(layer.data)
        if written is not None and written.shape != current.shape:
            written = None
        change = region_merge.plan_labels_write(current, written, new, job.box, keep_edits=job.keep_edits)
        if change.changed:
            with layer.block_history():
                layer.data_setitem(change.indices, change.values.astype(current.dtype, copy=False))
        self._model_written[_layer_id(layer)] = region_merge.record_model_write(written, new, job.box)
        return change.kept_edits

    def _on_layers_changed(self, _event: Any = None) -> None:
        present = {layer.metadata.get(LAYER_ID_KEY) for layer in self.viewer.layers}
        self._model_written = {k: v for k, v in self._model_written.items() if k in present}
        self.reset_choices()
        self._on_region_changed()

    def _show_verdict(self, *_: Any) -> None:
        """A banner with the training-data check of the chosen image's result: it stays while that result
        is shown, in a warning style unless the scan is like the training data."""
        image = self._image.value
        labels = self.results_of(image).get("labels") if image is not None else None
        record = (labels.metadata.get(layer_data.PREDICTION_KEY) or {}) if labels is not None else {}
        verdict = record.get("verdict")
        if not isinstance(verdict, dict):
            self._verdict.value = ""
            self._verdict.native.setStyleSheet("")
            return
        level = str(verdict.get("level", "unknown"))
        reasons = "; ".join(str(r) for r in verdict.get("reasons") or ())
        text, style = {
            "ok": ("Scan check: ok, like the model's training data.", ""),
            "caution": (f"Scan check: CAUTION. {reasons}. Review the result closely.", WARNING_STYLE),
            "out-of-distribution": (
                f"Scan check: OUT OF DISTRIBUTION. {reasons}. This result is not trustworthy as it is: "
                "check every part of it.",
                OOD_STYLE,
            ),
        }.get(
            level, (f"Scan check: unknown. {reasons or 'this model carries no training-data profile'}.", "")
        )
        self._verdict.value = text
        self._verdict.native.setStyleSheet(style)

    def _on_ndisplay(self, *_: Any) -> None:
        """In the 3D view the result maps are hidden (rendered as volumes they fill the view and hide the
        labels' surfaces); back in 2D the ones that were shown are shown again."""
        if self.viewer.dims.ndisplay == 3:
            self._hidden_in_3d = []
            for layer in self.viewer.layers:
                kind = layer_data.derived_from(layer)[1]
                if kind is not None and kind != "labels" and layer.visible:
                    layer.visible = False
                    self._hidden_in_3d.append(layer)
            if self._hidden_in_3d:
                self._cursor.value = "3D view: the uncertainty maps are hidden; they return in the 2D view."
        else:
            for layer in self._hidden_in_3d:
                if layer in self.viewer.layers:
                    layer.visible = True
            self._hidden_in_3d = []
            self._cursor.value = ""

    def _on_cursor(self, *_: Any) -> None:
        """One line with the class under the cursor and every map's value there, for the image of the
        selected result (or of the chosen image)."""
        image = self._image.value
        results = self.results_of(image) if image is not None else {}
        labels = results.get("labels")
        if labels is None or not labels.visible and not any(m.visible for m in results.values()):
            self._cursor.value = ""
            return
        maps = [(name, results[kind]) for kind, name in _MAP_NAMES.items() if kind in results]
        try:
            text = layer_data.cursor_readout(self.viewer.cursor.position, labels, maps)
        except Exception:  # a layer being replaced mid-move: the next move shows the line again
            return
        self._cursor.value = "" if text is None else f"Under the cursor: {text}"
        if text is not None:
            self.viewer.status = f"{image.name}: {text}"

    # -- model picker

    def _model_choices(self, _widget: Any = None) -> list[str]:
        from napari_medcl.onnx_session import bundled_models

        try:
            bundled = [str(entry["name"]) for entry in bundled_models()]
            self._manifest_error = None
        except MedclError as error:  # shown by _describe_model; the picker still offers "Open file..."
            self._manifest_error = str(error)
            bundled = []
        where = getattr(self, "_where", None)  # None while the model picker is being built
        served = [name for name in where.served if name not in bundled] if where and where.on_server else []
        return [*bundled, *served, *self._extra_models, OPEN_FILE]

    def _on_where_changed(self) -> None:
        """The device and backend are the server's when running there; the picker adds its models."""
        for widget in (self._device, self._backend):
            widget.visible = not self._where.on_server
        self._model.reset_choices()

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
            served = self._where.served if self._where.on_server else {}
            spec = served[choice] if choice in served else _read_spec(choice)
        except MedclError as error:
            self._model_info.value = ""
            self._set_status(str(error), ERROR_STYLE)
            return
        self._model_info.value = "<br>".join(
            html.escape(line) for line in (spec.summary(), *spec.error_map_summary().splitlines())
        )
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


def _backends() -> list[str]:
    """Backends to offer: auto and ONNX Runtime always, OpenVINO when it is installed."""
    from napari_medcl.onnx_session import available_backends

    try:
        return available_backends()
    except Exception:  # a broken install must not break the widget: ONNX Runtime is always there
        return ["auto", "onnxruntime"]


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
    """Beside the scan the labels came from; in the home folder for the bundled sample, a layer without a
    file, or a folder that cannot be written."""
    from napari_medcl._sample_data import SAMPLE_FILE
    from napari_medcl._writer import default_labels_path

    path = default_labels_path(layer)
    bundled = path is not None and path.parent.resolve() == SAMPLE_FILE.parent.resolve()
    if path is None or bundled or not os.access(path.parent, os.W_OK):
        return Path.home() / f"{_base_name(layer.name).replace(' ', '_')}_labels.nii.gz"
    return path


class _RankedList:
    """The ranked slices, a plain Qt list refilled whole on each ranking. (A magicgui Select reconciles its
    old and new choices item by item: the list came out in a mixed order, and its current row moved, and with
    it the viewer, while it did.)"""

    def __init__(self) -> None:
        from qtpy.QtWidgets import QAbstractItemView, QListWidget

        self.native = QListWidget()
        self.native.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.native.setMinimumHeight(140)

    def show(self, entries: list[str]) -> None:
        self.native.blockSignals(True)  # refilling is not a click: the viewer stays where it is
        try:
            self.native.clear()
            self.native.addItems(entries)
        finally:
            self.native.blockSignals(False)


def _insert_after(body: Container, widget: Any, native: Any) -> None:
    """Put a plain Qt widget into a magicgui container's layout, right after ``widget``'s row."""
    layout = body.native.layout()
    row = widget.native
    while row is not None and layout.indexOf(row) < 0:
        row = row.parentWidget()
    layout.insertWidget(layout.indexOf(row) + 1 if row is not None else layout.count(), native)


def _scrolling_body(outer: Container, widgets: list[Any]) -> Container:
    """Put ``widgets`` in a vertically scrolling area inside ``outer``, so that a dock stays usable on a small
    screen (napari docks a magicgui widget's inner widget, so magicgui's own ``scrollable`` has no effect)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea

    class BodyWideScrollArea(QScrollArea):
        """Never narrower than its body's rows and a vertical scroll bar, whatever the rows hold now: a
        narrower area would clip the rows' right-hand side (there is no horizontal scroll bar)."""

        def minimumSizeHint(self) -> Any:
            hint = super().minimumSizeHint()
            inner = self.widget()
            if inner is not None:
                scrollbar = self.verticalScrollBar().sizeHint().width()
                hint.setWidth(max(hint.width(), inner.minimumSizeHint().width() + scrollbar + 2))
            return hint

    body = Container(widgets=widgets)
    scroll = BodyWideScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setWidget(body.native)
    layout = outer.native.layout()
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(scroll)
    return body


def _reset_keeping_layers(owner: Any, reset: Any, combos: tuple[ComboBox, ...], *args: Any) -> None:
    """Refresh a widget's choices without letting a renamed layer fall out of its combo boxes (magicgui
    picks the first choice when it cannot find the old one among the renamed choices)."""
    chosen = [(combo, combo.value) for combo in combos]
    reset(*args)
    layers = owner.viewer.layers
    for combo, value in chosen:
        if value is not None and value in layers and combo.value != value:
            combo.value = value


def _layer_id(layer: Any) -> str:
    """A layer's own stable id, kept in its metadata (given on first use)."""
    return layer_data.stable_id(layer, LAYER_ID_KEY)


def _default_model_choice(choices: Any) -> str | None:
    """The manifest's default model when it is among the picker's choices."""
    from napari_medcl.onnx_session import default_model_name

    try:
        name = default_model_name()
    except MedclError:
        return None
    values = [c[1] if isinstance(c, tuple) else c for c in choices]
    return name if name in values else None


def _outline_only(shapes: Any) -> None:
    """Draw a region's shapes as outlines, so the result inside stays visible."""
    if len(shapes.data):
        shapes.face_color = "transparent"
        shapes.edge_color = "#ffd400"
    shapes.current_face_color = "transparent"
    shapes.current_edge_color = "#ffd400"


def _share_height(*shares: tuple[Container, float]) -> None:
    """Split the height of the docks of ``shares`` (widget, fraction) between them: Qt would otherwise give
    the first dock all it asks for and leave the next a sliver."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QMainWindow

    docks = [_dock_of(widget) for widget, _ in shares]
    if any(dock is None for dock in docks):
        return
    main = docks[0].window()  # the Qt main window, reached without napari's private attributes
    if not isinstance(main, QMainWindow):
        return
    height = max(200, main.height() - 120)
    main.resizeDocks(docks, [int(height * fraction) for _, fraction in shares], Qt.Orientation.Vertical)


def _dock_of(widget: Container) -> Any:
    from qtpy.QtWidgets import QDockWidget

    parent = widget.native.parent()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parent()
    return parent


def _raise_dock(widget: Container) -> None:
    dock = _dock_of(widget)
    if dock is not None:
        dock.show()
        dock.raise_()


def _base_name(name: str) -> str:
    for suffix in (*(f" {name}" for name in layer_data.MAP_LAYER_NAMES.values()), " labels"):
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
