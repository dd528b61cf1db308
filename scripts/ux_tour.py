"""A clinician's tour of the napari plugin, one screenshot per step, with the figures that show nothing was lost.

    python scripts/ux_tour.py -o tour/ [--model brain-tissue-3d] [--size 1600x1000]

Opens the bundled MNI152 sample in a real napari window, docks the segmentation widget as napari does, and
walks: whole run -> brush strokes on slice 30 -> a 'Current slice' run on slice 39 -> edits intact -> an edit
on slice 39 and a run that keeps it -> Ctrl+Z -> the review list -> the 3D view (timed) -> a second scan
with another grid -> save -> reopen. Each step prints one line and writes ``NN_step.png`` into the output
folder; at the end the docks are shown at 1280x800 as well. Without a display it starts a virtual one (Xvfb
via PyVirtualDisplay, installed with pytest-xvfb). The same path, without screenshots and with tiny models,
is the test tests/napari_medcl/test_clinician_path.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

EDIT_LABEL = 3  # the brush paints white matter (class 3 of the bundled tissue models)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("tour"))
    parser.add_argument("--model", default="brain-tissue-3d", help="bundled model name or .onnx path")
    parser.add_argument("--size", default="1600x1000", help="window size WxH in pixels (default 1600x1000)")
    return parser.parse_args(argv)


class Tour:
    def __init__(self, viewer, output: Path):
        self.viewer, self.output, self.step = viewer, output, 0

    def settle(self, rounds: int = 8) -> None:
        from qtpy.QtWidgets import QApplication

        for _ in range(rounds):
            QApplication.processEvents()
            time.sleep(0.02)

    def shot(self, name: str, note: str) -> None:
        self.settle()
        self.step += 1
        path = self.output / f"{self.step:02d}_{name}.png"
        self.viewer.screenshot(str(path), canvas_only=False, flash=False)
        print(f"{path.name}: {note}", flush=True)


def press_ctrl_z(viewer, layer) -> None:
    """Ctrl+Z on the canvas with ``layer`` active, as a user presses it."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    viewer.layers.selection.active = layer
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    QTest.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)


def run(widget, tour: Tour) -> None:
    worker = widget.run()
    while widget.running:
        tour.settle(1)
    if not widget._status.value.startswith("Done"):
        raise SystemExit(f"the run failed: {widget._status.value}")
    if worker is None:
        raise SystemExit("the run did not start")


def walk(args: argparse.Namespace) -> None:
    import napari

    from napari_medcl._widget import REGION_SLICE, REGION_WHOLE
    from napari_medcl.io import read_image, write_image
    from napari_medcl.volume import Volume

    width, height = (int(v) for v in args.size.lower().split("x"))
    args.output.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True, title="napari-medcl tour")
    tour = Tour(viewer, args.output)
    try:
        viewer.window.resize(width, height)
        (image,) = viewer.open_sample("napari-medcl", "mni152_t1")
        _, widget = viewer.window.add_plugin_dock_widget("napari-medcl", "Segment with uncertainty")
        if Path(args.model).suffix == ".onnx":
            widget.add_model_file(args.model)
        else:
            widget._model.value = args.model
        widget.confirm_edits = lambda count, where: (
            print(f"  asked: {count} edited voxel(s) in {where}") or "keep"
        )
        tour.shot("open", f"sample opened, model preselected: {widget._model.value}")

        run(widget, tour)
        results = widget.results_of(image)
        labels = results["labels"]
        whole = labels.data.copy()
        tour.shot("whole_run", f"{widget._status.value} labelled voxels: {int((whole > 0).sum()):,}")

        viewer.dims.set_point(0, image.data_to_world((30, 0, 0))[0])
        viewer.layers.selection.active = labels
        labels.mode = "paint"
        labels.brush_size = 5
        labels.selected_label = EDIT_LABEL
        for y, x in ((30, 30), (32, 34), (34, 38), (60, 45)):
            labels.paint((30, y, x), EDIT_LABEL)
        edited = labels.data != whole
        tour.shot("brush_edit", f"{int(edited.sum())} voxels painted on slice 30")

        viewer.dims.set_point(0, image.data_to_world((39, 0, 0))[0])
        widget._region.value = REGION_SLICE
        before = labels.data.copy()
        run(widget, tour)
        outside = np.delete(labels.data, 39, 0) == np.delete(before, 39, 0)
        kept = int((labels.data[edited] == before[edited]).sum())
        tour.shot(
            "slice_run",
            f"{widget._status.value} labelled voxels {int((before > 0).sum()):,} -> "
            f"{int((labels.data > 0).sum()):,}; outside slice 39 unchanged: {bool(outside.all())}; "
            f"edited voxels kept: {kept}/{int(edited.sum())}",
        )

        viewer.dims.set_point(0, image.data_to_world((30, 0, 0))[0])
        tour.shot("edits_intact", "slice 30 after the slice run: the brush strokes are still there")

        viewer.dims.set_point(0, image.data_to_world((39, 0, 0))[0])
        labels.paint((39, 40, 40), EDIT_LABEL)
        run(widget, tour)
        tour.shot("edit_in_region_kept", f"{widget._status.value}")

        kept = labels.data.copy()
        widget.confirm_edits = lambda count, where: (
            print(f"  asked: {count} edited voxel(s), overwrite") or ("overwrite")
        )
        run(widget, tour)
        changed_by_run = int((labels.data != kept).sum())
        press_ctrl_z(viewer, labels)
        tour.shot(
            "undo",
            f"Ctrl+Z after a run that overwrote the edit ({changed_by_run} voxels): labels as before that "
            f"run: {bool(np.array_equal(labels.data, kept))}",
        )

        review = widget.show_review()
        review.refresh()  # the default ranking: expected errors per slice
        if review.scores:
            review._slice_list.native.setCurrentRow(0)
        tour.shot("review", review._summary.value)

        panel = widget.prompts
        from qtpy.QtWidgets import QScrollArea

        area = panel.native.parent()
        while area is not None and not isinstance(area, QScrollArea):
            area = area.parent()
        if area is not None:  # the dock scrolls: bring the prompt panel into view, as a user would
            area.ensureWidgetVisible(panel.native)
        region = panel.go_to_next()
        tour.shot("next_mistake", panel._info.value)
        if region is not None:
            centre = tuple(int(round(c)) for c in region.center)
            before_prompt = labels.data.copy()
            points = panel.place_prompts()
            # a correcting click, as a reader would make it: grey matter where the label is not, else white matter
            panel._class.value = 3 if int(labels.data[centre]) == 2 else 2
            points.add(np.array([image.world_to_data(image.data_to_world(centre))]))
            changed = int((labels.data != before_prompt).sum())
            tour.shot("prompt_click", f"{panel._info.value} (labels changed: {changed} voxel(s))")
            panel.undo()
            viewer.reset_view()  # back to the whole scan, as a user zooms out after a correction
            print(
                f"  undo prompt: labels back as before it: {bool(np.array_equal(labels.data, before_prompt))}"
            )

        start = time.perf_counter()
        viewer.dims.ndisplay = 3
        tour.settle(2)
        seconds = time.perf_counter() - start
        tour.shot("view_3d", f"switch to 3D took {seconds:.2f} s (outline hidden in 3D)")
        viewer.dims.ndisplay = 2

        widget._region.value = REGION_WHOLE
        sample = read_image(image.metadata["medcl_geometry"]["source"])
        second = args.output / "second_scan.nii.gz"
        write_image(
            Volume(
                array=sample.array[:, ::-1].copy(),
                spacing=(2.5, 2.0, 2.0),
                origin=(-60.0, -70.0, -66.0),
                direction=np.eye(3),
            ),
            second,
        )
        (second_layer,) = viewer.open(str(second), plugin="napari-medcl")
        widget._image.value = second_layer
        run(widget, tour)
        second_results = widget.results_of(second_layer)
        same = all(
            np.allclose(layer.scale, second_layer.scale)
            and np.allclose(layer.translate, second_layer.translate)
            for layer in second_results.values()
        )
        tour.shot(
            "second_scan",
            f"second scan: {len(second_results)} layers of its own ({', '.join(sorted(second_results))}), "
            f"all on its grid: {same}; the sample's labels untouched: "
            f"{bool(np.array_equal(labels.data, kept))}",
        )

        review_map = results.get("error_likelihood") or results["top_class_error"]
        review.set_layers(labels, review_map)
        saved = review.save_labels(args.output / "sample_labels.nii.gz")
        reopened = read_image(saved)
        for layer in (second_layer, *second_results.values()):
            layer.visible = False  # back to the sample, as a user hides the scan they are done with
        (reopened_layer,) = viewer.open(str(saved), plugin="napari-medcl", layer_type="labels")
        viewer.dims.set_point(0, image.data_to_world((39, 0, 0))[0])
        tour.shot(
            "saved_reopened",
            f"saved {saved.name}; reopened on the sample's grid: {reopened.same_geometry(sample)}, "
            f"voxels equal: {bool(np.array_equal(reopened.array, kept))}; "
            f"reopened layer on the sample's grid in the viewer: "
            f"{np.allclose(reopened_layer.scale, image.scale) and np.allclose(reopened_layer.translate, image.translate)}; "
            f"review map: {review_map.name}",
        )
        print("case report:\n  " + review.case_report().to_text().replace("\n", "\n  "))

        viewer.window.resize(1280, 800)
        viewer.layers.selection.active = labels
        tour.shot("layout_1280x800", "both docks at 1280x800 (they scroll)")
    finally:
        viewer.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        from pyvirtualdisplay import Display

        width, height = (int(v) for v in args.size.lower().split("x"))
        with Display(visible=False, size=(max(width, 1280) + 200, max(height, 800) + 200), color_depth=24):
            walk(args)
    else:
        walk(args)


if __name__ == "__main__":
    main()
