"""Where a model's uncertainty maps are high: mean value at tissue borders against inside tissue.

    .venv/bin/python benchmarks/uafr_borders.py napari_medcl/models/brain-tissue-3d.onnx \\
        [--blocks mni152_block4 mni152_block2] [--root data/mni152-tissue]

For each block of the mni152-tissue dataset (1 mm grid), through ``napari_medcl.predict``: *border* voxels are
brain voxels with an in-plane neighbour (3x3) of another label; *inside* voxels are brain voxels two or more
in-plane voxels away from any border. Printed for every UAFR map of the model, the summary map the viewer shows
(``uafr_uncertainty``, the block nearest the output) and the predictive entropy.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from napari_medcl import predict
from napari_medcl.io import read_image
from training.data.layouts import discover


def border_and_inside(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(border, inside) boolean masks of the labelled brain in truth (Z, Y, X)."""
    in_plane = np.ones((1, 3, 3), bool)
    border = np.zeros(truth.shape, bool)
    for k in np.unique(truth):
        region = truth == k
        border |= region & ~ndimage.binary_erosion(region, in_plane)
    brain = truth > 0
    return border & brain, brain & ~ndimage.binary_dilation(border, in_plane)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--root", default="data/mni152-tissue")
    parser.add_argument("--blocks", nargs="+", default=["mni152_block4", "mni152_block2"])
    args = parser.parse_args()
    cases = {case.case_id: case for case in discover("msd", args.root).cases}
    print("| block | map | at borders | inside tissue | ratio |")
    print("|---|---|---|---|---|")
    for block in args.blocks:
        case = cases[block]
        truth = read_image(case.label).array
        prediction = predict(read_image(case.images[0]), args.model)
        border, inside = border_and_inside(truth)
        maps = {f"UAFR {name}": v.array for name, v in prediction.uncertainty_maps.items()}
        if prediction.uafr_uncertainty is not None:
            maps["summary (uafr_uncertainty)"] = prediction.uafr_uncertainty.array
        maps["predictive entropy"] = prediction.entropy.array
        for name, array in maps.items():
            at_border, at_inside = float(array[border].mean()), float(array[inside].mean())
            print(
                f"| {block} | {name} | {at_border:.3f} | {at_inside:.3f} | {at_border / max(at_inside, 1e-6):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
