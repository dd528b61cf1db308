"""Models against intensity-only baselines on the held-out blocks of the mni152-tissue dataset (1 mm grid).

    .venv/bin/medcl-data build mni152-tissue -o data/mni152-tissue
    .venv/bin/python benchmarks/tissue_baseline.py [--model napari_medcl/models/brain-tissue-2d.onnx] [--folds 0]

For each fold (of 5, split seed 12345, as training splits) the held-out block is scored with:
- ``multi-Otsu``: skimage's 3-class multi-Otsu thresholds of the block's own brain voxels;
- ``lookup (raw|zscore|rescale)``: each intensity bin takes the label most frequent at that intensity in the
  fold's four training blocks, after no normalisation, a per-block z-score, or the per-block 0.5-99.5
  percentile rescale (the training pipeline's two normalisations). The labels are derived from the template's
  tissue maps, so intensity alone goes far; the gap between raw and normalised lookups is what a block's
  tissue mix does to its normalisation statistics;
- the model (``--model``, through ``napari_medcl.predict``: resampled to its spacing and back), on the block of
  ``--model-fold`` only: the other blocks were its training data. A model with ``nonzero_is_foreground``
  also gets a row with its network's plain argmax, without that rule. ``--tta`` adds a row with test-time
  mirroring (``predict(..., tta=True)``: the mean over every mirroring of the model's spatial axes).
"""

from __future__ import annotations

import argparse

import numpy as np
from skimage.filters import threshold_multiotsu

from napari_medcl.io import read_image
from napari_medcl.preprocess import normalize
from training.data.layouts import discover
from training.data.preprocessing import split_cases
from training.metrics import dice

CLASSES = ("CSF", "GM", "WM")
NORMALIZATIONS = {
    "raw": {"kind": "none"},
    "zscore": {"kind": "zscore", "use_nonzero_mask": True},
    "rescale": {"kind": "rescale", "low": 0.5, "high": 99.5, "use_nonzero_mask": True},
}


def bin_edges(images: list[np.ndarray]) -> np.ndarray:
    """Intensity bins twice as wide as the widest grey-level step of ``images`` (the template is 8-bit, so a
    finer bin would leave the levels of one block between the levels of another, in empty bins)."""
    steps = [float(np.median(np.diff(np.unique(image[image != 0])))) for image in images]
    low = min(float(image.min()) for image in images)
    high = max(float(image.max()) for image in images)
    return np.arange(low, high + 2 * max(steps), 2 * max(steps))


def lookup_table(images: list[np.ndarray], labels: list[np.ndarray], bins: np.ndarray) -> np.ndarray:
    """Most frequent label per intensity bin over the brain voxels of ``images``."""
    counts = np.zeros((len(bins) + 1, 4))
    for image, label in zip(images, labels):
        brain = label > 0
        np.add.at(counts, (np.digitize(image[brain], bins), label[brain]), 1)
    return counts.argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="an ONNX model to score beside the baselines")
    parser.add_argument(
        "--model-fold",
        type=int,
        default=0,
        help="the fold the model held out (its only unseen block; default 0)",
    )
    parser.add_argument(
        "--tta", action="store_true", help="also score the model with test-time mirroring (2^d passes)"
    )
    parser.add_argument("--root", default="data/mni152-tissue")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    layout = discover("msd", args.root)
    cases = {case.case_id: case for case in layout.cases}
    volumes = {cid: read_image(case.images[0]) for cid, case in cases.items()}
    truths = {cid: read_image(case.label).array for cid, case in cases.items()}
    normalized = {
        name: {cid: normalize(v.array[None], spec)[0] for cid, v in volumes.items()}
        for name, spec in NORMALIZATIONS.items()
    }
    print("| fold | held-out block | method | " + " | ".join(CLASSES) + " | mean |")
    print("|---|---|---|---|---|---|---|")
    for fold in args.folds:
        train, val = split_cases(
            list(layout.cases), fold=fold, num_folds=5, val_fraction=None, split_seed=12345
        )
        for case in val:
            cid, image, truth = case.case_id, volumes[case.case_id], truths[case.case_id]
            brain = image.array > 0
            methods = {}
            otsu = np.zeros_like(truth)
            otsu[brain] = (
                np.digitize(image.array[brain], threshold_multiotsu(image.array[brain], classes=3)) + 1
            )
            methods["multi-Otsu"] = otsu
            for name, images in normalized.items():
                bins = bin_edges(list(images.values()))
                table = lookup_table(
                    [images[c.case_id] for c in train], [truths[c.case_id] for c in train], bins
                )
                pred = np.zeros_like(truth)
                pred[brain] = table[np.digitize(images[cid][brain], bins)]
                methods[f"lookup ({name})"] = pred
            if args.model and fold == args.model_fold:
                from napari_medcl import predict

                result = predict(image, args.model, return_probabilities=True)
                methods["model"] = result.labels.array
                if result.provenance["nonzero_is_foreground"]:
                    # The network's own argmax, before the rule that no non-zero voxel is background.
                    methods["model, network argmax only"] = result.probabilities.array.argmax(0)
                if args.tta:
                    methods["model, test-time mirroring"] = predict(image, args.model, tta=True).labels.array
            for method, pred in methods.items():
                scores = [dice(pred == k, truth == k) for k in range(1, 4)]
                print(
                    f"| {fold} | {cid} | {method} | "
                    + " | ".join(f"{s:.3f}" for s in scores)
                    + f" | {np.mean(scores):.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
