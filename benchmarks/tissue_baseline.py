"""A model vs the multi-Otsu baseline on the held-out block of the mni152-tissue dataset, on the 1 mm grid.

    .venv/bin/medcl-data build mni152-tissue -o data/mni152-tissue
    .venv/bin/python benchmarks/tissue_baseline.py napari_medcl/models/brain-tissue-2d.onnx [--fold 0]

The validation block is the one the training split (fold of 5, split seed 12345) held out. The model runs through
``napari_medcl.predict`` (resampled to its spacing and back); multi-Otsu (3 classes) runs on the brain voxels.
"""

from __future__ import annotations

import argparse

import numpy as np
from skimage.filters import threshold_multiotsu

from napari_medcl import predict
from napari_medcl.io import read_image
from training.data.layouts import discover
from training.data.preprocessing import split_cases
from training.metrics import dice

CLASSES = ("CSF", "GM", "WM")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--root", default="data/mni152-tissue")
    parser.add_argument("--fold", type=int, default=0)
    args = parser.parse_args()
    layout = discover("msd", args.root)
    _, val = split_cases(list(layout.cases), fold=args.fold, num_folds=5, val_fraction=None, split_seed=12345)
    print("| case | method | " + " | ".join(CLASSES) + " | mean |\n|---|---|---|---|---|---|")
    for case in val:
        image = read_image(case.images[0])
        truth = read_image(case.label).array
        brain = image.array > 0
        otsu = np.zeros_like(truth)
        otsu[brain] = np.digitize(image.array[brain], threshold_multiotsu(image.array[brain], classes=3)) + 1
        labels = predict(image, args.model).labels.array
        for method, pred in (("model", labels), ("multi-Otsu", otsu)):
            scores = [dice(pred == k, truth == k) for k in range(1, 4)]
            print(
                f"| {case.case_id} | {method} | "
                + " | ".join(f"{s:.3f}" for s in scores)
                + f" | {np.mean(scores):.3f} |"
            )


if __name__ == "__main__":
    main()
