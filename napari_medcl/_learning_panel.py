"""The segment widget's learning panel: *Add to training set*, *Fine-tune*, and *Which case next*.

Thin glue over ``napari_medcl.learning`` (tested without Qt): the panel gathers the image, the labels and
the model's last output from the segment widget (its ``host``), and shows the lines ``learning`` returns.
Fine-tuning runs in a subprocess (napari never imports torch) that a Qt timer polls on the GUI thread; ranking
runs ``napari_medcl.ranking.rank_cases`` in a thread worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import Container, Label, ProgressBar, PushButton

from napari_medcl import layer_data, learning
from napari_medcl.errors import MedclError

POLL_MS = 500
ERROR_STYLE = "color: #ff5050;"


def _wrapped(text: str = "") -> Label:
    label = Label(value=text)
    label.native.setWordWrap(True)
    return label


class LearningPanel(Container):
    """Corrections folder, Add to training set, Fine-tune (with progress, Cancel and its log), and the
    ranked list of which case to correct next. ``host``: the SegmentWidget (image and model choices, the
    results of each image, the model's last labels, the model picker)."""

    def __init__(self, viewer: Any, host: Any):
        self.viewer = viewer
        self.host = host
        self.folder: Path | None = learning.load_corrections_folder()  # read when the panel opens
        self.run: learning.FineTuneRun | None = None
        self.ranked: list[tuple[Any, Any]] = []  # (CaseRank, its open layer or None), in the list's order
        self._timer: Any = None
        self._rank_worker: Any = None
        self._title = Label(value="<b>Learning from corrections</b>")
        self._folder_info = _wrapped()
        self._choose = PushButton(text="Choose corrections folder...")
        self._add = PushButton(text="Add to training set")
        self._add_info = _wrapped()
        self._finetune = PushButton(text="Fine-tune on the corrections")
        self._progress = ProgressBar(label="Fine-tuning", min=0, max=100, value=0)
        self._ft_info = _wrapped()
        self._show_log = PushButton(text="Show fine-tuning log")
        self._rank_title = Label(value="<b>Which case next</b>")
        self._rank_open = PushButton(text="Rank the open images")
        self._rank_folder = PushButton(text="Rank a folder of scans...")
        self._rank_info = _wrapped()
        super().__init__(
            widgets=[
                self._title,
                self._folder_info,
                self._choose,
                self._add,
                self._add_info,
                self._finetune,
                self._progress,
                self._ft_info,
                self._show_log,
                self._rank_title,
                self._rank_open,
                self._rank_folder,
                self._rank_info,
            ]
        )
        from qtpy.QtWidgets import QAbstractItemView, QListWidget

        self.list = QListWidget()
        self.list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.list.setMinimumHeight(110)
        self.list.setWordWrap(True)
        self.native.layout().addWidget(self.list)
        self.list.currentRowChanged.connect(self.open_case)
        self._choose.changed.connect(lambda: self._pick_folder())
        self._add.changed.connect(lambda: self.add_to_training_set())
        self._finetune.changed.connect(lambda: self.cancel() if self.running else self.fine_tune())
        self._show_log.changed.connect(lambda: self._log_dialog())
        self._rank_open.changed.connect(lambda: self.rank_open_images())
        self._rank_folder.changed.connect(lambda: self._pick_rank_folder())
        self._show_folder()

    # -- corrections folder

    def set_corrections_folder(self, folder: str | Path) -> None:
        """Use ``folder`` from now on, remembered for the next session; its fine-tuned models join the picker."""
        self.folder = Path(folder).expanduser()
        try:
            learning.remember_corrections_folder(self.folder)
        except (OSError, MedclError) as error:  # not remembered; still used in this session
            self._say(self._folder_info, f"Not remembered: {error}", ERROR_STYLE)
        self._show_folder()

    def _show_folder(self) -> None:
        if self.folder is None:
            self._folder_info.value = "Corrections folder: none chosen yet."
            return
        self._folder_info.value = f"Corrections folder: {self.folder}"
        for model in sorted((self.folder / learning.FINETUNED).glob("*.onnx")):
            self.host.offer_model_file(model)

    def _pick_folder(self) -> bool:
        from qtpy.QtWidgets import QFileDialog

        start = str(self.folder or Path.home())
        folder = QFileDialog.getExistingDirectory(self.native, "Corrections dataset folder", start)
        if folder:
            self.set_corrections_folder(folder)
        return bool(folder)

    # -- add to training set

    def add_to_training_set(self) -> Any:
        """Write the chosen image and its labels layer into the corrections folder; None when not written."""
        if self.folder is None and not self._pick_folder():
            return None
        image = self.host.current_image()
        labels = self.host.results_of(image).get("labels") if image is not None else None
        if labels is None:
            self._say(
                self._add_info,
                "Run the model on the image first, correct its labels, then add them.",
                ERROR_STYLE,
            )
            return None
        try:
            added, line = learning.add_to_training_set(
                self.folder,
                layer_data.volume_from_layer(image),
                np.asarray(labels.data),
                model_labels=self.host.model_labels_of(labels),
                provenance=labels.metadata.get(layer_data.PREDICTION_KEY),
            )
        except MedclError as error:
            self._say(self._add_info, str(error), ERROR_STYLE)
            return None
        self._say(self._add_info, line)
        return added

    # -- fine-tune

    @property
    def running(self) -> bool:
        return self.run is not None and not self.run.finished

    def fine_tune(self, *, overrides: tuple[str, ...] = ()) -> learning.FineTuneRun | None:
        """Start fine-tuning the picker's model on the corrections folder (polled by a timer)."""
        if self.running:
            return self.run
        if self.folder is None and not self._pick_folder():
            return None
        try:
            plan = learning.plan_fine_tune(self.host.current_model(), self.folder, overrides=overrides)
            self.run = learning.FineTuneRun(plan)
            self.run.start()
        except (MedclError, OSError) as error:
            self._say(self._ft_info, str(error), ERROR_STYLE)
            return None
        self._finetune.text = "Cancel fine-tuning"
        self._progress.value = 0
        self._say(self._ft_info, f"Fine-tuning {plan.source} into {plan.name}. {plan.note}")
        from qtpy.QtCore import QTimer

        self._timer = QTimer()
        self._timer.timeout.connect(self.poll)
        self._timer.start(POLL_MS)
        return self.run

    def poll(self) -> None:
        run = self.run
        if run is None:
            return
        state = run.poll()
        progress = run.progress()
        self._progress.value = int(round(100 * progress.fraction))
        if not run.finished:
            self._ft_info.value = f"{state}: {progress.line}"
            return
        self._timer.stop()
        self._finetune.text = "Fine-tune on the corrections"
        if state == "done":
            self.host.offer_model_file(run.plan.output)
            self._say(self._ft_info, run.message)
        else:
            self._progress.value = 0
            self._say(self._ft_info, run.message, ERROR_STYLE if state == "failed" else "")

    def cancel(self) -> None:
        if self.run is not None:
            self.run.cancel()
            self.poll()

    def log_text(self) -> str:
        if self.run is None:
            return "No fine-tuning has run in this session."
        try:
            return self.run.console_log.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            return f"{self.run.console_log}: cannot be read ({error})"

    def _log_dialog(self) -> None:
        from qtpy.QtWidgets import QDialog, QPlainTextEdit, QVBoxLayout

        dialog = QDialog(self.native)
        dialog.setWindowTitle("Fine-tuning log")
        text = QPlainTextEdit(self.log_text())
        text.setReadOnly(True)
        QVBoxLayout(dialog).addWidget(text)
        dialog.resize(800, 500)
        dialog.show()
        self._dialog = dialog  # kept alive while shown

    # -- which case next

    def rank_open_images(self, *, sync: bool = False) -> Any:
        """Rank the image layers that come from files (most informative first)."""
        layers, skipped = {}, 0
        for layer in self.viewer.layers:
            if layer_data.layer_kind(layer) != "image" or layer_data.derived_from(layer)[0] is not None:
                continue
            source = (layer.metadata.get(layer_data.GEOMETRY_KEY) or {}).get("source")
            if source and Path(source).exists():
                layers[str(Path(source).resolve())] = layer
            else:
                skipped += 1
        note = f" ({skipped} open image(s) without a file not ranked)" if skipped else ""
        return self.rank(list(layers), layers, note=note, sync=sync)

    def rank_folder(self, folder: str | Path, *, sync: bool = False) -> Any:
        from napari_medcl.io import is_supported

        paths = sorted(str(p) for p in Path(folder).iterdir() if p.is_file() and is_supported(p))
        return self.rank(paths, {}, sync=sync)

    def _pick_rank_folder(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self.native, "Folder of scans to rank", str(Path.home()))
        if folder:
            self.rank_folder(folder)

    def rank(
        self, paths: list[str], open_layers: dict[str, Any], *, note: str = "", sync: bool = False
    ) -> Any:
        if not paths:
            self._say(self._rank_info, f"Nothing to rank: no scan from a file{note}.", ERROR_STYLE)
            return None
        try:
            model = self.host.current_model()
        except MedclError as error:
            self._say(self._rank_info, str(error), ERROR_STYLE)
            return None
        self._say(self._rank_info, f"Ranking {len(paths)} scan(s) with {Path(model).stem}...")

        def shown(ranks: list[Any]) -> None:
            self.show_ranking(ranks, open_layers, note)

        def failed(error: BaseException) -> None:
            self._say(
                self._rank_info, str(error) if isinstance(error, MedclError) else repr(error), ERROR_STYLE
            )

        from napari_medcl.ranking import rank_cases

        if sync:
            try:
                shown(rank_cases(paths, model, device="cpu"))
            except MedclError as error:
                failed(error)
            return None
        from napari.qt.threading import create_worker

        worker = create_worker(rank_cases, paths, model, _connect={"returned": shown, "errored": failed})
        self._rank_worker = worker
        return worker

    def show_ranking(self, ranks: list[Any], open_layers: dict[str, Any], note: str = "") -> None:
        self.ranked = [(r, open_layers.get(str(Path(r.path).resolve()))) for r in ranks]
        self.list.blockSignals(True)  # filling the list is not a click
        try:
            self.list.clear()
            self.list.addItems(learning.ranking_entries(ranks))
        finally:
            self.list.blockSignals(False)
        self._say(
            self._rank_info, f"{len(ranks)} scan(s), most informative first{note}. Click one to open it."
        )

    def open_case(self, row: int) -> Any:
        """Select the case of list row ``row`` (opening its file when it is not open); its image layer."""
        if not 0 <= row < len(self.ranked):
            return None
        rank, layer = self.ranked[row]
        if layer is None or layer not in self.viewer.layers:
            try:
                opened = self.viewer.open(str(rank.path), plugin="napari-medcl")
            except Exception as error:  # napari's reader errors are not ours; say them in one line
                self._say(self._rank_info, f"{rank.path}: cannot be opened ({error})", ERROR_STYLE)
                return None
            layer = next((la for la in opened if layer_data.layer_kind(la) == "image"), None)
            self.ranked[row] = (rank, layer)
        if layer is not None:
            self.viewer.layers.selection.active = layer
            self.host.select_image(layer)
        return layer

    # -- messages

    @staticmethod
    def _say(label: Label, text: str, style: str = "") -> None:
        label.value = text
        label.native.setStyleSheet(style)
