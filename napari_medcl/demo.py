"""``make demo``: segment the bundled sample scan with the default model and draw an overview picture.

Writes ``demo-output/`` with the labels, the UAFR uncertainty and entropy maps (NIfTI) and the provenance JSON
(through ``write_prediction``, the writer ``medcl-predict`` uses, so the files are those of a batch run), and
``overlay.png``: three orthogonal mid-slices of the scan with the labels, and the UAFR map beside them, drawn
from the prediction in memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def sample_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("napari_medcl") / "data" / "mni152_t1_2mm.nii.gz"))


def draw_overlay(image, labels, uncertainty, spec, path: Path) -> None:
    """Three orthogonal mid-slices: scan + labels (top), UAFR uncertainty (bottom), with legend and colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from napari_medcl.atomic import atomic_path

    colors = [c.color for c in spec.classes]
    label_cmap = ListedColormap(colors)
    centre = [n // 2 for n in image.spatial_shape]
    views = [("axial", 0), ("coronal", 1), ("sagittal", 2)]
    figure, axes = plt.subplots(2, 3, figsize=(12, 8.4), constrained_layout=True)
    for column, (title, axis) in enumerate(views):
        take = [slice(None)] * 3
        take[axis] = centre[axis]
        # Physical aspect: the two in-plane axes keep their spacing ratio; rows flipped so superior/anterior is up.
        in_plane = [a for a in range(3) if a != axis]
        aspect = image.spacing[in_plane[0]] / image.spacing[in_plane[1]]
        scan = image.array[tuple(take)]
        lab = labels.array[tuple(take)].astype(float)
        lab[lab == 0] = np.nan
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(scan, cmap="gray", origin="lower", aspect=aspect)
        top.imshow(
            lab,
            cmap=label_cmap,
            vmin=0,
            vmax=len(colors) - 1,
            alpha=0.45,
            origin="lower",
            aspect=aspect,
            interpolation="nearest",
        )
        top.set_title(f"{title}: scan + labels")
        shown = bottom.imshow(
            uncertainty.array[tuple(take)], cmap="inferno", vmin=0, vmax=1, origin="lower", aspect=aspect
        )
        bottom.set_title(f"{title}: UAFR uncertainty")
        for ax in (top, bottom):
            ax.set_axis_off()
    figure.colorbar(
        shown, ax=axes[1, :].tolist(), shrink=0.8, label="UAFR uncertainty (0 = sure, 1 = unsure)"
    )
    handles = [Patch(color=c.color, label=c.name) for c in spec.classes[1:]]
    axes[0, 2].legend(handles=handles, loc="lower right", fontsize=9, framealpha=0.8)
    figure.suptitle(f"napari-medcl demo: {spec.name} on the bundled MNI152 sample — research use only")
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=110, format="png")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    from napari_medcl.case_writer import write_prediction
    from napari_medcl.crash_log import internal_error_message
    from napari_medcl.errors import MedclError
    from napari_medcl.io import read_image
    from napari_medcl.onnx_session import open_session
    from napari_medcl.progress_bar import predict_with_bar

    parser = argparse.ArgumentParser(prog="python -m napari_medcl.demo", description=__doc__)
    parser.add_argument("-o", "--output", type=Path, default=Path("demo-output"))
    parser.add_argument(
        "--model", default=None, help="bundled model name or .onnx path (default: the default bundled model)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sample = sample_path()
    try:
        model = open_session(args.model, device=args.device, backend=args.backend, precision=args.precision)
        print(f"demo: model {model.spec.name} on {model.provider}\nnote: {model.spec.intended_use}")
        # Read once: the scan is both the network's input and the overlay's background.
        image = read_image(sample)
        prediction = predict_with_bar(image, model, desc="segmenting")
        written = write_prediction(prediction, args.output, source=sample)
    except MedclError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        print(f"demo: {internal_error_message('demo', error)}", file=sys.stderr)
        return 1
    overlay = args.output / "overlay.png"
    draw_overlay(image, prediction.labels, prediction.uafr_uncertainty, model.spec, overlay)
    print(
        f"demo outputs in {args.output.resolve()}/ (labels: {written.labels.name}, overlay: {overlay.name}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
