"""The widget's prompt panel: clicks in a Points layer refine the labels; it points at the next likely mistake.

Thin glue: the segment widget hands over each run's prediction (``take_run``); the panel keeps one
``napari_medcl.interactive.CaseSession`` per image, turns each new point of the image's prompt layer into a
``Prompt``, and writes the session's ``Update`` into the labels layer as one undoable step (Ctrl+Z). All
computing is in ``napari_medcl.interactive`` and ``napari_medcl.refinement``, tested without Qt. When the run
was on a server, the image's session is the server's (``napari_medcl.remote.RemoteCaseSession``, the same
interface): the prompts are answered there, and only the box each one changed comes back.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton

from napari_medcl import layer_data
from napari_medcl._view import show_box
from napari_medcl.errors import MedclError

ADDS, REMOVES = "adds the class", "removes the class"
CLICK, SCRIBBLE, BOX = "Click", "Scribble", "Box"
TOOL_OUTPUTS = {CLICK: "prompts", SCRIBBLE: "scribbles", BOX: "box_prompts"}
POSITIVE_COLOR, NEGATIVE_COLOR, NEXT_COLOR = "#40ff40", "#ff4040", "#ffe000"
NEXT_OUTPUT = "next_mistake"


class PromptPanel(Container):
    """Prompt class and polarity, *Place prompts*, *Go to next likely mistake*, *Undo last prompt*."""

    def __init__(self, viewer: Any):
        self.viewer = viewer
        self.sessions: dict[str, Any] = {}  # image id -> CaseSession
        self._targets: dict[str, tuple[Any, Any]] = {}  # image id -> (image layer, labels layer)
        self._classes: list[tuple[str, int]] = []
        # a callable: the dock's reset_choices (on every layer change) re-reads it instead of emptying it
        self._class = ComboBox(label="Prompt class", choices=lambda _widget: self._classes)
        self._polarity = ComboBox(label="A prompt", choices=[ADDS, REMOVES], value=ADDS)
        self._tool = ComboBox(label="Prompt tool", choices=[CLICK, SCRIBBLE, BOX], value=CLICK)
        self._engine = ComboBox(label="Prompt engine", choices=["auto", "local", "network"], value="auto")
        self._engine.tooltip = (
            "auto: local refinement (it measured better per click); network: a model trained with prompt "
            "channels answers itself"
        )
        self._tool.tooltip = (
            "Click: points; Scribble: paint strokes; Box: a rectangle on a slice (the class inside)"
        )
        self._place = PushButton(text="Place prompts (click in the view)")
        self._next = PushButton(text="Go to next likely mistake")
        self._undo = PushButton(text="Undo last prompt")
        self._load = PushButton(text="Load saved prompts...")
        self._info = Label(value="Run the model first; then click where it is wrong.")
        self._info.native.setWordWrap(True)
        super().__init__(
            widgets=[
                self._class,
                self._polarity,
                self._tool,
                self._engine,
                self._place,
                self._next,
                self._undo,
                self._load,
                self._info,
            ]
        )
        self._place.changed.connect(lambda: self.place_prompts())
        self._next.changed.connect(lambda: self.go_to_next())
        self._undo.changed.connect(lambda: self.undo())
        self._load.changed.connect(self._on_load_clicked)
        self._engine.changed.connect(self._on_engine_changed)

    # -- what the segment widget calls

    def take_run(self, image: Any, labels: Any, volume: Any, model: Any, prediction: Any) -> None:
        """A run of ``model`` on ``image`` ended: its ``prediction`` (with probabilities) feeds the image's
        session, whose prompts so far are replayed on it. A server's model: the server's session of the
        image, which took the run there."""
        from napari_medcl.interactive import CaseSession
        from napari_medcl.remote import RemoteModel

        key = layer_data.image_id(image)
        session = self.sessions.get(key)
        if isinstance(model, RemoteModel):
            self.sessions[key] = model.session_for(volume)
        else:
            if session is None or not isinstance(session, CaseSession) or session.grid != _grid(volume):
                session = self.sessions[key] = CaseSession(volume, model, engine=self._engine.value)
            session.take(prediction)
        self._targets[key] = (image, labels)
        classes = list(prediction.provenance.model.classes) if prediction.provenance is not None else []
        self._classes = [(f"{i}: {name}", i) for i, name in enumerate(classes)]
        self._class.reset_choices()
        if len(classes) > 1:
            self._class.value = 1
        self._info.value = "Click 'Place prompts', then click where the labels are wrong."

    # -- actions (tests drive these)

    def place_prompts(self, image: Any = None, tool: str | None = None) -> Any:
        """The prompt layer of ``tool`` (the panel's choice when None: Click = a Points layer, Scribble = a
        Labels layer to paint strokes in, Box = a Shapes layer for rectangles) for ``image`` (the last run's
        image when None), made active in its drawing mode."""
        image = image or self._last_image()
        if image is None:
            self._info.value = "Run the model first: prompts refine its result."
            return None
        tool = tool or self._tool.value
        key = layer_data.image_id(image)
        output = TOOL_OUTPUTS[tool]
        layer = next((la for la in self.viewer.layers if layer_data.derived_from(la) == (key, output)), None)
        if layer is None:
            layer = self._new_prompt_layer(image, key, tool)
        self.viewer.layers.selection.active = layer
        layer.mode = {CLICK: "add", SCRIBBLE: "paint", BOX: "add_rectangle"}[tool]
        return layer

    def _new_prompt_layer(self, image: Any, key: str, tool: str) -> Any:
        volume = self.sessions[key].volume
        kwargs = layer_data.spatial_kwargs(volume)
        kwargs["metadata"] = {
            **kwargs.get("metadata", {}),
            layer_data.DERIVED_KEY: {"image_id": key, "output": TOOL_OUTPUTS[tool]},
            "answered": 0,
        }
        name = f"{image.name} {TOOL_OUTPUTS[tool].replace('_', ' ')}"
        if tool == CLICK:
            layer = self.viewer.add_points(
                np.empty((0, volume.spatial_dims)),
                name=name,
                size=2.5,  # data units (voxels): a marker, not a brush; it must not hide what the click changed
                face_color=POSITIVE_COLOR,
                **kwargs,
            )
            layer.events.data.connect(lambda event, layer=layer: self._on_points(layer, event))
        elif tool == SCRIBBLE:
            layer = self.viewer.add_labels(
                np.zeros(volume.spatial_shape, dtype=np.uint8), name=name, **kwargs
            )
            layer.brush_size = 3
            layer.selected_label = 1
            layer.metadata["before"] = np.zeros(volume.spatial_shape, dtype=bool)
            layer.events.paint.connect(lambda _event, layer=layer: self._after_stroke(layer))
        else:
            layer = self.viewer.add_shapes(
                ndim=volume.spatial_dims,
                name=name,
                edge_color=POSITIVE_COLOR,
                face_color="transparent",
                edge_width=1.0,
                **kwargs,
            )
            layer.events.data.connect(lambda event, layer=layer: self._on_box(layer, event))
        return layer

    def add_click(self, image: Any, voxel: tuple[int, ...], label: int, positive: bool) -> Any:
        """Answer one click at ``voxel`` (indices on the image's grid) as if placed in the view."""
        from napari_medcl.prompts import point

        at = tuple(int(v) for v in voxel)
        z, y, x = at if len(at) == 3 else (0, *at)
        return self._answer(layer_data.image_id(image), point(z, y, x, label=label, positive=positive))

    def go_to_next(self) -> Any:
        """Centre the view on the untouched region with the most expected mistakes; returns it (or None)."""
        image = self._last_image()
        if image is None:
            return None
        session = self.sessions[layer_data.image_id(image)]
        try:
            region = session.next_region()
        except MedclError as error:  # a server's session: unreachable, closed...
            self._info.value = str(error)
            return None
        if region is None:
            self._info.value = "No region left where the model expects mistakes."
            return None
        three_d = session.volume.spatial_dims == 3
        entry = SimpleNamespace(
            box=region.box if three_d else region.box[1:],
            center=region.center if three_d else region.center[1:],
        )
        show_box(self.viewer, image, entry, axis=0)
        self._mark(image, entry)
        centre = entry.center
        self._info.value = (
            f"Next likely mistake: about {region.score:,.0f} wrong voxel(s) expected around voxel "
            f"{tuple(int(round(c)) for c in centre)}."
        )
        return region

    def undo(self) -> int:
        """Take the last prompt of the last run's image back; the voxels changed."""
        image = self._last_image()
        if image is None:
            return 0
        key = layer_data.image_id(image)
        try:
            update = self.sessions[key].undo()
        except MedclError as error:
            self._info.value = str(error)
            return 0
        self._write(key, update)
        self._info.value = f"Undone: {update.changed:,} voxel(s) restored."
        return update.changed

    def save_beside(self, labels: Any, labels_path: str | Path) -> Path | None:
        """Save the prompts behind the labels layer ``labels`` (just saved at ``labels_path``) beside it, when
        it has any."""
        key, _ = layer_data.derived_from(labels)
        session = self.sessions.get(key) if key is not None else None
        if session is None or not session.prompts:
            return None
        return session.save_prompts(labels_path)

    def load_prompts(self, path: str | Path, image: Any = None) -> int:
        """Replay the prompts saved at ``path`` (a ``.prompts.json`` file, or the labels file it sits beside)
        on ``image``'s current result (the last run's image when None); how many were replayed."""
        image = image or self._last_image()
        if image is None:
            self._info.value = "Run the model first: saved prompts are replayed on its result."
            return 0
        key = layer_data.image_id(image)
        session = self.sessions[key]
        _image, labels = self._targets[key]
        try:
            session.set_labels(np.asarray(labels.data))
            before = len(session.prompts)
            count = session.load_prompts(path)
        except MedclError as error:
            self._info.value = str(error)
            return 0
        self._write_all(key)
        self._info.value = f"Replayed {count} prompt(s) from {Path(path).name} ({before + count} in all)."
        return count

    # -- inside

    def _on_engine_changed(self, engine: str) -> None:
        """The next prompt of every image on this computer goes to ``engine``; one that the model cannot
        answer with says so then, as one line."""
        from napari_medcl.interactive import CaseSession

        for session in self.sessions.values():
            if isinstance(session, CaseSession):
                session.set_engine(engine)

    def _on_load_clicked(self, *_: Any) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _filter = QFileDialog.getOpenFileName(
            self.native, "Load saved prompts", str(Path.home()), "Prompts (*.prompts.json)"
        )
        if path:
            self.load_prompts(path)

    def _mark(self, image: Any, entry: Any) -> None:
        """Outline the proposed window on its slice (one Shapes layer per image, replaced each time)."""
        key = layer_data.image_id(image)
        layer = next(
            (la for la in self.viewer.layers if layer_data.derived_from(la) == (key, NEXT_OUTPUT)), None
        )
        (y0, y1), (x0, x1) = [(s.start - 0.5, s.stop - 0.5) for s in entry.box[-2:]]
        corners = [(y0, x0), (y0, x1), (y1, x1), (y1, x0)]
        if len(entry.box) == 3:
            corners = [(float(entry.center[0]), y, x) for y, x in corners]
        if layer is None:
            kwargs = layer_data.spatial_kwargs(self.sessions[key].volume)
            kwargs["metadata"] = {
                **kwargs["metadata"],
                layer_data.DERIVED_KEY: {"image_id": key, "output": NEXT_OUTPUT},
            }
            layer = self.viewer.add_shapes(
                [np.asarray(corners)],
                shape_type="rectangle",
                ndim=len(entry.box),
                name=f"{image.name} next likely mistake",
                edge_color=NEXT_COLOR,
                face_color="transparent",
                edge_width=0.5,
                **kwargs,
            )
        else:
            layer.data = [np.asarray(corners)]
            layer.shape_type = ["rectangle"]

    def _last_image(self) -> Any:
        return next(reversed(self._targets.values()))[0] if self._targets else None

    def _on_points(self, layer: Any, event: Any) -> None:
        if getattr(event, "action", "added") != "added":
            return
        key, _ = layer_data.derived_from(layer)
        answered = int(layer.metadata.get("answered", 0))
        data = np.asarray(layer.data)
        positive = self._polarity.value == ADDS
        from napari_medcl.prompts import point

        for index in range(answered, len(data)):
            voxel = np.rint(data[index]).astype(int)
            z, y, x = voxel if len(voxel) == 3 else (0, *voxel)
            self._answer(key, point(z, y, x, label=int(self._class.value or 0), positive=positive))
            colors = np.asarray(layer.face_color).copy()
            colors[index] = _rgba(POSITIVE_COLOR if positive else NEGATIVE_COLOR)
            layer.face_color = colors
        layer.metadata["answered"] = len(data)

    def _after_stroke(self, layer: Any) -> None:
        # napari emits ``paint`` before the stroke's voxels are in ``layer.data``: read them once Qt is idle
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, lambda: self._on_scribble(layer))

    def _on_scribble(self, layer: Any) -> None:
        """A finished stroke in the scribble layer: its newly painted voxels are one stroke prompt."""
        from napari_medcl.prompts import scribble

        key, _ = layer_data.derived_from(layer)
        painted = np.asarray(layer.data) > 0
        new = painted & ~layer.metadata["before"]
        layer.metadata["before"] = painted
        if not new.any():
            return
        voxels = np.argwhere(new)
        if voxels.shape[1] == 2:
            voxels = np.column_stack([np.zeros(len(voxels), dtype=int), voxels])
        positive = self._polarity.value == ADDS
        self._answer(key, scribble(voxels, label=int(self._class.value or 0), positive=positive))

    def _on_box(self, layer: Any, event: Any) -> None:
        """A rectangle drawn on a slice: the prompt class lies inside it on that slice."""
        if getattr(event, "action", "added") != "added":
            return
        from napari_medcl.prompts import box

        key, _ = layer_data.derived_from(layer)
        answered = int(layer.metadata.get("answered", 0))
        for vertices in layer.data[answered:]:
            corners = np.rint(np.asarray(vertices)).astype(int)
            low, high = corners.min(axis=0), corners.max(axis=0)
            if len(low) == 2:
                low, high = np.r_[0, low], np.r_[0, high]
            top = np.asarray(self.sessions[key].grid) - 1  # a rectangle may be drawn past the image's edge
            low, high = np.clip(low, 0, top), np.clip(high, 0, top)
            label = int(self._class.value or 0)
            if label == 0:
                self._info.value = "A box says where a class is: choose a class other than the background."
                continue
            self._answer(key, box(low, high, label=label))
        layer.metadata["answered"] = len(layer.data)

    def _answer(self, key: str, prompt: Any) -> Any:
        session = self.sessions[key]
        _image, labels = self._targets[key]
        restores = getattr(session, "restores", 0)  # a server's session rebuilt meanwhile: said below
        try:
            session.set_labels(np.asarray(labels.data))  # the brush's edits count
            update = session.add_prompt(prompt)
        except MedclError as error:
            self._info.value = str(error)
            return None
        self._write(key, update)
        self._info.value = (
            f"Prompt {len(session.prompts)}: {update.changed:,} voxel(s) changed in {update.seconds:.2f} s "
            f"({'the network' if update.engine == 'network' else 'local refinement'})."
        )
        if getattr(session, "restores", 0) != restores and session.notice:
            self._info.value += f" ({session.notice}.)"
        return update

    def _write_all(self, key: str) -> None:
        """The session's labels into the labels layer where they differ, as one undoable step."""
        from napari_medcl.interactive import Update

        session = self.sessions[key]
        box = tuple(slice(0, n) for n in session.grid)
        self._write(key, Update(box, np.asarray(session._labels).copy(), 0, 0.0))

    def _write(self, key: str, update: Any) -> None:
        """The update's box into the labels layer, as one undoable step."""
        if update.box is None:
            return
        session = self.sessions[key]
        _image, labels = self._targets[key]
        box = update.image_box(session.volume.spatial_dims)
        new = update.labels if session.volume.spatial_dims == 3 else update.labels[0]
        current = np.asarray(labels.data)[box]
        local = np.nonzero(current != new)
        if not local[0].size:
            return
        indices = tuple(i + s.start for i, s in zip(local, box))
        with labels.block_history():
            labels.data_setitem(indices, new[local].astype(current.dtype, copy=False))


def _grid(volume: Any) -> tuple[int, int, int]:
    shape = tuple(volume.spatial_shape)
    return shape if len(shape) == 3 else (1, *shape)  # type: ignore[return-value]


def _rgba(color: str) -> np.ndarray:
    value = color.lstrip("#")
    return np.array([int(value[i : i + 2], 16) / 255 for i in (0, 2, 4)] + [1.0])
