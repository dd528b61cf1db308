"""Screenshot of the plugin on the sample scan: labels + UAFR map + review panel, for the README.

    python scripts/screenshot.py MODEL.onnx -o docs/screenshot.png

Opens the bundled MNI152 sample in a napari window (shown, because napari renders nothing into a hidden
window), docks the segmentation widget, segments synchronously with MODEL, lets the review panel jump to the
most uncertain slice, and saves a full-window screenshot. Without a display it starts a virtual one (Xvfb via
PyVirtualDisplay, installed with pytest-xvfb; `apt-get install xvfb` provides the server).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help=".onnx model file")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/screenshot.png"))
    parser.add_argument("--size", default="1600x1000", help="window size WxH in pixels (default 1600x1000)")
    parser.add_argument("--threshold", type=float, default=0.5, help="review threshold for the outline layer")
    parser.add_argument(
        "--rank",
        default="expected_errors",
        choices=["expected_errors", "regions", "mean_in_foreground", "volume_above"],
    )
    parser.add_argument(
        "--entry", type=int, default=1, help="which entry of the ranked slice list to open (1 = top)"
    )
    return parser.parse_args(argv)


def take_screenshot(args: argparse.Namespace) -> Path:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_medcl._widget import SegmentWidget

    width, height = (int(v) for v in args.size.lower().split("x"))
    viewer = napari.Viewer(show=True, title="napari-medcl")
    try:
        viewer.window.resize(width, height)
        (image,) = viewer.open_sample("napari-medcl", "mni152_t1")
        widget = SegmentWidget(viewer)
        viewer.window.add_dock_widget(widget, name="napari-medcl: segment", area="right")
        from napari_medcl.onnx_session import MODELS_DIR

        if args.model.resolve().parent == MODELS_DIR.resolve():  # a bundled model: pick it by its name
            widget._model.value = args.model.stem
        else:
            widget.add_model_file(args.model)
        widget.run(sync=True)
        if not widget.last_layers:
            raise SystemExit(f"segmentation failed: {widget._status.value}")
        review = widget.show_review()
        review._mode.value = args.rank
        review._threshold.value = args.threshold
        review.refresh()
        if review.scores:  # as a click on that entry of the ranked list: go to its slice
            review._slice_list.native.setCurrentRow(min(args.entry, len(review.scores)) - 1)
        viewer.reset_view()  # keep the slice, frame the whole head
        labels = widget.last_layers[0]
        viewer.layers.selection.active = labels
        for _ in range(5):
            QApplication.processEvents()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(args.output), canvas_only=False, flash=False)
        print(f"{args.output}: {widget._status.value}")
        return args.output
    finally:
        viewer.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"{args.model}: model file not found")
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        from pyvirtualdisplay import Display

        width, height = (int(v) for v in args.size.lower().split("x"))
        with Display(visible=False, size=(width + 200, height + 200), color_depth=24):
            take_screenshot(args)
    else:
        take_screenshot(args)


if __name__ == "__main__":
    main()
